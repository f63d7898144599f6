"""Plumbing shared by a peer's RPC handlers: construction, frame I/O under the peer's limits, and
the uniform answer to every failure (see handlers.py for the contract)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peerd.model.stage import Stage
from peerd.rpc.hoptrace import HopTracer
from peerd.server.admission import Admission
from peerd.server.frames import linger_and_close, read_request, send_error, send_message
from peerd.server.limits import Limits
from peerd.server.memory import ActivationMeter
from peerd.server.metrics import PeerMetrics
from peerd.server.push import Opener, Pusher
from peerd.server.runtime import ComputeRuntime, RuntimeClosed
from peerd.server.sessions import CacheBudget, SessionTable
from peerd.server.validation import (
    check_hello,
)
from protocols import (
    PROTOCOL_VERSION,
    ErrorCode,
    Hello,
    Message,
    ProtocolError,
)

__all__ = ["ServicerBase"]

logger = logging.getLogger(__name__)


class ServicerBase:
    """What every handler shares: the hosted stage, limits, metrics, sessions, and _serve()."""

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
        push_opener: Opener | None = None,
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
        self.pusher = Pusher(push_opener, Hello(PROTOCOL_VERSION, model_id, "peerd-push"), limits, metrics)
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
            if rpc not in ("inference", "push"):  # long-lived streams, bounded per session instead
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
