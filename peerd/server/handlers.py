"""RPC handlers of a peer, one per libp2p stream protocol (see protocols/README.md).

Every handler follows the same shape: read the client's ``Hello``, then its request, validate
everything before any compute, run torch work on the compute runtime, and answer. Any failure is
answered with an ``Error`` frame carrying a code; nothing a client sends can take the peer down,
and one client's bad request never touches another client's state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peerd import __version__
from peerd.model.stage import Stage
from peerd.rpc.hoptrace import HopTracer
from peerd.rpc.tensors import from_wire
from peerd.server.admission import Admission
from peerd.server.compute import Step, compute_step
from peerd.server.compute import backward as compute_backward
from peerd.server.compute import forward as compute_forward
from peerd.server.frames import linger_and_close, read_request, result_to_wire, send_error, send_frame, send_message
from peerd.server.limits import Limits
from peerd.server.memory import ActivationMeter
from peerd.server.metrics import PeerMetrics
from peerd.server.runtime import ComputeRuntime, RuntimeClosed
from peerd.server.sessions import CacheBudget, ServerSession, SessionTable, chunked_length
from peerd.server.validation import check_grad_output, check_hello, check_hidden, check_open, check_range, check_step
from protocols import (
    PROTOCOL_VERSION,
    BackwardRequest,
    BackwardResponse,
    ErrorCode,
    ForwardRequest,
    ForwardResponse,
    InferenceClose,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    ProtocolError,
    frame_parts,
)

__all__ = ["BlockServicer"]

logger = logging.getLogger(__name__)


class BlockServicer:
    """Serves the blocks of one :class:`Stage` over the four stream protocols."""

    def __init__(
        self,
        *,
        stage: Stage,
        model_id: str,
        runtime: ComputeRuntime,
        budget: CacheBudget,
        limits: Limits,
        metrics: PeerMetrics,
        public_name: str = "",
        step_delay_s: float = 0.0,
        allowed_peers: frozenset[str] | None = None,
    ) -> None:
        self.stage = stage
        self.model_id = model_id
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        self.public_name = public_name
        self.step_delay_s = step_delay_s
        self.state = "joining"
        self.draining = False
        self.allowed_peers = allowed_peers  # None = serve anyone (a public swarm)
        self.table = SessionTable(budget, metrics, self._send_error, limits.evict_idle_s)
        self.sessions = self.table.sessions
        self._owner_sessions = self.table.owner_sessions
        self._opening = self.table.opening
        self.admission = Admission(limits.max_inflight_per_peer)  # stateless streams per owner
        self.memory = ActivationMeter(stage.parameters(), stage.device)  # activations of backward requests
        self.tracer: HopTracer | None = None  # records inference steps' checkpoints (benchmarks, tests)

    @property
    def budget(self) -> CacheBudget:
        return self.table.budget

    @budget.setter
    def budget(self, budget: CacheBudget) -> None:  # a block move brings a budget for the new range
        self.table.budget = budget

    # --- plumbing shared by all handlers ---------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, timeout_s: float | None = None) -> Message:
        return await read_request(reader, self.limits, self.metrics, timeout_s)

    async def _send(self, writer: asyncio.StreamWriter, msg: Message) -> None:
        await send_message(writer, msg, self.limits, self.metrics)

    async def _send_error(self, writer: asyncio.StreamWriter, exc: ProtocolError) -> None:
        await send_error(writer, exc, self.limits, self.metrics)

    async def _expect_hello(self, reader: asyncio.StreamReader) -> None:
        check_hello(await self._read(reader), self.model_id)

    async def _serve(
        self,
        rpc: str,
        stream_info: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        """Run one handler body with uniform error answers, metrics and stream cleanup."""
        owner = str(stream_info.peer_id) if stream_info is not None else ""
        started = time.perf_counter()
        outcome = "ok"
        counted = False
        try:
            # Both checks come before reading anything, so a refused client costs one small write.
            if self.allowed_peers is not None and owner not in self.allowed_peers:
                raise ProtocolError(ErrorCode.NOT_ALLOWED, "this is a private peer; your peer id is not allowed")
            if rpc != "inference":
                await self.admission.admit(owner)
                counted = True
            await self._expect_hello(reader)
            await body(owner, reader, writer)
        except ProtocolError as exc:
            outcome = exc.code.name.lower()
            await self._send_error(writer, exc)
        except EOFError:
            outcome = "client_closed"
        except TimeoutError:
            outcome = "timeout"
            await self._send_error(writer, ProtocolError(ErrorCode.TIMEOUT, "no request within the deadline"))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            outcome = "disconnected"
        except RuntimeClosed:
            outcome = "draining"
            await self._send_error(writer, ProtocolError(ErrorCode.DRAINING, "peer is shutting down"))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:  # a bug on our side must not take the peer down
            logger.exception("internal error in %s", rpc)
            outcome = "internal"
            await self._send_error(writer, ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        finally:
            if counted:
                await self.admission.release(owner)
            self.metrics.requests.labels(rpc=rpc, outcome=outcome).inc()
            self.metrics.request_latency.labels(rpc=rpc).observe(time.perf_counter() - started)
            await linger_and_close(reader, writer)

    def info(self) -> InfoResponse:
        return InfoResponse(
            model_id=self.model_id,
            block_start=self.stage.start,
            block_end=self.stage.end,
            num_blocks_total=self.stage.config.num_layers,
            dtype=str(self.stage.dtype).removeprefix("torch."),
            max_batch_tokens=self.limits.max_batch_tokens,
            max_session_length=self.limits.max_session_length,
            cache_tokens_free=self.table.available_tokens(),
            cache_tokens_total=self.budget.total_tokens,
            state="offline" if self.draining else self.state,
            protocol_version=PROTOCOL_VERSION,
            package_version=__version__,
            public_name=self.public_name,
            extra={
                "sessions": len(self.sessions),
                "max_sessions": self.limits.max_sessions,
                "compute_busy_s": self.runtime.busy_s,  # lets a client measure pipeline bubbles
                "memory": self.memory.snapshot(),
                "quant": self.stage.quant,  # how the weights are stored (the record says the same)
                "weight_bytes": self.stage.weight_bytes,
            },
        )

    async def rpc_info(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, InfoRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected info_request, got {type(request).__name__}"
                )
            await self._send(writer, self.info())

        await self._serve("info", stream_info, reader, writer, body)

    # --- forward / backward (stateless) ---------------------------------------------------------

    async def rpc_forward(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, ForwardRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected forward_request, got {type(request).__name__}"
                )
            check_range(self.stage, request.start, request.end)
            hidden = from_wire(request.hidden)
            check_hidden(hidden, self.stage, self.limits)
            compute = functools.partial(compute_forward, self.stage, hidden, request.start, request.end)
            out = await self.runtime.run_chunks(compute, owner)
            self.metrics.tokens.labels(phase="forward").inc(hidden.shape[0] * hidden.shape[1])
            response = ForwardResponse(result_to_wire(out, request.response_compression), request.request_id)
            await self._send(writer, response)

        await self._serve("forward", stream_info, reader, writer, body)

    async def rpc_backward(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, BackwardRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected backward_request, got {type(request).__name__}"
                )
            check_range(self.stage, request.start, request.end)
            hidden = from_wire(request.hidden)
            grad_output = from_wire(request.grad_output)
            check_hidden(hidden, self.stage, self.limits)
            check_grad_output(grad_output, hidden)
            compute = functools.partial(
                compute_backward, self.stage, self.memory, hidden, grad_output, request.start, request.end
            )
            grad_input = await self.runtime.run_chunks(compute, owner)
            self.metrics.tokens.labels(phase="backward").inc(hidden.shape[0] * hidden.shape[1])
            await self._send(
                writer,
                BackwardResponse(result_to_wire(grad_input, request.response_compression), request.request_id),
            )

        await self._serve("backward", stream_info, reader, writer, body)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for open sessions to end, then hand the rest back with DRAINING."""
        await self.table.drain(timeout_s)

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
                raise ProtocolError(
                    ErrorCode.SESSION_EXPIRED,
                    f"session idle for {self.limits.session_idle_timeout_s:.0f}s; its cache was freed",
                ) from None
            if isinstance(msg, InferenceClose):
                return
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
                await self._serve_step(session, msg, opened, writer, read_at)
            finally:
                session.busy = False

    async def _serve_step(
        self,
        session: ServerSession,
        msg: InferenceStep,
        opened: InferenceOpen,
        writer: asyncio.StreamWriter,
        read_at: float,
    ) -> None:
        try:
            hidden = from_wire(msg.hidden)
            check_hidden(hidden, self.stage, self.limits, batch_size=session.batch_size)
            n_tokens = hidden.shape[1]
            check_step(msg.position, n_tokens, length=session.length, max_length=session.max_length)
        except ProtocolError as exc:
            await self._send_error(writer, exc)  # bad step: answer it, keep the session
            return
        if msg.position + n_tokens > session.cache.max_length:
            await self._grow(session, msg.position + n_tokens)  # CACHE_FULL ends the session
        compute_started = time.perf_counter()
        step = Step(hidden, session.cache, msg.position, session.start, session.end)
        out, ran = await compute_step(self.runtime, self.stage, step, session.owner, key=id(self))
        resumed = time.perf_counter()
        compute_ms = (resumed - compute_started) * 1e3
        if self.step_delay_s:
            await asyncio.sleep(self.step_delay_s)
        session.length = msg.position + n_tokens
        session.steps += 1
        session.stepped(n_tokens * session.batch_size, time.monotonic())
        phase = "decode" if n_tokens == 1 else "prefill"
        self.metrics.tokens.labels(phase=phase).inc(n_tokens * session.batch_size)
        result = InferenceStepResult(result_to_wire(out, opened.response_compression), msg.step_id, compute_ms)
        frame = frame_parts([result], self.limits.max_frame_bytes)
        encoded = time.perf_counter()
        await send_frame(writer, frame, self.limits, self.metrics)
        written = time.perf_counter()
        self.metrics.step_latency.labels(phase=phase).observe(written - read_at)
        if self.tracer is not None and ran is not None:
            marks = (read_at, compute_started, *ran, resumed, encoded, written)
            self.tracer.record_server(session.session_id, msg.step_id, marks)
