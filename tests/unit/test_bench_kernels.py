"""`make bench`'s kernel rows: both kernels timed on the same weights, outputs compared, the switch restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peerd.cli.bench_kernels import kernels_rows, run_kernels_bench
from peerd.model import linear
from peerd.model.loading import load_local_model
from tests.helpers.tiny_model import make_tiny_checkpoint


@pytest.mark.skipif(not linear.onednn_on(), reason="this torch build has no oneDNN linear kernel")
def test_kernels_bench_times_both_kernels_and_restores_the_switch(tmp_path: Path) -> None:
    model = load_local_model(make_tiny_checkpoint(tmp_path / "tiny", num_layers=2), progress=False)
    threads = torch.get_num_threads()
    result = run_kernels_bench(model, rounds=2, calls=2)
    assert linear.ONEDNN and torch.get_num_threads() == threads
    assert set(result["cases"]) == {
        "2 blocks, 1 session",
        "2 blocks, 16 sessions",
        "2 blocks, backward of 4 x 64 tokens",
        "LM head, 1 position",
        "LM head, 16 positions",
    }
    for case in result["cases"].values():
        assert case["onednn_ms"] > 0 and case["mkl_ms"] > 0
        assert case["speedup"] == pytest.approx(case["mkl_ms"] / case["onednn_ms"])
        assert case["max_relative_difference"] < 1e-5  # the same sums in another order
    assert set(result["small_rows"]) == {
        "2 blocks, 2 sessions",
        "2 blocks, 4 sessions",
        "LM head, 2 positions",
        "LM head, 4 positions",
    }
    for case in result["small_rows"].values():
        assert case["speedup"] == pytest.approx(case["onednn_ms"] / case["weight_left_ms"])
        assert case["max_relative_difference"] < 1e-5
    assert linear.SKINNY_ROWS == (2, 3, 4)  # restored
    assert linear.MKL_MAX_WEIGHT == result["mkl_max_weight"] == linear.mkl_max_weight(result["cpu_capability"])
    rows = kernels_rows(result)
    assert len(rows) == 10 and rows[0][:2] == ("kernels peerd takes here", result["cpu_capability"])
    assert all(row[0].startswith("oneDNN vs MKL") for row in rows[1:6])
    assert all(row[0].startswith("2-4 rows, MKL weight-left vs oneDNN") for row in rows[6:])
