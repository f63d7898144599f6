"""Coverage-guided fuzzing (atheris/libFuzzer) of every target for a fixed time budget (slow: CI runs it).

Each target runs in its own process (libFuzzer owns the process and exits on the first failure),
starting from the kept corpus, for ``PEERD_ATHERIS_SECONDS`` seconds (default 15). A failure's input
is shown in hex; once fixed, keep it in the corpus with ``tests.fuzz.harness.add_to_corpus``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.harness import CORPUS_DIR, TARGETS

pytest.importorskip("atheris", reason="atheris is installed with the dev extra on Linux x86_64")

BUDGET_S = int(os.environ.get("PEERD_ATHERIS_SECONDS", "15"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(BUDGET_S + 120)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_atheris_finds_no_failure(target: str, tmp_path: Path) -> None:
    found = tmp_path / "new"
    found.mkdir()
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.atheris_fuzz",
        target,
        f"-max_total_time={BUDGET_S}",
        "-timeout=20",  # one input running longer than this is a hang
        "-rss_limit_mb=3072",
        "-max_len=8192",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
        str(found),
        str(CORPUS_DIR / target),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=BUDGET_S + 100)
    log = proc.stderr[-4000:]
    failures = [p for p in tmp_path.iterdir() if p.is_file() and p.name.startswith(("crash-", "timeout-", "oom-"))]
    detail = "\n".join(f"{p.name}: {p.read_bytes()[:512].hex()}" for p in failures)
    assert proc.returncode == 0 and not failures, f"atheris failed on {target}:\n{detail}\n{log}"
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert runs is not None and int(runs.group(1)) > 100, f"atheris barely ran:\n{log}"
