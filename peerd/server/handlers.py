"""RPC handlers of a peer, one per libp2p stream protocol (see protocols/README.md).

Every handler follows the same shape: read the client's ``Hello``, then its request, validate
everything before any compute, run torch work on the compute runtime, and answer. Any failure is
answered with an ``Error`` frame carrying a code; nothing a client sends can take the peer down,
and one client's bad request never touches another client's state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from peerd import __version__
from peerd.config import PeerConfig
from peerd.model.stage import KVCache, Stage
from peerd.rpc.streams import STREAM_NAMES
from peerd.rpc.tensors import from_wire, to_wire
from peerd.server.memory import ActivationMeter
from peerd.server.metrics import PeerMetrics
from peerd.server.runtime import ComputeRuntime, RuntimeClosed
from peerd.server.sessions import CacheBudget, ServerSession
from protocols import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    BackwardRequest,
    BackwardResponse,
    Compression,
    ErrorCode,
    ForwardRequest,
    ForwardResponse,
    Hello,
    InferenceClose,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    ProtocolError,
    WireTensor,
    decode_message,
    encode_frame,
    error_from_exception,
    read_frame,
)

__all__ = ["STREAM_NAMES", "BlockServicer", "Limits"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Limits:
    """What one peer accepts; advertised through ``info`` so clients can plan within it."""

    max_frame_bytes: int
    max_batch_tokens: int
    max_session_length: int
    max_sessions: int
    request_timeout_s: float
    session_idle_timeout_s: float
    # Per remote peer id (libp2p-authenticated, so one client cannot spend another's share); the
    # defaults are PeerConfig's, the one place operator-facing defaults are written:
    max_sessions_per_peer: int = PeerConfig.max_sessions_per_peer  # open inference sessions of one client
    max_inflight_per_peer: int = PeerConfig.max_inflight_per_peer  # concurrent info/forward/backward streams

    @classmethod
    def from_config(cls, config: PeerConfig, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Limits:
        """The limits a peer configured with ``config`` enforces."""
        return cls(
            max_frame_bytes=max_frame_bytes,
            max_batch_tokens=config.max_batch_tokens,
            max_session_length=config.max_session_length,
            max_sessions=config.max_sessions,
            request_timeout_s=config.request_timeout_s,
            session_idle_timeout_s=config.session_idle_timeout_s,
            max_sessions_per_peer=config.max_sessions_per_peer,
            max_inflight_per_peer=config.max_inflight_per_peer,
        )


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
        self.budget = budget
        self.limits = limits
        self.metrics = metrics
        self.public_name = public_name
        self.step_delay_s = step_delay_s
        self.state = "joining"
        self.draining = False
        self.allowed_peers = allowed_peers  # None = serve anyone (a public swarm)
        self.sessions: dict[bytes, ServerSession] = {}
        # sessions per owner, counted from admission (before the cache is allocated) to close
        self._owner_sessions: collections.Counter[str] = collections.Counter()
        self._inflight: collections.Counter[str] = collections.Counter()  # stateless streams per owner
        self._opening: set[bytes] = set()  # session ids admitted whose cache is being allocated
        self._waiting: collections.Counter[str] = collections.Counter()  # requests queued for a slot
        self._slots = asyncio.Condition()  # notified whenever an in-flight request ends
        self._no_sessions = asyncio.Event()  # set whenever no session is open (drain waits on it)
        self._no_sessions.set()
        self.memory = ActivationMeter(stage.parameters(), stage.device)  # activations of backward requests

    # --- plumbing shared by all handlers ---------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader, timeout_s: float | None = None) -> Message:
        async with asyncio.timeout(timeout_s or self.limits.request_timeout_s):
            body = await read_frame(reader, self.limits.max_frame_bytes)
        self.metrics.bytes_in.inc(HEADER_BYTES + len(body))
        return decode_message(body, self.limits.max_frame_bytes)

    async def _send(self, writer: asyncio.StreamWriter, msg: Message) -> None:
        frame = encode_frame(msg, self.limits.max_frame_bytes)
        if writer.is_closing():
            # the stream was closed under us (client gone, or the session handed back while draining)
            raise ConnectionResetError("stream already closed")
        async with asyncio.timeout(self.limits.request_timeout_s):
            writer.write(frame)
            await writer.drain()
        self.metrics.bytes_out.inc(len(frame))

    async def _send_error(self, writer: asyncio.StreamWriter, exc: ProtocolError) -> None:
        self.metrics.count_error(exc.code)
        try:
            await self._send(writer, error_from_exception(exc))
        except (OSError, TimeoutError, ConnectionError, ProtocolError):
            pass  # the client is gone; nothing else to tell it

    async def _expect_hello(self, reader: asyncio.StreamReader) -> None:
        hello = await self._read(reader)
        if not isinstance(hello, Hello):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"expected hello, got {type(hello).__name__}")
        if hello.protocol_version[0] != PROTOCOL_VERSION[0]:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"client speaks protocol {hello.protocol_version}, this peer {PROTOCOL_VERSION}",
            )
        if hello.model_id != self.model_id:
            raise ProtocolError(ErrorCode.WRONG_MODEL, f"this peer serves {self.model_id!r}, not {hello.model_id!r}")

    def _check_range(self, start: int, end: int) -> None:
        if not (self.stage.start <= start < end <= self.stage.end):
            raise ProtocolError(
                ErrorCode.BLOCKS_NOT_SERVED,
                f"blocks {start}:{end} requested, this peer serves {self.stage.start}:{self.stage.end}",
            )

    def _check_hidden(self, hidden: torch.Tensor, *, batch_size: int | None = None) -> None:
        if hidden.dtype not in _FLOAT_DTYPES:
            raise ProtocolError(ErrorCode.WRONG_DTYPE, f"hidden states must be float, got {hidden.dtype}")
        hidden_size = self.stage.config.hidden_size
        if hidden.ndim != 3 or hidden.shape[2] != hidden_size or hidden.shape[1] == 0 or hidden.shape[0] == 0:
            raise ProtocolError(
                ErrorCode.WRONG_SHAPE,
                f"hidden states must be [batch, tokens, {hidden_size}] with batch, tokens >= 1, "
                f"got {list(hidden.shape)}",
            )
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise ProtocolError(
                ErrorCode.WRONG_SHAPE, f"session batch is {batch_size}, step has batch {hidden.shape[0]}"
            )
        if hidden.shape[0] * hidden.shape[1] > self.limits.max_batch_tokens:
            raise ProtocolError(
                ErrorCode.REQUEST_TOO_LARGE,
                f"batch x tokens = {hidden.shape[0] * hidden.shape[1]} over this peer's limit "
                f"{self.limits.max_batch_tokens}; split the request",
            )
        if hidden.shape[1] > self.limits.max_session_length:
            raise ProtocolError(
                ErrorCode.SESSION_TOO_LONG,
                f"{hidden.shape[1]} tokens over this peer's max length {self.limits.max_session_length}",
            )

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
                await self._admit(owner)
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
                self._inflight[owner] -= 1
                if not self._inflight[owner]:
                    del self._inflight[owner]  # no entry per client ever seen: the counter stays small
                async with self._slots:
                    self._slots.notify_all()
            self.metrics.requests.labels(rpc=rpc, outcome=outcome).inc()
            self.metrics.request_latency.labels(rpc=rpc).observe(time.perf_counter() - started)
            await _linger_and_close(reader, writer)

    async def _admit(self, owner: str) -> None:
        """Take one of ``owner``'s in-flight slots, waiting a little for one; else OVERLOADED.

        A client over its limit first waits (bounded) for one of its own requests to finish, so an
        honest client that pipelines a little more than allowed is slowed, not refused. Past that
        many waiting, refusals come after a delay: a flooder that retries at once would otherwise
        turn cheap refusals into a stream-opening flood that costs this peer more than the work.
        """
        limit = self.limits.max_inflight_per_peer
        if self._inflight[owner] >= limit:
            if self._waiting[owner] >= limit:
                await asyncio.sleep(OVERLOAD_TARPIT_S)
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"{limit} requests of yours are in flight here and {limit} more waiting; "
                    "wait for them or use another peer",
                )
            self._waiting[owner] += 1
            try:
                async with asyncio.timeout(OVERLOAD_WAIT_S), self._slots:
                    await self._slots.wait_for(lambda: self._inflight[owner] < limit)
            except TimeoutError:
                raise ProtocolError(
                    ErrorCode.OVERLOADED, f"no slot freed within {OVERLOAD_WAIT_S:.0f}s (limit {limit} per client)"
                ) from None
            finally:
                self._waiting[owner] -= 1
                if not self._waiting[owner]:
                    del self._waiting[owner]
        self._inflight[owner] += 1

    # --- info --------------------------------------------------------------------------------------

    def info(self) -> InfoResponse:
        return InfoResponse(
            model_id=self.model_id,
            block_start=self.stage.start,
            block_end=self.stage.end,
            num_blocks_total=self.stage.config.num_layers,
            dtype=str(self.stage.dtype).removeprefix("torch."),
            max_batch_tokens=self.limits.max_batch_tokens,
            max_session_length=self.limits.max_session_length,
            cache_tokens_free=self.budget.free_tokens,
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
            self._check_range(request.start, request.end)
            hidden = from_wire(request.hidden)
            self._check_hidden(hidden)
            stage, start, end = self.stage, request.start, request.end

            def compute() -> torch.Tensor:
                with torch.inference_mode():
                    x = hidden.to(stage.device, stage.dtype)
                    return stage.forward(x, start=start, end=end).to("cpu", hidden.dtype)

            out = await self.runtime.run(compute, owner)
            self.metrics.tokens.labels(phase="forward").inc(hidden.shape[0] * hidden.shape[1])
            response = ForwardResponse(_result_to_wire(out, request.response_compression), request.request_id)
            await self._send(writer, response)

        await self._serve("forward", stream_info, reader, writer, body)

    async def rpc_backward(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def body(owner: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await self._read(reader)
            if not isinstance(request, BackwardRequest):
                raise ProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE, f"expected backward_request, got {type(request).__name__}"
                )
            self._check_range(request.start, request.end)
            hidden = from_wire(request.hidden)
            grad_output = from_wire(request.grad_output)
            self._check_hidden(hidden)
            if grad_output.shape != hidden.shape or grad_output.dtype not in _FLOAT_DTYPES:
                raise ProtocolError(
                    ErrorCode.WRONG_SHAPE,
                    f"grad_output must be a float tensor shaped like hidden {list(hidden.shape)}, "
                    f"got {grad_output.dtype} {list(grad_output.shape)}",
                )
            stage, start, end, meter = self.stage, request.start, request.end, self.memory

            def compute() -> torch.Tensor:
                # Activation checkpointing: recompute the forward here instead of keeping activations
                # between requests, so server memory does not grow with clients in flight.
                with torch.enable_grad(), meter.track():
                    x = hidden.to(stage.device, stage.dtype).requires_grad_(True)
                    y = stage.forward(x, start=start, end=end)
                    (grad,) = torch.autograd.grad(y, x, grad_output.to(stage.device, stage.dtype))
                return grad.to("cpu", hidden.dtype)

            grad_input = await self.runtime.run(compute, owner)
            self.metrics.tokens.labels(phase="backward").inc(hidden.shape[0] * hidden.shape[1])
            await self._send(
                writer,
                BackwardResponse(_result_to_wire(grad_input, request.response_compression), request.request_id),
            )

        await self._serve("backward", stream_info, reader, writer, body)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for open sessions to end, then hand the rest back with DRAINING."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_sessions.wait(), timeout_s)
        error = ProtocolError(ErrorCode.DRAINING, "peer is leaving the swarm; continue the session on another peer")
        for session in list(self.sessions.values()):
            if session.writer is not None:
                # one write of a whole frame: never interleaves with a step result on the same stream
                await self._send_error(session.writer, error)
                session.writer.close()
            self._close_session(session)

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
                self._close_session(session)

        await self._serve("inference", stream_info, reader, writer, body)

    async def _open_session(self, owner: str, request: InferenceOpen) -> ServerSession:
        if self.draining:
            raise ProtocolError(ErrorCode.DRAINING, "peer is leaving the swarm; open the session elsewhere")
        self._check_range(request.start, request.end)
        if request.session_id in self.sessions or request.session_id in self._opening:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "session id already in use; pick a fresh random id")
        if not 1 <= request.max_length <= self.limits.max_session_length:
            raise ProtocolError(
                ErrorCode.SESSION_TOO_LONG,
                f"max_length {request.max_length} outside 1..{self.limits.max_session_length}",
            )
        if not request.batch_size * request.max_length >= 1 or request.batch_size < 1:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "batch_size must be >= 1")
        open_sessions = sum(self._owner_sessions.values())
        if open_sessions >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"this peer already serves {open_sessions} sessions")
        if self._owner_sessions[owner] >= self.limits.max_sessions_per_peer:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"you already have {self._owner_sessions[owner]} sessions open here "
                f"(limit {self.limits.max_sessions_per_peer} per client)",
            )
        tokens = request.batch_size * request.max_length
        self.budget.reserve(tokens)
        self._owner_sessions[owner] += 1  # counted now: concurrent opens must not all pass the check
        self._opening.add(request.session_id)
        try:
            stage, batch, length = self.stage, request.batch_size, request.max_length
            cache = await self.runtime.run(lambda: stage.allocate_cache(batch, length), owner)
        except BaseException:
            self.budget.release(tokens)
            self._release_owner(owner)
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
        self._update_session_gauges()
        return session

    def _close_session(self, session: ServerSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.budget.release(session.reserved_tokens)
            self._release_owner(session.owner)
        self._update_session_gauges()

    def _release_owner(self, owner: str) -> None:
        self._owner_sessions[owner] -= 1
        if self._owner_sessions[owner] <= 0:
            del self._owner_sessions[owner]

    def _update_session_gauges(self) -> None:
        if self.sessions:
            self._no_sessions.clear()
        else:
            self._no_sessions.set()
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.cache_used.set(self.budget.used_tokens * self.budget.bytes_per_token)

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
            started = time.perf_counter()
            try:
                hidden = from_wire(msg.hidden)
                self._check_hidden(hidden, batch_size=session.batch_size)
                n_tokens = hidden.shape[1]
                if msg.position > session.length:
                    raise ProtocolError(
                        ErrorCode.INVALID_MESSAGE,
                        f"step at position {msg.position} would leave a hole: the cache holds {session.length} tokens",
                    )
                if msg.position + n_tokens > session.max_length:
                    raise ProtocolError(
                        ErrorCode.SESSION_TOO_LONG,
                        f"step to position {msg.position + n_tokens} past the session's "
                        f"max_length {session.max_length}",
                    )
            except ProtocolError as exc:
                await self._send_error(writer, exc)  # bad step: answer it, keep the session
                continue
            compute = functools.partial(self._step, hidden, session.cache, msg.position, session.start, session.end)
            compute_started = time.perf_counter()
            out = await self.runtime.run(compute, session.owner)
            compute_ms = (time.perf_counter() - compute_started) * 1e3
            if self.step_delay_s:
                await asyncio.sleep(self.step_delay_s)
            session.length = msg.position + n_tokens
            session.steps += 1
            session.last_active = time.monotonic()
            phase = "decode" if n_tokens == 1 else "prefill"
            self.metrics.tokens.labels(phase=phase).inc(n_tokens * session.batch_size)
            await self._send(
                writer,
                InferenceStepResult(_result_to_wire(out, opened.response_compression), msg.step_id, compute_ms),
            )
            self.metrics.step_latency.labels(phase=phase).observe(time.perf_counter() - started)

    def _step(self, hidden: torch.Tensor, cache: KVCache, position: int, start: int, end: int) -> torch.Tensor:
        """One inference step on the compute thread: the cache is written in place."""
        stage = self.stage
        with torch.inference_mode():
            x = hidden.to(stage.device, stage.dtype)
            out = stage.forward(x, cache=cache, position=position, start=start, end=end)
            return out.to("cpu", hidden.dtype)


def _result_to_wire(tensor: torch.Tensor, compression: Compression) -> WireTensor:
    """Encode a result with the client's compression, or float16 where blockwise8 cannot carry it.

    blockwise8 has no code for NaN or infinity, which a client can provoke by sending them (found by
    fuzzing: this was an INTERNAL error); the tensor's own compression field tells the client.
    """
    try:
        return to_wire(tensor, compression)
    except ValueError:
        if compression is not Compression.BLOCKWISE8:
            raise
        return to_wire(tensor, Compression.FLOAT16)


OVERLOAD_WAIT_S = 5.0  # how long a request over its client's in-flight limit may wait for a slot
OVERLOAD_TARPIT_S = 1.0  # delay before refusing a client that has its limit in flight and waiting
LINGER_S = 2.0  # how long a finished stream waits for the client to close its end


async def _linger_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a stream only after the client has read everything.

    p2pd resets a libp2p stream whose local end closes while bytes are still in flight, which cut a
    large backward answer mid-frame in a benchmark run. So the handler waits (bounded) for the
    client to close its side first -- our client closes right after reading the answer -- and
    discards anything else a misbehaving client sends meanwhile.
    """
    if not writer.is_closing():
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LINGER_S):
                while await reader.read(1 << 16):
                    pass
    writer.close()
