"""Inference handlers: stateful sessions (one stream each, a KV cache per session), and the push
streams through which the previous span's peer hands a session its steps (push.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch

from peerd.rpc.tensors import from_wire
from peerd.server.compute import Step, compute_step
from peerd.server.frames import result_to_wire, send_frame
from peerd.server.push import accept_push, link_of
from peerd.server.servicer import ServicerBase
from peerd.server.sessions import ServerSession, chunked_length
from peerd.server.validation import (
    check_hidden,
    check_open,
    check_range,
    check_step,
)
from protocols import (
    ErrorCode,
    InferenceClose,
    InferenceLink,
    InferenceOpen,
    InferenceOpened,
    InferencePush,
    InferencePushed,
    InferenceStep,
    InferenceStepResult,
    ProtocolError,
    WireTensor,
    frame_parts,
    input_digest,
)

__all__ = ["InferenceHandlers"]

logger = logging.getLogger(__name__)


class InferenceHandlers(ServicerBase):
    """The ``inference`` and ``push`` stream handlers of a peer."""

    # --- inference (stateful, one stream per session) --------------------------------------------

    async def rpc_inference(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first = await self._read(reader)
            if isinstance(first, InferenceStep):
                raise ProtocolError(
                    ErrorCode.UNKNOWN_SESSION, "no session is open on this stream: send inference_open first"
                )
            if not isinstance(first, InferenceOpen):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected inference_open, got {type(first).__name__}"
                )
            session = await self._open_session(owner, first)
            session.writer = writer
            try:
                await self._send(writer, InferenceOpened(session.session_id, session.reserved_tokens))
                await self._session_loop(session, first, reader, writer)
            finally:
                self.table.close(session)
                self.runtime.forget(session.session_id)
                await self.pusher.release(session)

        await self._serve("inference", stream_info, reader, writer, body)

    async def _open_session(self, owner: str, request: InferenceOpen) -> ServerSession:
        if self.draining:
            raise ProtocolError(ErrorCode.DRAINING, "peer is leaving the swarm; open the session elsewhere")
        check_range(self.stage, request.start, request.end)
        if request.session_id in self.sessions or request.session_id in self._opening:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "session id already in use; pick a fresh random id")
        await self.table.make_session_room(self.limits.max_sessions)
        check_open(
            request,
            self.limits,
            open_sessions=sum(self._owner_sessions.values()),
            owner_sessions=self._owner_sessions[owner],
        )
        if request.batch_size * request.max_length > self.budget.session_cap_tokens:
            raise ProtocolError(
                ErrorCode.CACHE_FULL,
                f"a session may hold at most {self.budget.session_cap_tokens} cache tokens (batch x length) here",
            )
        stage, batch, length = self.stage, request.batch_size, chunked_length(1, request.max_length)
        tokens = batch * length  # the first chunk: the rest is reserved as the session grows
        await self.table.reserve(tokens)
        self._owner_sessions[owner] += 1  # counted now: concurrent opens must not all pass the check
        self._opening.add(request.session_id)
        try:
            cache = await self.runtime.run(lambda: stage.allocate_cache(batch, length), owner)
        except BaseException:
            self.budget.release(tokens)
            self.table.release_owner(owner)
            raise
        finally:
            self._opening.discard(request.session_id)
        session = ServerSession(
            session_id=request.session_id,
            owner=owner,
            start=request.start,
            end=request.end,
            batch_size=request.batch_size,
            max_length=request.max_length,
            cache=cache,
            reserved_tokens=tokens,
            response_compression=request.response_compression,
        )
        self.sessions[session.session_id] = session
        self.metrics.sessions_opened.inc()
        self.table.update_gauges()
        return session

    async def _grow(self, session: ServerSession, needed: int) -> None:
        """Reserve and allocate cache up to ``needed`` positions (a chunk at a time), or CACHE_FULL."""
        length = chunked_length(needed, session.max_length)
        extra = session.batch_size * (length - session.cache.max_length)
        await self.table.reserve(extra)
        session.reserved_tokens += extra  # charged now: a close during the copy releases it
        stage, cache = self.stage, session.cache
        session.cache = await self.runtime.run(lambda: stage.grow_cache(cache, length), session.owner)

    async def _session_loop(
        self,
        session: ServerSession,
        opened: InferenceOpen,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            try:
                msg = await self._read(reader, self.limits.session_idle_timeout_s)
                read_at = time.perf_counter()
            except TimeoutError:
                if time.monotonic() - session.last_active < self.limits.session_idle_timeout_s:
                    continue  # quiet on this stream, but stepping on a push stream
                raise ProtocolError(
                    ErrorCode.SESSION_EXPIRED,
                    f"session idle for {self.limits.session_idle_timeout_s:.0f}s; its cache was freed",
                ) from None
            if isinstance(msg, InferenceClose):
                return
            if isinstance(msg, InferenceLink):
                await self.pusher.relink(session, link_of(msg))
                continue
            if not isinstance(msg, InferenceStep):
                await self._send_error(
                    writer,
                    ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"expected inference_step, got {type(msg).__name__}"),
                )
                continue
            if session.evicted:  # evicted while this step was on its way: the stream is closed
                return
            session.busy = True  # from here to the answer, never evicted
            try:
                await self._serve_step(session, msg, writer, read_at)
            finally:
                session.busy = False

    async def _serve_step(
        self, session: ServerSession, msg: InferenceStep, writer: asyncio.StreamWriter, read_at: float
    ) -> None:
        async with session.lock:
            try:
                hidden = self._check_step(session, msg.hidden, msg.position)
            except ProtocolError as exc:
                await self._send_error(writer, exc)  # bad step: answer it, keep the session
                return
            await self._run_step(session, hidden, msg.position, msg.step_id, read_at=read_at)

    def _check_step(self, session: ServerSession, wire: WireTensor, position: int) -> torch.Tensor:
        hidden = from_wire(wire)
        check_hidden(hidden, self.stage, self.limits, batch_size=session.batch_size)
        check_step(position, hidden.shape[1], length=session.length, max_length=session.max_length)
        return hidden

    async def _run_step(
        self,
        session: ServerSession,
        hidden: torch.Tensor,
        position: int,
        step_id: int,
        digest: bytes = b"",
        *,
        read_at: float | None = None,
    ) -> None:
        """Compute a checked step, push its output to the successor (if linked), answer the client.

        ``read_at``: when the step's frame was read (its latency and a HopTracer's first checkpoint).
        """
        started, n_tokens = read_at or time.perf_counter(), hidden.shape[1]
        if position + n_tokens > session.cache.max_length:
            await self._grow(session, position + n_tokens)  # CACHE_FULL ends the session
        compute_started = time.perf_counter()
        step = Step(hidden, session.cache, position, session.start, session.end)
        out, ran = await compute_step(
            self.runtime,
            self.stage,
            step,
            session.owner,
            key=id(self),
            open_sessions=len(self.sessions),
            member=session.session_id,
        )
        resumed = time.perf_counter()
        compute_ms = (resumed - compute_started) * 1e3
        if self.step_delay_s:
            await asyncio.sleep(self.step_delay_s)
        session.length = position + n_tokens
        session.steps += 1
        wire = result_to_wire(out, session.response_compression)
        pushed = await self.pusher.push(session, wire, position, step_id)
        assert session.writer is not None  # set when the session opened
        result = InferenceStepResult(wire, step_id, compute_ms, pushed, digest)
        frame = frame_parts([result], self.limits.max_frame_bytes)
        encoded = time.perf_counter()
        phase = "decode" if n_tokens == 1 else "prefill"
        try:
            await send_frame(session.writer, frame, self.limits, self.metrics)
        finally:  # bookkeeping after the answer is on its way (it runs with cold caches after a forward)
            session.stepped(n_tokens * session.batch_size, time.monotonic())
            self.metrics.tokens_of[phase].inc(n_tokens * session.batch_size)
        written = time.perf_counter()
        self.metrics.step_latency_of[phase].observe(written - started)
        if self.tracer is not None and ran is not None:
            marks = (started, compute_started, *ran, resumed, encoded, written)
            self.tracer.record_server(session.session_id, step_id, marks)

    # --- push: the previous span's peer hands us a session's steps (push.py) ---------------------

    async def rpc_push(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            bound: ServerSession | None = None  # a push stream serves one session
            try:
                while True:
                    try:
                        msg = await self._read(reader, self.limits.session_idle_timeout_s)
                    except TimeoutError:
                        if bound is not None and bound.session_id in self.sessions:
                            continue  # the session lives (its client paused): so does its push stream
                        raise
                    session = accept_push(msg, owner, self.sessions, bound)
                    assert isinstance(msg, InferencePush)  # accept_push checked it
                    if bound is None:
                        bound, session.push_from = session, owner
                    async with session.lock:
                        hidden = self._check_step(session, msg.hidden, msg.position)  # refused: pusher falls back
                        await self._send(writer, InferencePushed(msg.step_id))
                        session.busy = True
                        try:
                            digest = input_digest(msg.hidden, msg.position)  # the client checks the pusher with it
                            await self._run_step(session, hidden, msg.position, msg.step_id, digest)
                        finally:
                            session.busy = False
            finally:
                if bound is not None and bound.push_from == owner:
                    bound.push_from = ""

        await self._serve("push", stream_info, reader, writer, body)
