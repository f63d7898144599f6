"""Training through the swarm, the async engine: remote blocks forward and backward, pipelined in micro-batches.

:class:`RemotePipeline` splits a batch of hidden states into micro-batches and runs them
concurrently (GPipe): while micro-batch 2 is on the first peer, micro-batch 1 is already on the
second. Each micro-batch draws its own route in proportion to peer throughput
(``Router.plan_load_balanced``), so replicas share the load and a slow peer only slows the
micro-batches that drew it. The client keeps every stage's *input* hidden states (a
:class:`PipelineTrace`); ``backward`` sends the gradient back through the same stages in reverse,
each peer recomputing its forward from those inputs (servers keep nothing between requests:
activation checkpointing at the network boundary). A stage whose peer fails is retried on another
peer from the saved inputs of that stage alone; the peer is banned for a while.

``peerd.client.autograd.RemoteBlocks`` wraps it as a differentiable ``nn.Module``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from peerd.client.compression import CompressionChoice, hop_compression
from peerd.client.router import Router
from peerd.client.routing import Span
from peerd.model.config import ModelConfig
from peerd.rpc.errors import NoRouteError, PeerdClientError, PeerError, PeerUnavailable, worth_failover
from peerd.rpc.transport import PeerClient
from peerd.swarm.records import ServerRecord

__all__ = [
    "PipelineClient",
    "PipelineTrace",
    "RemotePipeline",
    "StageCall",
    "StageInput",
    "bubble_fraction",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StageInput:
    """What a micro-batch sent to one stage: the span (peer and blocks) and its input hidden states."""

    span: Span
    hidden: Tensor  # [micro_batch, n, hidden_size], the input of blocks [span.start, span.end)


@dataclass(frozen=True)
class StageCall:
    """One remote call as the client saw it, for timelines and the bubble fraction."""

    micro_batch: int
    phase: str  # "forward" or "backward"
    peer_id: str
    start: int
    end: int
    sent_at: float  # time.perf_counter() when the request went out
    done_at: float  # when the answer (or the failure) came back
    ok: bool


@dataclass
class PipelineTrace:
    """Everything ``backward`` needs from ``forward``: per micro-batch, the inputs of each stage in order."""

    stages: list[list[StageInput]]  # [micro_batch][stage]
    rows: list[int]  # rows (batch entries) of each micro-batch, in order
    calls: list[StageCall] = field(default_factory=list)
    retries: int = 0  # stage calls that failed and were redone elsewhere

    def saved_bytes(self) -> int:
        """Client memory held for backward: every stage input of every micro-batch."""
        return sum(s.hidden.numel() * s.hidden.element_size() for mb in self.stages for s in mb)


def bubble_fraction(calls: Sequence[StageCall], wall_s: float, peers: Sequence[str] | None = None) -> float:
    """Share of peer-time the pipeline left idle: ``1 - sum(busy) / (peers * wall)``.

    A peer counts as busy while at least one of our requests is outstanding on it (the union of
    its request intervals, network included), so this is the bubble as the client sees it. With
    ``peers`` omitted, every peer that appears in ``calls`` counts.
    """
    if wall_s <= 0:
        return 0.0
    by_peer: dict[str, list[tuple[float, float]]] = {p: [] for p in peers or ()}
    for call in calls:
        by_peer.setdefault(call.peer_id, []).append((call.sent_at, call.done_at))
    if not by_peer:
        return 0.0
    busy = 0.0
    for intervals in by_peer.values():
        intervals.sort()
        cur_start, cur_end = None, None
        for s, e in intervals:
            if cur_end is None or s > cur_end:
                if cur_start is not None and cur_end is not None:
                    busy += cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        if cur_start is not None and cur_end is not None:
            busy += cur_end - cur_start
    return max(0.0, 1.0 - busy / (len(by_peer) * wall_s))


class PipelineClient(Protocol):
    """What the pipeline uses of a client (``SwarmClient`` has it): a router, a transport, settings."""

    @property
    def router(self) -> Router: ...
    @property
    def peers(self) -> PeerClient: ...
    @property
    def compression(self) -> CompressionChoice: ...
    @property
    def config(self) -> ModelConfig: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def max_retries(self) -> int: ...


class _Budget:
    """Failed stage calls one micro-batch may still absorb before giving up."""

    def __init__(self, max_failures: int) -> None:
        self.left = max_failures
        self.used = 0

    def spend(self, what: str, exc: Exception) -> None:
        self.used += 1
        self.left -= 1
        if self.left < 0:
            raise PeerdClientError(f"{what} failed {self.used} times; last error: {exc}") from exc


class RemotePipeline:
    """Forward and backward of hidden states through the swarm's blocks ``[start, end)``, micro-batched.

    ``micro_batches`` is how many pieces a batch is split into along its first axis (fewer when
    the batch is smaller); ``max_in_flight`` caps how many run at once (1 = one after the other,
    no overlap). ``rng`` draws the routes (seed it for reproducible routes). A micro-batch gives up
    with :class:`PeerdClientError` after ``max_failures`` failed stage calls; non-retryable peer
    errors (a malformed request, say) are raised at once.
    """

    def __init__(
        self,
        client: PipelineClient,
        *,
        start: int = 0,
        end: int | None = None,
        micro_batches: int = 4,
        max_in_flight: int | None = None,
        max_failures: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        end = client.num_blocks if end is None else end
        if not 0 <= start < end <= client.num_blocks:
            raise ValueError(f"blocks [{start}, {end}) are not a non-empty part of [0, {client.num_blocks})")
        if micro_batches < 1 or (max_in_flight is not None and max_in_flight < 1):
            raise ValueError("micro_batches and max_in_flight must be >= 1")
        self.client = client
        self.start = start
        self.end = end
        self.micro_batches = micro_batches
        self.max_in_flight = max_in_flight
        self.max_failures = client.max_retries + 2 if max_failures is None else max_failures
        self.rng = rng or random.Random()

    # --- public API --------------------------------------------------------------------------------

    async def forward(self, hidden: Tensor) -> tuple[Tensor, PipelineTrace]:
        """Output hidden states of blocks ``[start, end)`` for ``hidden [batch, n, hidden_size]``, and the trace.

        The output and the trace's saved inputs are CPU tensors whatever ``hidden``'s device.
        """
        if hidden.dim() != 3 or hidden.shape[2] != self.client.config.hidden_size or 0 in hidden.shape:
            raise ValueError(
                f"hidden states must be [batch, n, {self.client.config.hidden_size}] with batch, n >= 1, "
                f"got {tuple(hidden.shape)}"
            )
        # on the CPU: the wire takes them from there, and a GPU client's memory is spared the saved inputs
        cpu = hidden.detach().to("cpu")
        pieces = [p.contiguous() for p in cpu.tensor_split(min(self.micro_batches, hidden.shape[0]))]
        trace = PipelineTrace(stages=[[] for _ in pieces], rows=[p.shape[0] for p in pieces])
        servers = await self.client.router.servers()
        outs = await self._gather(
            [functools.partial(self._forward_micro_batch, i, piece, servers, trace) for i, piece in enumerate(pieces)]
        )
        return torch.cat(outs, dim=0), trace

    async def backward(self, trace: PipelineTrace, grad_output: Tensor) -> Tensor:
        """Gradient w.r.t. the ``forward`` input, given the gradient w.r.t. its output (same shape)."""
        if grad_output.shape[0] != sum(trace.rows):
            raise ValueError(f"grad_output has batch {grad_output.shape[0]}, the forward had {sum(trace.rows)}")
        grads = [g.contiguous() for g in torch.split(grad_output.detach(), trace.rows, dim=0)]
        outs = await self._gather(
            [functools.partial(self._backward_micro_batch, i, trace, g) for i, g in enumerate(grads)]
        )
        return torch.cat(outs, dim=0)

    # --- micro-batches ------------------------------------------------------------------------------

    async def _gather(self, jobs: list[Callable[[], Coroutine[Any, Any, T]]]) -> list[T]:
        """Run the micro-batches concurrently, at most ``max_in_flight`` at a time, results in order.

        Jobs are factories: a coroutine is created only once its turn comes, so one that never
        starts (the group was cancelled by another's failure) leaves nothing un-awaited behind.
        """
        limit = asyncio.Semaphore(self.max_in_flight or len(jobs))

        async def limited(job: Callable[[], Coroutine[Any, Any, T]]) -> T:
            async with limit:
                return await job()

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(limited(job)) for job in jobs]
        except BaseExceptionGroup as group:
            # one failed micro-batch fails the pass (the others are cancelled): raise its error as
            # itself, so callers catch PeerError / PeerdClientError rather than an exception group
            raise group.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _forward_micro_batch(
        self, index: int, hidden: Tensor, servers: dict[str, ServerRecord], trace: PipelineTrace
    ) -> Tensor:
        budget = _Budget(self.max_failures)
        stages, out = await self._forward_range(index, hidden, self.start, self.end, budget, trace, servers)
        trace.stages[index] = stages
        assert out is not None  # need_output=True always returns the output
        return out

    async def _backward_micro_batch(self, index: int, trace: PipelineTrace, grad: Tensor) -> Tensor:
        budget = _Budget(self.max_failures)
        for stage in reversed(trace.stages[index]):
            grad = await self._backward_stage(index, stage, grad, budget, trace)
        return grad

    # --- stages, with retries ---------------------------------------------------------------------

    async def _forward_range(
        self,
        index: int,
        hidden: Tensor,
        start: int,
        end: int,
        budget: _Budget,
        trace: PipelineTrace,
        servers: dict[str, ServerRecord] | None = None,
        *,
        need_output: bool = True,
    ) -> tuple[list[StageInput], Tensor | None]:
        """Run ``hidden`` through blocks [start, end); returns each stage's input and the output.

        A failed stage is redone from its own input on a freshly drawn route for the blocks left.
        Without ``need_output`` the last stage is planned but not called (its input is all a
        backward needs), and the output is None.
        """
        stages: list[StageInput] = []
        route = await self._plan(start, end, servers)
        x, block = hidden, start
        while block < end:
            span = route[0]
            if span.end == end and not need_output:
                stages.append(StageInput(span, x))
                return stages, None
            try:
                y = await self._call(index, "forward", span, trace, self.client.peers.forward, x)
            except (PeerUnavailable, PeerError) as exc:
                self._on_failure(span, exc, budget, f"micro-batch {index} forward through {span}", trace)
                route = await self._plan(block, end, refresh=True)
                continue
            stages.append(StageInput(span, x))
            x, block, route = y, span.end, route[1:]
        return stages, x

    async def _backward_stage(
        self, index: int, stage: StageInput, grad: Tensor, budget: _Budget, trace: PipelineTrace
    ) -> Tensor:
        """Gradient w.r.t. ``stage.hidden`` given the gradient w.r.t. the stage's output.

        First on the peer that ran the forward. If it fails, the stage's blocks are re-planned
        (possibly over several peers): their intermediate inputs are recomputed by forward calls
        from the saved stage input, then the gradient goes back through them in reverse. A single
        replacement peer for the whole stage needs no forward call at all.
        """
        span = stage.span
        try:
            return await self._call(index, "backward", span, trace, self.client.peers.backward, stage.hidden, grad)
        except (PeerUnavailable, PeerError) as exc:
            self._on_failure(span, exc, budget, f"micro-batch {index} backward through {span}", trace)
        sub_stages, _ = await self._forward_range(
            index, stage.hidden, span.start, span.end, budget, trace, need_output=False
        )
        for sub in reversed(sub_stages):
            grad = await self._backward_stage(index, sub, grad, budget, trace)
        return grad

    async def _call(
        self,
        index: int,
        phase: str,
        span: Span,
        trace: PipelineTrace,
        rpc: Callable[..., Coroutine[Any, Any, Tensor]],
        *tensors: Tensor,
    ) -> Tensor:
        sent_at = time.perf_counter()
        ok = False
        try:
            codec = hop_compression(self.client.compression, span.record)
            out = await rpc(span.peer_id, *tensors, span.start, span.end, codec)
            ok = True
            self.client.router.succeeded(span.peer_id)
            return out
        finally:
            trace.calls.append(
                StageCall(index, phase, span.peer_id, span.start, span.end, sent_at, time.perf_counter(), ok)
            )

    def _on_failure(
        self, span: Span, exc: PeerUnavailable | PeerError, budget: _Budget, what: str, trace: PipelineTrace
    ) -> None:
        if not worth_failover(exc):
            raise exc
        trace.retries += 1
        # Several micro-batches in flight on a dead peer all fail at once: one ban, not one per call
        # (each repeat would double the ban's length).
        router = self.client.router
        if not router.bans.is_banned(span.peer_id):
            router.ban(span.peer_id, reason=str(exc))
        logger.warning("%s failed (%s); retrying that stage elsewhere", what, exc)
        budget.spend(what, exc)

    async def _plan(
        self, start: int, end: int, servers: dict[str, ServerRecord] | None = None, refresh: bool = False
    ) -> list[Span]:
        """A load-balanced route for [start, end), waiting up to the router's ``route_wait_s`` for one."""
        router = self.client.router
        deadline = time.monotonic() + router.route_wait_s
        while True:
            try:
                return await router.plan_load_balanced(start, end, rng=self.rng, refresh=refresh, servers=servers)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.5)
            refresh = True
