"""GPU check of quantized hosting (run on a machine with CUDA): agreement with the CPU and decode speed.

For SmolLM2 (cached by `peerd model fetch`) it loads all blocks on CUDA in bfloat16 with each
quantization (none, int8, nf4, int4), compares a 64-token forward with the same quantization on the CPU in
float32 (the relative error a spot check sees, against its tolerance), and times one-token decode
steps through all blocks (median of 64 steps after a warm-up). The tiny configs of every family are
checked by `pytest tests/unit/test_cuda_quant.py`. Prints a table and writes
bench-results/gpu_check.json; docs/benchmarks.md records the numbers.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from peerd.client.verify import relative_errors, tolerance_for
from peerd.model import load_stage
from peerd.model.registry import model_dir
from protocols import Compression


def decode_tokens_per_s(stage: torch.nn.Module, steps: int = 64) -> float:
    hidden = stage.config.hidden_size  # type: ignore[union-attr]
    cache = stage.allocate_cache(1, 16 + steps)  # type: ignore[operator]
    x = torch.randn(1, 16, hidden, device="cuda", dtype=torch.bfloat16) * 0.1
    times = []
    with torch.inference_mode():
        stage(x, cache, 0)
        for i in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            stage(x[:, :1], cache, 16 + i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times[4:])


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    path = model_dir("smollm2-135m")
    rows = []
    hidden = torch.randn(1, 64, 576, generator=torch.Generator().manual_seed(0))
    for quant in ("none", "int8", "nf4", "int4"):
        cpu = load_stage(path, 0, 30, progress=False, quant=quant)
        gpu = load_stage(path, 0, 30, dtype=torch.bfloat16, device="cuda", progress=False, quant=quant)
        with torch.inference_mode():
            error = float(relative_errors(gpu(hidden.to("cuda", torch.bfloat16)).float().cpu(), cpu(hidden)).max())
        tol = tolerance_for(["bfloat16", "float32"], Compression.NONE, [quant, quant])
        row = {
            "quant": quant,
            "max_relative_error_vs_cpu_float32": error,
            "spot_check_tolerance": tol,
            "decode_tokens_per_s": decode_tokens_per_s(gpu),
            "weight_bytes_per_block": gpu.weight_bytes / 30,
            "device": torch.cuda.get_device_name(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del gpu
        torch.cuda.empty_cache()
    out = Path("bench-results/gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0 if all(r["max_relative_error_vs_cpu_float32"] < r["spot_check_tolerance"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
