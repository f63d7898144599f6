"""Quality of quantized peers on the real model, through a real local swarm (`make bench-quality`).

Opt-in (`--run-slow`). One `peerd run` per quantization hosts all of SmolLM2's blocks; a client
computes the logits of the shipped text through each. int8 must stay within the issue's 2% of
float32 perplexity (measured: +0.4%). nf4 misses the issue's 8% on this 135M model (measured:
+20.6%, docs/decisions.md section 9); the bound here guards that number against regressions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerd.cli.bench_quality import main
from peerd.model.fetch import fetch_model
from peerd.model.registry import default_cache_dir

pytestmark = pytest.mark.slow

NF4_REGRESSION_BOUND = 0.25  # relative perplexity increase; the target (0.08) is not met


def test_quantized_peers_perplexity_through_a_swarm(tmp_path: Path) -> None:
    fetch_model("smollm2-135m", default_cache_dir(), progress=False)
    out = tmp_path / "quality.json"
    assert main(["--out", str(out), "--speed-rounds", "0"]) == 0
    result = json.loads(out.read_text())
    rows = {r["quant"]: r for r in result["rows"]}
    assert result["tokens"] > 300
    assert rows["none"]["logit_diff_max"] < 1e-3  # the float32 peer computes what the local model does
    assert 0 < rows["int8"]["perplexity_increase"] <= 0.02 and rows["int8"]["meets_target"]
    assert 0 < rows["nf4"]["perplexity_increase"] <= NF4_REGRESSION_BOUND
    assert rows["none"]["logit_diff_mean"] < rows["int8"]["logit_diff_mean"] < rows["nf4"]["logit_diff_mean"]
