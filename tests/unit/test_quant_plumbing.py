"""How quantization travels: flags, records, status, tolerances, placement by the measured block size."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from peerd.cli.parser import build_parser
from peerd.cli.status import format_status
from peerd.client.verify import tolerance_for
from peerd.daemon.capacity import blocks_fitting_memory
from peerd.model import ModelConfig, Stage
from peerd.swarm.dht import BlockView
from peerd.swarm.records import ServerRecord
from peerd.swarm.status import status_from_views
from protocols import Compression
from tests.helpers.fake_swarm import record

CONFIG = ModelConfig(
    vocab_size=256, hidden_size=256, intermediate_size=768, num_layers=32, num_heads=4, num_kv_heads=2, head_dim=64
)  # fmt: skip


def test_flags() -> None:
    run = build_parser().parse_args(["run", "--quant", "nf4"])
    assert run.quant == "nf4" and build_parser().parse_args(["run"]).quant == "none"
    gen = build_parser().parse_args(["generate", "hi", "--min-precision", "int8"])
    assert gen.min_precision == "int8"
    assert build_parser().parse_args(["run", "--quant", "int4"]).quant == "int4"
    assert build_parser().parse_args(["generate", "hi", "--min-precision", "int4"]).min_precision == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--quant", "int3"])


def test_records_carry_quant_and_older_records_mean_none() -> None:
    quantized = replace(record("a", 0, 2), quant="nf4")
    assert ServerRecord.from_wire(quantized.to_wire()).quant == "nf4"
    old = {k: v for k, v in quantized.to_wire().items() if k != "quant"}
    assert ServerRecord.from_wire(old).quant == "none"
    for bad in ("", 4, "x" * 17):
        with pytest.raises(ValueError, match="bad quant"):
            ServerRecord.from_wire({**quantized.to_wire(), "quant": bad})


def test_status_shows_quantized_weights() -> None:
    views = [BlockView(i, (replace(record("home", 0, 2), quant="int8", dtype="bfloat16"),)) for i in range(2)]
    status = status_from_views("tiny", 2, views)
    assert status["peers"][0]["quant"] == "int8"
    line = next(line for line in format_status(status).splitlines() if line.startswith("home"))
    assert "bfloat16/int8" in line.split()


def test_tolerance_is_tight_at_one_precision_and_derived_from_the_quantization_across() -> None:
    float32 = tolerance_for(["float32"], Compression.NONE)
    assert tolerance_for(["float32"], Compression.NONE, ["nf4", "nf4"]) == float32  # same weights
    assert tolerance_for(["float32"], Compression.NONE, ["int4", "int4"]) == float32
    assert tolerance_for(["float32"], Compression.NONE, ["int4", "none"]) > 50 * float32
    assert tolerance_for(["float32"], Compression.NONE, ["nf4", "none"]) > 50 * float32
    assert float32 < tolerance_for(["float32"], Compression.NONE, ["int8", "none"]) < 0.2
    assert tolerance_for(["float32"], Compression.NONE, ["fp3", "none"]) >= 0.5  # unknown: loose


def test_placement_uses_the_measured_size_of_a_quantized_block() -> None:
    sizes = {q: Stage.random(CONFIG, 0, 1, quant=q).weight_bytes for q in ("none", "int8", "nf4", "int4")}
    assert sizes["nf4"] < sizes["int4"] < sizes["int8"] < 0.3 * sizes["none"]
    budget = 20 << 20  # about 5 float32 blocks
    fit = {
        q: blocks_fitting_memory(CONFIG, torch.float32, budget_bytes=budget, cache_tokens=64, block_weight_bytes=size)
        for q, size in sizes.items()
    }
    assert fit["none"] == blocks_fitting_memory(CONFIG, torch.float32, budget_bytes=budget, cache_tokens=64)
    assert fit["none"] < fit["int8"] <= fit["int4"] <= fit["nf4"]
    with pytest.raises(ValueError, match="--quant int8, int4 or nf4"):
        blocks_fitting_memory(CONFIG, torch.float32, budget_bytes=1 << 20, cache_tokens=64)
