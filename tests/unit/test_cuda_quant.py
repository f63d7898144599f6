"""On CUDA (skipped without one): bfloat16, int8, nf4 and int4 blocks agree with the CPU within spot-check tolerances.

This is the GPU check of quantized hosting: each family's tiny config and, when it is cached,
SmolLM2, loaded on CUDA in bfloat16 with each quantization, against the same quantization on the
CPU in float32. The bound is exactly what a client's spot check allows between such peers
(``tolerance_for``), so a pass here means an honest GPU peer is never banned by a CPU checker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peerd.client.verify import relative_errors, tolerance_for
from peerd.model import load_stage
from peerd.model.registry import model_dir
from protocols import Compression
from tests.helpers.tiny_model import FAMILIES, make_family_checkpoint, make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUANTS = ("none", "int8", "nf4", "int4")


def _checkpoints(tmp: Path) -> dict[str, Path]:
    paths = {"llama": make_tiny_checkpoint(tmp / "llama", num_layers=4, hidden_size=128, intermediate_size=256)}
    paths.update({f: make_family_checkpoint(tmp / f, f) for f in FAMILIES})
    smollm2 = model_dir("smollm2-135m")
    if (smollm2 / "config.json").is_file():
        paths["smollm2"] = smollm2
    return paths


@pytest.mark.parametrize("quant", QUANTS)
def test_cuda_bfloat16_blocks_agree_with_cpu_float32(tmp_path: Path, quant: str) -> None:
    for name, path in _checkpoints(tmp_path).items():
        num = min(4, int(json.loads((path / "config.json").read_text())["num_hidden_layers"]))
        cpu = load_stage(path, 0, num, progress=False, quant=quant)
        gpu = load_stage(path, 0, num, dtype=torch.bfloat16, device="cuda", progress=False, quant=quant)
        hidden = torch.randn(1, 24, cpu.config.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = cpu(hidden)
            got = gpu(hidden.to("cuda", torch.bfloat16)).float().cpu()
            cache = gpu.allocate_cache(1, 24)
            steps = [gpu(hidden[:, :20].to("cuda", torch.bfloat16), cache, 0)]
            steps += [gpu(hidden[:, t : t + 1].to("cuda", torch.bfloat16), cache, t) for t in range(20, 24)]
        tol = tolerance_for(["bfloat16", "float32"], Compression.NONE, [quant, quant])
        error = float(relative_errors(got, want).max())
        assert error < tol, f"{name} {quant}: relative error {error:.3g} >= {tol}"
        decoded = torch.cat(steps, dim=1).float().cpu()
        assert float(relative_errors(decoded, got).max()) < tolerance_for(["bfloat16"], Compression.NONE)
