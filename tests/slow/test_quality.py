"""Quality of quantized peers on the real model, through a real local swarm (`make bench-quality`).

Opt-in (`--run-slow`). One `peerd run` per quantization hosts all of SmolLM2's blocks; a client
computes the logits of the shipped text through each. int8 must stay within the issue's 2% of
float32 perplexity (measured: +0.4%), int4 within its 8% (measured: 0: SmolLM2 is a Q4_1 checkpoint
and int4 stores Q4_1's grid exactly). nf4 misses the 8% on it (measured: +20.5%, docs/decisions.md
section 9); the bound here guards that number against regressions.
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
MIB = 2**20


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
    # int4 holds the checkpoint's own 4-bit weights: what the float32 peer computes, to float rounding
    assert abs(rows["int4"]["perplexity_increase"]) < 1e-3 and rows["int4"]["meets_target"]
    assert rows["int4"]["logit_diff_max"] < 1e-2
    # the same codes computed in bfloat16 (torch's packed int4 kernel on the CPU): bfloat16's rounding
    # only (+0.17% measured), far from nf4's second rounding of the weights
    # int8 in bfloat16 (torch's int8 kernel on the CPU): the same codes and scales (+0.19% measured)
    int8_bf16 = rows["int8-bf16"]
    assert int8_bf16["dtype"] == "bfloat16" and int8_bf16["meets_target"]
    assert 0 < int8_bf16["perplexity_increase"] <= 0.02
    int4_bf16 = rows["int4-bf16"]
    assert int4_bf16["dtype"] == "bfloat16" and int4_bf16["meets_target"]
    assert 0 < int4_bf16["perplexity_increase"] < 0.01
    assert rows["int4"]["logit_diff_mean"] < int4_bf16["logit_diff_mean"] < rows["nf4"]["logit_diff_mean"]
    # sizes as the peers measured them after loading: 32, 8, 4.13 and 5 bits per weight (norms aside)
    size = {q: r["block_weight_bytes"] / MIB for q, r in rows.items()}
    assert 13 < size["none"] < 14 and 3.3 < size["int8"] < 3.5 and 1.7 < size["nf4"] < 1.8 and 2.0 < size["int4"] < 2.2
    assert 3.3 < size["int8-bf16"] < 3.5 and 2.0 < size["int4-bf16"] < 2.2
