"""What this machine can do: a hardware probe and a measured throughput of the hosted blocks.

Throughput is measured, not guessed from a spec sheet: clients route on it, and placement uses it
to strengthen the swarm's weakest blocks. Numbers are *per block* so peers hosting different
numbers of blocks compare directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil
import torch

from peerd.model.stage import Stage

__all__ = ["Capacity", "Hardware", "measure_throughput", "probe_hardware"]


@dataclass(frozen=True)
class Hardware:
    """Device facts advertised in DHT records."""

    device: str  # human-readable device name
    memory_total_bytes: int
    memory_free_bytes: int
    cpu_count: int


@dataclass(frozen=True)
class Capacity:
    """Measured per-block throughput on this device and dtype."""

    decode_tokens_per_s: float  # one-token steps, batch 1, through one block
    prefill_tokens_per_s: float  # a long prompt, through one block


def probe_hardware(device: str) -> Hardware:
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return Hardware(torch.cuda.get_device_name(index), int(total), int(free), os.cpu_count() or 1)
    vm = psutil.virtual_memory()
    return Hardware("cpu", int(vm.total), int(vm.available), os.cpu_count() or 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(
    stage: Stage, *, decode_steps: int = 8, prefill_tokens: int = 128, budget_s: float = 5.0
) -> Capacity:
    """Time real forward passes of ``stage`` (must run on the compute thread: it uses torch).

    The decode figure uses the same KV-cache path as real sessions. The run stops early once the
    time budget is spent, so a slow machine does not take minutes to join.
    """
    num_blocks = stage.end - stage.start
    hidden = stage.config.hidden_size
    device = torch.device(stage.device)
    with torch.inference_mode():
        cache = stage.allocate_cache(1, prefill_tokens + decode_steps + 1)
        x = torch.randn(1, prefill_tokens, hidden, dtype=stage.dtype, device=device) * 0.1
        stage.forward(x[:, :8], cache=cache, position=0)  # warm-up (allocator, kernels)
        _sync(device)
        t0 = time.perf_counter()
        stage.forward(x, cache=cache, position=0)
        _sync(device)
        prefill_s = max(time.perf_counter() - t0, 1e-9)
        step = x[:, :1]
        deadline = time.perf_counter() + budget_s
        times = []
        for i in range(decode_steps):
            t0 = time.perf_counter()
            stage.forward(step, cache=cache, position=prefill_tokens + i)
            _sync(device)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
    times.sort()
    median_step_s = max(times[len(times) // 2], 1e-9)
    return Capacity(
        decode_tokens_per_s=num_blocks / median_step_s,
        prefill_tokens_per_s=prefill_tokens * num_blocks / prefill_s,
    )
