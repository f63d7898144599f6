"""What tools/bench_frame.py and tools/bench_hop.py share: a source tree of the last frame-v1 commit
(from git), and running a bench's worker mode in a tree so that it imports that tree's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
V1_COMMIT = "480330e"  # the last commit with frame v1 (protocols/_msgpack.py)


def git_tree(commit: str, workdir: Path, *paths: str) -> Path:
    """``paths`` (default: everything) of ``commit``, extracted under ``workdir``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, *paths], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(workdir, filter="data")
    return workdir


def run_worker(script: str, tree: Path, args: list[str], timeout_s: float | None = None) -> dict[str, Any]:
    """``script --worker ARGS`` with ``tree`` first on the import path; the last line it prints, as JSON."""
    out = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--worker", *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        timeout=timeout_s,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result
