"""Inference sessions over a chain of peers, with failover that keeps the output identical.

Each span of the route remembers the inputs it was sent. When its peer fails (stream error,
timeout, or an error code meaning "not here"), the session bans that peer, re-plans just that
span's blocks (possibly over several peers), opens sessions on the replacements, replays the stored
inputs through them to rebuild their KV caches, and continues. Spans before and after the failed
one are untouched, because the replacement produces the same hidden states.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from peerd.client.compression import CompressionChoice, hop_compression
from peerd.client.deadlines import StepDeadline
from peerd.client.pushing import PushedOtherwise, push_pays, pushed_as_reported, route_links
from peerd.client.reservations import BUSY_WAIT_S, busy_backoff_s
from peerd.client.router import Router
from peerd.client.routing import Span
from peerd.client.verify import SpotChecker
from peerd.rpc.errors import (
    NoRouteError,
    PeerdClientError,
    PeerError,
    PeerTimedOut,
    PeerUnavailable,
    RequestTooLargeError,
    SwarmBusyError,
    worth_failover,
)
from peerd.rpc.transport import InferenceStream, PeerClient
from protocols import Compression

__all__ = ["InferenceSession"]

logger = logging.getLogger(__name__)
REPLACEABLE_RECHECK_S = 5.0  # how long a span's "someone else serves these blocks" answer is reused


@dataclass
class _SpanState:
    """One hop of a live session: the span, its open stream, and every input it has been sent."""

    span: Span
    stream: InferenceStream | None = None
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, hidden [b, n, h])
    outputs: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # what the peer answered to each
    deadline: StepDeadline = field(default_factory=StepDeadline)  # this peer's own step times: hang detection
    answered: bool = False  # has answered a step (its first answer is always spot-checked)
    replaceable: bool = True  # as of ``replaceable_at``: the last view has a route for its blocks without it
    replaceable_at: float = -math.inf

    def replay_inputs(self) -> torch.Tensor | None:
        """The effective input sequence now in the peer's cache (later steps overwrite rewinds)."""
        return _effective(self.history)

    def replay_outputs(self) -> torch.Tensor | None:
        """The peer's answers for the same positions (what spot checks compare)."""
        return _effective(self.outputs)

    def record(self, position: int, hidden: torch.Tensor, out: torch.Tensor) -> None:
        self.history.append((position, hidden))
        self.outputs.append((position, out))


class _Refused(Exception):
    """A span's peer refused the session the client opened without waiting (its first answer)."""

    def __init__(self, span: Span, exc: PeerUnavailable | PeerError) -> None:
        super().__init__(str(exc))
        self.span, self.exc = span, exc


def _effective(steps: list[tuple[int, torch.Tensor]]) -> torch.Tensor | None:
    buf: torch.Tensor | None = None
    for position, hidden in steps:
        buf = hidden if buf is None or position == 0 else torch.cat([buf[:, :position], hidden], dim=1)
    return buf


class InferenceSession:
    """A stateful session through the swarm: ``step()`` hidden states, get hidden states back.

    Use as ``async with client.inference_session(max_length=...) as session``. ``position`` is the
    index of the first token of each step; it defaults to "right after what was sent so far".
    The session plans and bans through ``router``, talks to peers through ``peers``, lets
    ``checker`` spot-check spans, and waits up to ``failover_timeout_s`` for a replacement peer.
    """

    def __init__(
        self,
        router: Router,
        peers: PeerClient,
        *,
        max_length: int,
        batch_size: int = 1,
        compression: CompressionChoice = Compression.NONE,
        failover_timeout_s: float = 30.0,
        checker: SpotChecker | None = None,
        busy_wait_s: float = BUSY_WAIT_S,
        push: bool | None = False,
    ) -> None:
        self.router = router
        # peers push each step's output to the next span's peer (server/push.py); None: decided at
        # the first link, by the route's round trips (pushing.push_pays)
        self.push = push
        self._step_seq = 0
        self._no_push_from: set[str] = set()  # peers caught pushing other states than they reported
        self.peers = peers
        self.compression = compression
        self.failover_timeout_s = failover_timeout_s
        self.busy_wait_s = busy_wait_s
        self.checker = checker
        self.max_length = max_length
        self.batch_size = batch_size
        self.length = 0
        self.spans: list[_SpanState] = []
        self.stalls_s: list[float] = []  # how long each failover stalled the session
        self.hop_ms: list[list[float]] = []  # per step, per span: client-side wall time of the hop
        self.hop_compute_ms: list[list[float]] = []  # per step, per span: server compute time reported
        self._session_ids: set[bytes] = set()
        # set when a spot check replaced wrong outputs of earlier steps: (first position, corrected
        # last-span outputs from there on), for the caller to re-sample its tokens (take_correction)
        self._correction: tuple[int, torch.Tensor] | None = None

    @property
    def route(self) -> list[Span]:
        return [s.span for s in self.spans]

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open a session on every span of a route, all at once, without waiting for the peers'
        answers: over long links each open is a round trip, and one after another they added one
        per span to the time to first token. Each peer's answer is read before its first result
        (``InferenceStream.confirmed``), so the first step pays no round trip of its own for it.

        A span refused at open (a full peer, or one that cannot serve; here, or at the first step)
        is routed around and the whole route planned again, its open streams closed: nothing has
        run yet, and patching only the refused span's blocks gives longer, slower routes that hold
        their cache longer (under load the swarm simulator failed 11% of requests that way against
        0.8%: docs/scale.md, finding 8). Gives up after ``failover_timeout_s`` of this."""
        await self._open_route(time.monotonic() + self.failover_timeout_s)

    async def _open_route(self, deadline: float) -> None:
        while True:
            route = await self._first_route()
            self.spans = [_SpanState(span) for span in route]
            errors: list[tuple[Span, BaseException]] = []
            for state, result in zip(self.spans, await self._open_streams(route), strict=True):
                if isinstance(result, BaseException):
                    errors.append((state.span, result))
                else:
                    state.stream = result
            if not errors:
                break
            await self._refused(errors, deadline)
        await self._link()

    async def _refused(self, errors: list[tuple[Span, BaseException]], deadline: float) -> None:
        """Spans refused their sessions: close the route's streams and plan around those peers
        (raises what no other peer would take, or when ``deadline`` has passed)."""
        await self.close()
        failed: list[tuple[Span, PeerUnavailable | PeerError]] = []
        for span, exc in errors:
            if not isinstance(exc, (PeerUnavailable, PeerError)) or not worth_failover(exc):
                raise exc  # a request no peer would take, a bug, a cancellation: as it is
            failed.append((span, exc))
        for span, exc in failed:
            self.router.route_around(span.peer_id, exc)
        if time.monotonic() >= deadline:
            first = failed[0][1]
            why = f"could not open a route within {self.failover_timeout_s:.0f}s: {first}"
            raise PeerdClientError(why) from first

    async def _first_route(self) -> list[Span]:
        """The opening route. If nobody can serve some blocks right now (a replica restarting, its
        servers banned for a moment after failing), keep looking for ``failover_timeout_s`` with a
        fresh DHT view each second, as a failover would, then raise NoRouteError. If they are served
        but every such peer is out of cache (SwarmBusyError), wait up to ``busy_wait_s`` with backoff."""
        deadline = time.monotonic() + self.failover_timeout_s
        busy_deadline = time.monotonic() + max(self.failover_timeout_s, self.busy_wait_s)
        refresh, busy_attempts = False, 0
        while True:
            try:
                return await self.router.plan_inference(
                    0, self.router.num_blocks, self.max_length * self.batch_size, refresh=refresh
                )
            except SwarmBusyError:
                # served but full: wait for sessions to close, backing off (reservations.py)
                if time.monotonic() >= busy_deadline:
                    raise
                refresh = True
                wait_s = busy_backoff_s(busy_attempts, self.router.rng)
                busy_attempts += 1
                await asyncio.sleep(min(wait_s, max(0.0, busy_deadline - time.monotonic())))
            except NoRouteError:
                why = self.router.explain_no_route(0, self.router.num_blocks, self.max_length, self.batch_size)
                if isinstance(why, RequestTooLargeError) or time.monotonic() >= deadline:
                    raise why from None  # too large: waiting would not help
                if not refresh and self.router.view_age_s > self.router.view_refresh_s:
                    refresh = True  # planned from an old view (read again in the background): read it now
                    continue
                refresh = True
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    async def close(self) -> None:
        for state in self.spans:
            if state.stream is not None:
                self.router.cache_book.release(state.span.peer_id, self.max_length * self.batch_size)
                await state.stream.close()
                state.stream = None

    async def _open_streams(self, route: list[Span]) -> list[InferenceStream | BaseException]:
        """Open a stream on each span concurrently, unconfirmed: each span's stream, or why it did
        not open. If this is cancelled, the streams that did open are closed (their peers free the
        cache)."""
        tasks = [asyncio.ensure_future(self._open_stream(span, confirm=False)) for span in route]
        try:
            await asyncio.wait(tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            for span, task in zip(route, tasks, strict=True):
                if not task.cancelled() and task.exception() is None:
                    self.router.cache_book.release(span.peer_id, self.max_length * self.batch_size)
                    await task.result().close()
            raise
        return [task.exception() or task.result() for task in tasks]

    async def _open_stream(self, span: Span, *, confirm: bool = True) -> InferenceStream:
        await self.router.check_peer(span)
        session_id = os.urandom(16)
        stream = await self.peers.open_inference(
            span.peer_id,
            session_id=session_id,
            start=span.start,
            end=span.end,
            max_length=self.max_length,
            batch_size=self.batch_size,
            compression=hop_compression(self.compression, span.record),
            confirm=confirm,
        )
        # the peer's record will not show this cache taken until its next announce; until then this
        # client's planner counts it (released when the session closes or fails over)
        self.router.cache_book.take(span.peer_id, self.max_length * self.batch_size)
        return stream

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Send hidden states [batch, n, hidden] through every span; returns the last span's output."""
        deadline = time.monotonic() + self.failover_timeout_s
        while True:
            try:
                return await self._step(hidden, position)
            except _Refused as refused:  # the first step found a span's session refused: as at open
                logger.warning("span %s refused its session (%s); planning the route again", refused.span, refused.exc)
                self._next_step_id()  # nothing of the abandoned step is read again
                await self._refused([(refused.span, refused.exc)], deadline)
                await self._open_route(deadline)

    async def _step(self, hidden: torch.Tensor, position: int | None) -> torch.Tensor:
        position = self.length if position is None else position
        if hidden.ndim != 3 or hidden.shape[0] != self.batch_size:
            raise ValueError(f"hidden must be [{self.batch_size}, n, hidden], got {list(hidden.shape)}")
        if not 0 <= position <= self.length or position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"step of {hidden.shape[1]} tokens at position {position} does not fit "
                f"(session holds {self.length}, max_length {self.max_length})"
            )
        x, at = hidden, position  # input of the next span and its position (a correction moves it back)
        timings, computes = [], []
        step_id = self._next_step_id()
        sent = False  # whether span i already has this step's input (pushed to it by span i - 1)
        i, chain_started = 0, time.perf_counter()
        while i < len(self.spans):
            state = self.spans[i]
            started = time.perf_counter()
            try:
                out = await self._hop(state, x, at, step_id, sent, chain_started)
            except PushedOtherwise:  # span i - 1 pushed something else than it reported, or nothing: relay it
                self._no_push_from.add(self.spans[i - 1].span.peer_id)  # its next link is cleared
                await self._link()
                step_id, sent = self._next_step_id(), False  # results of the pushed input are skipped
                continue
            except (PeerUnavailable, PeerError) as exc:
                if state.stream is not None and not state.stream.confirmed and self.length == 0:
                    raise _Refused(state.span, exc) from exc  # refused at open: nothing ran here yet
                if not worth_failover(exc):
                    raise
                logger.warning("span %s failed (%s); failing over", state.span, exc)
                await self._failover(i, exc)
                # from the failed request on: a hang's wait is part of the stall the caller sees
                self.stalls_s.append(time.perf_counter() - started)
                sent, chain_started = False, time.perf_counter()
                continue  # retry the same position of the chain on the replacement span(s)
            state.record(at, x, out)
            self.router.succeeded(state.span.peer_id)
            pushed = state.stream is not None and state.stream.last_pushed
            if not sent and not pushed:  # a push's time is not this peer's alone: keep it out of its speed
                self.router.speeds.observe(
                    state.span.peer_id, state.span.end - state.span.start, x.shape[1], time.perf_counter() - started
                )
            timings.append((time.perf_counter() - started) * 1e3)
            computes.append(state.stream.last_compute_ms if state.stream is not None else 0.0)
            sent = pushed
            first, state.answered = not state.answered, True
            if self.checker is not None and self.checker.should_check(first=first):
                corrected = await self._spot_check(i, position)
                if corrected is not None:
                    replaced, x, at = corrected
                    i, sent, chain_started = i + replaced, False, time.perf_counter()
                    continue
            x = out
            if self._overclaiming(state):
                i += len(await self._leave_overclaiming(i))
                sent, chain_started = False, time.perf_counter()
            else:
                i += 1
        self.hop_ms.append(timings)
        self.hop_compute_ms.append(computes)
        self.length = position + hidden.shape[1]
        if at < position:  # earlier outputs of the last span changed too: tell the caller
            self._correction = (at, x)
        return x[:, position - at :]

    async def _hop(
        self, state: _SpanState, x: torch.Tensor, at: int, step_id: int, sent: bool, chain_started: float
    ) -> torch.Tensor:
        """Span ``state``'s output for this step: sent by us, or (``sent``) pushed to it upstream.

        A peer that stops answering fails over after a multiple of its own step time, not after the
        transport's 30 s; the failover closes the stream, so a late answer is dropped. A pushed hop is
        timed from the start of its push chain, which bounds its own time from above.
        """
        if state.stream is None:
            raise PeerUnavailable(state.span.peer_id, "no open stream")
        tokens = x.shape[1]
        timeout_s = self._step_timeout_s(state, tokens)
        started = chain_started if sent else time.perf_counter()
        if sent:
            try:
                out = await state.stream.receive(step_id, timeout_s)
            except PeerTimedOut:  # span i - 1 said it pushed, yet nothing came: relay before blaming span i
                raise PushedOtherwise from None
        else:
            out = await state.stream.step(x, at, timeout_s, step_id=step_id)
        prev = self.spans[self.spans.index(state) - 1]
        if sent and not pushed_as_reported(prev.stream, state.stream, at):
            logger.warning("span %s pushed other states than it reported; relaying", prev.span)
            raise PushedOtherwise
        state.deadline.observe(tokens, time.perf_counter() - started)
        return out

    def _step_timeout_s(self, state: _SpanState, tokens: int) -> float:
        """How long to wait for ``state``'s answer: its hang deadline (deadlines.py), unless nobody
        else in the last view serves its blocks. Failing over cannot help then, and a lone peer that
        is only slow (other sessions' prefills ahead of this step, a loaded machine) would end the
        session; it gets the transport's own deadline instead."""
        full_s = self.peers.timeout_s
        timeout_s = state.deadline.deadline_s(tokens, full_s)
        return timeout_s if timeout_s >= full_s or self._replaceable(state) else full_s

    def _replaceable(self, state: _SpanState) -> bool:
        """Whether the last view has a route for ``state``'s blocks without its peer (reused for a few seconds)."""
        now = time.monotonic()
        if now - state.replaceable_at >= REPLACEABLE_RECHECK_S:
            state.replaceable = self.router.has_alternative(state.span, self.max_length * self.batch_size)
            state.replaceable_at = now
        return state.replaceable

    def _next_step_id(self) -> int:
        """Step ids grow over the whole session, on every stream: a pushed step carries its id along."""
        self._step_seq += 1
        return self._step_seq

    async def _link(self) -> None:
        """Tell every span its neighbours (push on): who may push into it, and where it pushes to."""
        if self.push is None:
            self.push = push_pays([self.router.rtts_ms.get(s.span.peer_id) for s in self.spans])
        if not self.push:
            return
        links = route_links([(s.span.peer_id, s.stream) for s in self.spans], self._no_push_from)
        for state, link in zip(self.spans, links, strict=True):
            if state.stream is not None:
                with contextlib.suppress(PeerUnavailable):  # a dead stream fails over at its next step
                    await state.stream.link(*link)

    def _overclaiming(self, state: _SpanState) -> bool:
        """Far slower than it claims, and someone else can take its blocks (see claims.py)."""
        cache_tokens = self.max_length * self.batch_size
        return self.router.speeds.overclaims(state.span.record) and self.router.has_alternative(
            state.span, cache_tokens
        )

    async def _leave_overclaiming(self, index: int) -> list[_SpanState]:
        """Move span ``index`` (its answers are good, only slow) to the best other route: failover
        replays its history, so the replacement continues with the same cache."""
        span = self.spans[index].span
        observed = self.router.speeds.observed(span.peer_id) or 0.0
        reason = f"observed {observed:.0f} tokens/s per block, claims {span.record.decode_tokens_per_s:.0f}"
        logger.warning("span %s is overclaiming its speed (%s); moving it", span, reason)
        return await self._failover(index, PeerUnavailable(span.peer_id, reason))

    def take_correction(self) -> tuple[int, torch.Tensor] | None:
        """After ``step``: None, or (first position, the last span's corrected outputs from it on).

        Set when a spot check found that a peer had returned wrong hidden states at earlier steps;
        the session has already replaced that peer and rebuilt every later span's cache, but tokens
        the caller chose from the wrong outputs must be chosen again (``generate`` does this).
        """
        correction, self._correction = self._correction, None
        return correction

    async def _spot_check(self, index: int, position: int) -> tuple[int, torch.Tensor, int] | None:
        """Spot-check span ``index`` over its whole history; on a wrong answer, replace the peer.

        Returns None if its answers stand, else (number of replacement spans, their corrected outputs
        from the first wrong position on, that position): the caller feeds these to the next span,
        which rewinds its cache to that position.
        """
        state = self.spans[index]
        inputs, outputs = state.replay_inputs(), state.replay_outputs()
        assert inputs is not None and outputs is not None  # recorded just before the check
        assert self.checker is not None  # only called after checker.should_check()
        verdict = await self.checker.verify(state.span, inputs, outputs)
        if not verdict.span_peer_wrong:
            return None
        # resend from the first wrong position, and at least the whole current step (which starts at
        # ``position``): the next span needs all of it
        first_bad = min(verdict.first_bad_position or 0, position)
        stall_started = time.perf_counter()
        replacements = await self._failover(index, PeerUnavailable(state.span.peer_id, "failed a spot check"))
        self.stalls_s.append(time.perf_counter() - stall_started)
        corrected = replacements[-1].replay_outputs()
        assert corrected is not None  # the replacements replayed the whole input
        return len(replacements), corrected[:, first_bad:], first_bad

    async def _failover(self, index: int, exc: Exception) -> list[_SpanState]:
        failed = self.spans[index]
        self.router.ban(failed.span.peer_id, reason=str(exc))
        if failed.stream is not None:
            # its session is gone (closed here, or the peer died with it): stop counting its cache,
            # or a client that fails over often would see every peer as full for HOLD_S
            self.router.cache_book.release(failed.span.peer_id, self.max_length * self.batch_size)
            await failed.stream.close()
            failed.stream = None
        replacements = await self._replace_one(failed)
        self.spans[index : index + 1] = replacements
        await self._link()  # before the next step: links travel ahead of any push to the replacements
        return replacements

    async def _replace_one(self, failed: _SpanState) -> list[_SpanState]:
        """Re-plan the failed span's blocks, open replacements and replay its inputs into them.

        Tries the last DHT view first (a read can wait seconds on a hung peer's own DHT node), then
        keeps trying (a fresh DHT view each time, failed replacements banned) until
        ``failover_timeout_s`` runs out, so a peer that joins within that window rescues the
        session (up to ``busy_wait_s`` while those blocks are served but full); after it, raises
        NoRouteError naming the blocks nobody serves. Every RPC has its
        own timeout, so this never hangs.
        """
        deadline = time.monotonic() + self.failover_timeout_s
        busy_deadline = time.monotonic() + max(self.failover_timeout_s, self.busy_wait_s)
        last_error: Exception | None = None
        first, busy_attempts = True, 0
        while True:
            try:
                route = await self.router.plan_inference(
                    failed.span.start,
                    failed.span.end,
                    self.max_length * self.batch_size,
                    refresh=not first,
                    last_view=first,
                )
            except NoRouteError as exc:
                if first:
                    first = False
                    continue  # the last view knew no replacement: read the DHT
                if isinstance(exc, SwarmBusyError) and time.monotonic() < busy_deadline:
                    # served but full: wait for room as an open does, rather than lose the session
                    busy_attempts += 1
                    wait_s = busy_backoff_s(busy_attempts - 1, self.router.rng)
                    await asyncio.sleep(min(wait_s, max(0.0, busy_deadline - time.monotonic())))
                    continue
                if time.monotonic() >= deadline:
                    why = self.router.explain_no_route(
                        failed.span.start, failed.span.end, self.max_length, self.batch_size
                    )
                    if isinstance(why, NoRouteError):
                        why.args = (
                            f"{why} (waited {self.failover_timeout_s:.0f}s for a replacement; last failure: "
                            f"{last_error})",
                        )
                    raise why from last_error
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            first = False
            new_states = [_SpanState(span) for span in route]
            try:
                inputs = failed.replay_inputs()
                for state in new_states:
                    state.stream = await self._open_stream(state.span)
                    if inputs is not None:
                        out = await state.stream.step(inputs, 0, step_id=self._next_step_id())
                        state.record(0, inputs, out)
                        inputs = out
                return new_states
            except (PeerUnavailable, PeerError) as exc:
                if not worth_failover(exc):
                    raise
                last_error = exc
                self.router.route_around(exc.peer_id, exc)
                for state in new_states:
                    if state.stream is not None:
                        await state.stream.close()
                if time.monotonic() >= deadline:
                    raise PeerdClientError(
                        f"could not replace blocks {failed.span.start}:{failed.span.end} within "
                        f"{self.failover_timeout_s:.0f}s: {last_error}"
                    ) from exc
