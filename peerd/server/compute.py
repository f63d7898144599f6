"""The torch work of each RPC, as functions (or chunked generators) the compute runtime runs.

Costs are tokens x blocks: what the runtime's fair queuing charges each client. Requests of more
than :data:`CHUNK_TOKENS` tokens are done in chunks (a window of tokens through one block), so a
client sending the largest requests a peer accepts holds the compute thread for one chunk at a time.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Hashable
from dataclasses import dataclass

import torch

from peerd.model.batching import BACKWARD_COST_FACTOR, StepInput, backward_chunks, forward_batch, forward_chunks
from peerd.model.stage import KVCache, Stage
from peerd.server.memory import ActivationMeter
from peerd.server.runtime import ComputeRuntime

__all__ = [
    "CHUNK_TOKENS",
    "Step",
    "backward",
    "backward_cost",
    "compute_step",
    "forward",
    "forward_cost",
    "inference_step",
    "run_steps",
]

# Tokens of one chunk (through one block). Small enough that a chunk takes about as long as a
# decode step through a few blocks, large enough that the dense parts still run as matrix products.
CHUNK_TOKENS = 64


def forward_cost(hidden: torch.Tensor, start: int, end: int) -> float:
    """What a forward (or an inference step) of ``hidden [batch, n, _]`` over ``[start, end)`` costs."""
    return float(hidden.shape[0] * hidden.shape[1] * (end - start))


def backward_cost(hidden: torch.Tensor, start: int, end: int) -> float:
    return BACKWARD_COST_FACTOR * forward_cost(hidden, start, end)


def forward(
    stage: Stage, hidden: torch.Tensor, start: int, end: int, chunk_tokens: int = CHUNK_TOKENS
) -> Generator[float, None, torch.Tensor]:
    """Blocks [start, end) applied to ``hidden``, chunk by chunk; the answer in the request's dtype."""
    x = hidden.to(stage.device, stage.dtype)
    if hidden.shape[0] * hidden.shape[1] <= chunk_tokens:
        with torch.inference_mode():
            out = stage.forward(x, start=start, end=end)
        yield forward_cost(hidden, start, end)
    else:
        out = yield from forward_chunks(stage, x, None, 0, start, end, chunk_tokens)
    return out.to("cpu", hidden.dtype)


def backward(
    stage: Stage,
    meter: ActivationMeter,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    start: int,
    end: int,
    chunk_tokens: int = CHUNK_TOKENS,
) -> Generator[float, None, torch.Tensor]:
    """Gradient w.r.t. ``hidden`` of blocks [start, end), given the gradient w.r.t. their output.

    Activation checkpointing: the forward is recomputed here instead of keeping activations between
    requests, so server memory does not grow with clients in flight. Rows are done a group at a
    time (see ``backward_chunks``), each group tracked by the activation meter on its own.
    """
    x = hidden.to(stage.device, stage.dtype)
    g = grad_output.to(stage.device, stage.dtype)
    grad = yield from backward_chunks(stage, x, g, start, end, chunk_tokens, meter.track)
    return grad.to("cpu", hidden.dtype)


def inference_step(
    stage: Stage,
    hidden: torch.Tensor,
    cache: KVCache,
    position: int,
    start: int,
    end: int,
    chunk_tokens: int = CHUNK_TOKENS,
) -> Generator[float, None, torch.Tensor]:
    """A large prefill, chunk by chunk: the cache is written in place from ``position`` on."""
    x = hidden.to(stage.device, stage.dtype)
    out = yield from forward_chunks(stage, x, cache, position, start, end, chunk_tokens)
    return out.to("cpu", hidden.dtype)


@dataclass
class Step:
    """One session's step as queued for a batch: its input, cache, position and block range."""

    hidden: torch.Tensor  # [batch, n, hidden_size], as received
    cache: KVCache
    position: int
    start: int
    end: int
    ran: tuple[float, float] = (0.0, 0.0)  # perf_counter when its forward started and ended (tracing)


def run_steps(stage: Stage, steps: list[Step]) -> list[torch.Tensor | ValueError]:
    """Steps of several sessions over the same blocks as one forward (see ``forward_batch``).

    A lone step runs through :meth:`Stage.forward` itself, exactly as it would unbatched.
    """
    started = time.perf_counter()
    try:
        return _run_steps(stage, steps)
    finally:
        ran = (started, time.perf_counter())
        for step in steps:
            step.ran = ran


def _run_steps(stage: Stage, steps: list[Step]) -> list[torch.Tensor | ValueError]:
    start, end = steps[0].start, steps[0].end
    if any((s.start, s.end) != (start, end) for s in steps):
        raise ValueError("steps of one batch must run the same blocks")
    with torch.inference_mode():
        if len(steps) == 1:
            step = steps[0]
            try:
                x = step.hidden.to(stage.device, stage.dtype)
                out = stage.forward(x, cache=step.cache, position=step.position, start=start, end=end)
            except ValueError as exc:
                return [exc]
            return [out.to("cpu", step.hidden.dtype)]
        inputs = [StepInput(s.hidden.to(stage.device, stage.dtype), s.cache, s.position) for s in steps]
        results = forward_batch(stage, inputs, start, end)
    return [
        r if isinstance(r, ValueError) else r.to("cpu", s.hidden.dtype) for r, s in zip(results, steps, strict=True)
    ]


async def compute_step(
    runtime: ComputeRuntime,
    stage: Stage,
    step: Step,
    owner: str,
    key: Hashable,
    *,
    open_sessions: int | None = None,
    member: Hashable | None = None,
) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """A session's step on ``runtime``: batched with ready steps of the same ``key`` and blocks, or
    chunked when large. Also returns when its forward started and ended on the compute thread
    (None when chunked: its chunks interleave with other work). ``open_sessions``: the sessions of
    ``key`` that could step now, the most a batch waits for; ``member``: the session (its wave, see
    runtime.py)."""
    hidden, start, end = step.hidden, step.start, step.end
    if hidden.shape[0] * hidden.shape[1] > CHUNK_TOKENS:
        chunks = lambda: inference_step(stage, hidden, step.cache, step.position, start, end)  # noqa: E731
        chunked: torch.Tensor = await runtime.run_chunks(chunks, owner)
        return chunked, None
    runner = lambda steps: run_steps(stage, steps)  # noqa: E731
    out: torch.Tensor = await runtime.run_step(
        step,
        runner,
        (key, start, end),
        owner,
        cost=forward_cost(hidden, start, end),
        most=open_sessions,
        member=member,
    )
    return out, step.ran
