"""What this machine can do: a hardware probe and a measured throughput of the hosted blocks.

Throughput is measured, not guessed from a spec sheet: clients route on it, and placement uses it
to strengthen the swarm's weakest blocks. Numbers are *per block* so peers hosting different
numbers of blocks compare directly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import psutil
import torch

from peerd.config import PeerConfig
from peerd.daemon.placement import blocks_that_fit
from peerd.model.config import ModelConfig
from peerd.model.llama import Block
from peerd.model.loading import load_stage
from peerd.model.quant import weight_bytes
from peerd.model.stage import Stage, cache_bytes_per_token
from peerd.server.runtime import ComputeRuntime

__all__ = ["Capacity", "Hardware", "blocks_fitting_memory", "measure_capacity", "measure_throughput", "probe_hardware"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """Device facts advertised in DHT records."""

    device: str  # human-readable device name
    memory_total_bytes: int
    memory_free_bytes: int
    cpu_count: int


@dataclass(frozen=True)
class Capacity:
    """Measured per-block throughput and size on this device, dtype and quantization."""

    decode_tokens_per_s: float  # one-token steps, batch 1, through one block
    prefill_tokens_per_s: float  # a long prompt, through one block
    block_weight_bytes: int = 0  # one block's weights as loaded (quantised ones counted as stored)


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


def blocks_fitting_memory(
    model_config: ModelConfig,
    dtype: torch.dtype,
    *,
    budget_bytes: int,
    cache_tokens: int,
    block_weight_bytes: int | None = None,
) -> int:
    """How many blocks of ``model_config`` in ``dtype`` fit ``budget_bytes`` with a ``cache_tokens`` KV cache.

    ``block_weight_bytes``: one block's measured size (a quantised probe block, see
    :func:`measure_capacity`); None = its parameters at ``dtype``'s size. Raises ValueError when not
    even one block fits, naming the options that would help.
    """
    if block_weight_bytes is None:
        with torch.device("meta"):
            params = sum(p.numel() for p in Block(model_config, 0).parameters())
        block_weight_bytes = params * torch.empty((), dtype=dtype).element_size()
    fit = blocks_that_fit(
        budget_bytes=budget_bytes,
        bytes_per_block=block_weight_bytes,
        cache_bytes_per_block=cache_tokens * cache_bytes_per_token(model_config, 1, dtype),
        reserve_bytes=min(512 << 20, budget_bytes // 10),
        num_blocks=model_config.num_layers,
    )
    if fit < 1:
        raise ValueError(
            f"not even one block fits the memory budget of {budget_bytes / 2**30:.1f} GiB with a KV cache of "
            f"{cache_tokens} tokens; lower --cache-tokens, raise --memory-budget or store weights in fewer bits "
            "(--quant int8, int4 or nf4)"
        )
    return fit


def blocks_to_host(
    cfg: PeerConfig, model_config: ModelConfig, dtype: torch.dtype, hardware: Hardware, capacity: Capacity | None
) -> int:
    """Blocks a peer without ``--blocks`` hosts: what fits its budget (``--memory-budget``, else 80% of
    free memory) at the measured size of a block, at most ``--max-blocks``."""
    budget = cfg.memory_budget_bytes or int(0.8 * hardware.memory_free_bytes)
    fit = blocks_fitting_memory(
        model_config,
        dtype,
        budget_bytes=budget,
        cache_tokens=cfg.cache_tokens,
        block_weight_bytes=capacity.block_weight_bytes
        if capacity is not None and capacity.block_weight_bytes
        else None,
    )
    return min(fit, cfg.max_blocks or fit)


def load_hosted_blocks(cfg: PeerConfig, start: int, end: int, dtype: torch.dtype, reuse: Stage | None = None) -> Stage:
    """Load (on the compute thread) the blocks a peer hosts, as ``--quant`` says, and log their real size."""
    logger.info("loading blocks %d:%d of %s (%s, %s, quant %s)", start, end, cfg.model_id, cfg.device, dtype, cfg.quant)
    stage = load_stage(cfg.model_path, start, end, dtype=dtype, device=cfg.device, reuse=reuse, quant=cfg.quant)
    hosted = stage.weight_bytes  # measured after loading: what placement's per-block size predicted
    logger.info("hosted weights: %.1f MiB, %.2f MiB per block", hosted / 2**20, hosted / stage.num_blocks / 2**20)
    return stage


async def measure_capacity(
    runtime: ComputeRuntime,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: str,
    *,
    measure: bool = True,
    step_delay_s: float = 0.0,
    span_blocks: int = 1,
    quant: str = "none",
) -> Capacity:
    """Per-block throughput and weight bytes, measured on one random block before any weights are loaded.

    Every block of a model has the same shape, so one block tells the truth about all of them,
    and knowing it *before* loading lets placement use it. The probe is stored as the real blocks
    will be (``quant``), so both its speed and its size are those of a hosted block. The test/ops
    knob ``step_delay_s`` is folded in, spread over a span of ``span_blocks``, so an artificially
    slowed peer also advertises itself as slow. ``measure=False`` (tests) skips the benchmark for a
    rough figure (the size is still measured).
    """
    probe = await runtime.run(lambda: Stage.random(model_config, 0, 1, dtype=dtype, device=device, quant=quant))
    block_bytes = weight_bytes(probe.layers["0"])
    if measure:
        capacity = await runtime.run(lambda: measure_throughput(probe))
    else:
        capacity = Capacity(decode_tokens_per_s=1000.0, prefill_tokens_per_s=10000.0)
    capacity = replace(capacity, block_weight_bytes=block_bytes)
    if step_delay_s > 0:
        # a step through n blocks takes n / tps + delay
        step_s = span_blocks / capacity.decode_tokens_per_s + step_delay_s
        capacity = replace(capacity, decode_tokens_per_s=span_blocks / step_s)
    logger.info(
        "per block (%s, quant %s): %.0f tok/s decode, %.0f tok/s prefill, %.1f MiB of weights",
        str(dtype).removeprefix("torch."),
        quant,
        capacity.decode_tokens_per_s,
        capacity.prefill_tokens_per_s,
        block_bytes / 2**20,
    )
    return capacity
