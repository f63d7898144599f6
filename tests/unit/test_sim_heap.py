"""keep_freed_memory: freed arrays are reused without fresh page faults (in a child process, so the
test process keeps its own malloc settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHILD = """
import resource, sys
import numpy as np
from peerd.sim.heap import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()
def arrays():  # as a layout's cut: a few arrays of ~512 KiB alive together, then all freed
    return [np.ones(1 << 16) for _ in range(4)]

arrays()  # once before counting
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    arrays()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_arrays_are_reused_without_page_faults() -> None:
    # 50 rounds of 4 x 128 pages: faulted in again every round unless the freed blocks are kept
    assert _faults("default") > 50 * 256
    assert _faults("keep") < 50 * 8
