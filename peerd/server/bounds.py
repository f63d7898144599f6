"""Bounds on what open streams and half-received frames may cost a peer, per remote peer id and in all.

A stream is a socket (one file descriptor here, one in p2pd) and a frame is read into memory whole;
before these bounds one client opening 1,100 idle streams took the peer to its 1,024 fd limit, and
32 frames of 64 MiB each sent half-way grew it by 2 GB until the read deadline. Identities are free,
so every per-id cap has a total behind it, and at the total the idle streams of whoever holds the
most are closed first: an honest client's new stream still gets in.
"""

from __future__ import annotations

import contextvars
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from peerd.rpc.fdlimit import open_files_limit
from peerd.server.limits import Limits
from protocols import ErrorCode, ProtocolError, encode_frame, error_from_exception

__all__ = [
    "CURRENT_STREAM",
    "FD_RESERVE",
    "FrameBytes",
    "StreamGate",
    "StreamTicket",
    "stream_gate",
]

FD_RESERVE = 256  # descriptors kept for everything that is not a client stream (weights, DHT, HTTP, logs)

Handler = Callable[[Any, Any, Any], Awaitable[None]]


class FrameBytes:
    """Bytes of frames announced by their header but not yet read whole, per remote peer id and in all.

    A frame's declared size is charged before its body is read (so the bound holds whatever the
    sender does next) and released once it is read or abandoned. Small frames (a decode step) are
    not charged: their memory is bounded by the stream caps, and they must keep flowing while large
    ones are refused.
    """

    def __init__(self, per_peer_bytes: int, total_bytes: int, free_below_bytes: int = 1 << 20) -> None:
        self.per_peer_bytes, self.total_bytes, self.free_below_bytes = per_peer_bytes, total_bytes, free_below_bytes
        self.held: Counter[str] = Counter()
        self.total = 0
        self.refusals = 0
        self.peak_total = 0

    def reserve(self, owner: str, size: int) -> int:
        """Charge ``size`` bytes to ``owner``, or raise ``OVERLOADED`` (retryable); return what was charged."""
        if size < self.free_below_bytes:
            return 0
        if self.held[owner] + size > self.per_peer_bytes or self.total + size > self.total_bytes:
            self.refusals += 1
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"too many large frames in flight ({self.held[owner] >> 20} MiB of yours, {self.total >> 20} MiB "
                f"in all; limits {self.per_peer_bytes >> 20} / {self.total_bytes >> 20} MiB); retry later",
            )
        self.held[owner] += size
        self.total += size
        self.peak_total = max(self.peak_total, self.total)
        return size

    def release(self, owner: str, charged: int) -> None:
        if not charged:
            return
        self.held[owner] -= charged
        if self.held[owner] <= 0:
            del self.held[owner]
        self.total -= charged


@dataclass(eq=False)
class StreamTicket:
    """One admitted stream: who opened it, whether it has sent a whole frame yet, how to close it."""

    owner: str
    serial: int
    writer: Any
    frames: FrameBytes
    idle: bool = True  # no whole frame received yet: the first to go when the peer is full
    open: bool = field(default=True)


# The stream a handler task is serving. Each libp2p stream is handled in its own task, which has its
# own copy of the context, so the frame reader finds its stream's owner without every handler
# passing it down.
CURRENT_STREAM: contextvars.ContextVar[StreamTicket | None] = contextvars.ContextVar("peerd_stream", default=None)


class StreamGate:
    """Caps open streams per remote peer id and in total, closing idle ones of the largest holder first."""

    def __init__(self, max_streams: int, max_streams_per_peer: int, frames: FrameBytes) -> None:
        # every stream costs a descriptor here; stay below the limit whatever was configured
        self.max_streams = max(1, min(max_streams, (open_files_limit() - FD_RESERVE) // 2))
        self.max_streams_per_peer = max(1, min(max_streams_per_peer, self.max_streams))
        self.frames = frames
        self.tickets: dict[str, list[StreamTicket]] = {}
        self.open = 0
        self.peak_open = 0
        self.refusals = 0
        self.evictions = 0
        self._serials = itertools.count()

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` behind this gate (the signature hivemind's stream handlers have)."""

        async def gated(stream_info: Any, reader: Any, writer: Any) -> None:
            owner = str(stream_info.peer_id) if stream_info is not None else ""
            ticket = self.admit(owner, writer)
            if ticket is None:
                return
            token = CURRENT_STREAM.set(ticket)
            try:
                await handler(stream_info, reader, writer)
            finally:
                CURRENT_STREAM.reset(token)
                self.release(ticket)

        return gated

    def admit(self, owner: str, writer: Any) -> StreamTicket | None:
        """A ticket for a new stream of ``owner``, or None after refusing it (answered and closed)."""
        mine = self.tickets.get(owner, [])
        if len(mine) >= self.max_streams_per_peer:
            self._refuse(writer, f"{len(mine)} streams of yours are open here (limit {self.max_streams_per_peer} each)")
            return None
        if self.open >= self.max_streams and not self._evict_idle():
            self._refuse(writer, f"this peer has {self.open} streams open (limit {self.max_streams})")
            return None
        ticket = StreamTicket(owner, next(self._serials), writer, self.frames)
        self.tickets.setdefault(owner, []).append(ticket)
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        return ticket

    def release(self, ticket: StreamTicket) -> None:
        """Forget ``ticket`` (idempotent: an evicted stream is released at eviction and again at its end)."""
        if not ticket.open:
            return
        ticket.open = False
        self.open -= 1
        mine = self.tickets[ticket.owner]
        mine.remove(ticket)
        if not mine:
            del self.tickets[ticket.owner]

    def _evict_idle(self) -> bool:
        """Close the oldest idle stream of the peer id holding the most streams; False if none is idle."""
        for owner in sorted(self.tickets, key=lambda o: len(self.tickets[o]), reverse=True):
            idle = [t for t in self.tickets[owner] if t.idle]
            if idle:
                victim = min(idle, key=lambda t: t.serial)
                self.release(victim)
                victim.writer.close()  # its handler's read ends; its own release is then a no-op
                self.evictions += 1
                return True
        return False

    def _refuse(self, writer: Any, why: str) -> None:
        self.refusals += 1
        if not writer.is_closing():
            # one small frame without waiting for it to drain, then the descriptor is freed at once
            writer.write(encode_frame(error_from_exception(ProtocolError(ErrorCode.OVERLOADED, f"{why}; retry later"))))
            writer.close()


def stream_gate(limits: Limits) -> StreamGate:
    """The gate a peer enforcing ``limits`` puts in front of its stream handlers."""
    frames = FrameBytes(limits.max_partial_frame_bytes_per_peer, limits.max_partial_frame_bytes)
    return StreamGate(limits.max_streams, limits.max_streams_per_peer, frames)
