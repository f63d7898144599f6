"""peerd's own relay, served by reachable peers for peers behind NAT (``peerd/relay/1``).

Why not libp2p's circuit relay: the p2pd that hivemind 1.1.12 ships always registers a circuit
relay with go-libp2p's default resources, which reset a relayed connection after 128 KiB each way
(or 2 minutes), whatever its ``-relayDataLimit`` says (that limit reaches only a second relay it
starts when AutoNAT finds a public address, and the two race for the same protocol). One prefill
of a large model is more than that. Circuits still connect the peers (and let DCUtR punch holes
where the internet allows); peerd's bytes go through this relay, whose limits are ours.

A relayed peer keeps one reservation stream open per relay (``RelayReservations``); a client asks
the relay to connect it (``RelayConnect``); the relay opens ``peerd/relayed/1`` on the target over
the connection the target made to it and copies bytes both ways until either side ends, the
stream goes idle, or it carries more than the data limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import P2P, PeerID

from protocols import (
    STREAM_RELAYED,
    ErrorCode,
    ProtocolError,
    RelayConnect,
    RelayedStream,
    RelayReserve,
    RelayReserved,
    decode_message,
    encode_frame,
    error_from_exception,
    read_frame,
)

__all__ = ["MAX_RELAY_FRAME_BYTES", "RelayLimits", "RelayService", "splice"]

MAX_RELAY_FRAME_BYTES = 4096  # relay_connect / relay_reserve / relayed_stream are tiny
HEADER_TIMEOUT_S = 5.0
CHUNK_BYTES = 1 << 16

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelayLimits:
    """What a relay gives others. A reservation costs one idle stream; a relayed stream costs
    a copy of every byte in each direction through this peer's event loop."""

    max_reservations: int = 64  # peers behind NAT holding a slot here at once
    max_streams: int = 256  # relayed streams at once, in all
    max_streams_per_target: int = 64  # ... to one reserving peer (its clients' sessions)
    max_streams_per_origin: int = 16  # ... from one client
    data_limit_bytes: int = 4 << 30  # per relayed stream, each way
    idle_timeout_s: float = 600.0  # a relayed stream with no byte either way for this long is closed
    connect_timeout_s: float = 5.0


class _Splice:
    """Copies two byte streams into each other, with a byte limit per direction and an idle limit."""

    def __init__(self, data_limit_bytes: int, idle_timeout_s: float) -> None:
        self.data_limit_bytes = data_limit_bytes
        self.idle_timeout_s = idle_timeout_s
        self.last_activity = time.monotonic()
        self.bytes = [0, 0]
        self.ended_by = ""

    async def pump(self, way: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            chunk = await reader.read(CHUNK_BYTES)
            if not chunk:
                self.ended_by = self.ended_by or f"eof{way}"
                return
            self.bytes[way] += len(chunk)
            if self.bytes[way] > self.data_limit_bytes:
                self.ended_by = "data limit"
                return
            self.last_activity = time.monotonic()
            writer.write(chunk)
            async with asyncio.timeout(self.idle_timeout_s):
                await writer.drain()

    async def watchdog(self) -> None:
        while True:
            idle = time.monotonic() - self.last_activity
            if idle >= self.idle_timeout_s:
                self.ended_by = "idle"
                return
            await asyncio.sleep(min(self.idle_timeout_s - idle + 0.01, 30.0))


async def splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    data_limit_bytes: int,
    idle_timeout_s: float,
    grace_s: float = 5.0,
) -> tuple[int, int, str]:
    """Copy ``client`` <-> ``target`` until one ends; returns (bytes to target, bytes to client, why).

    When the client leaves, the target is closed at once (it frees a session's cache sooner);
    when the target ends first, the client gets ``grace_s`` to read the last frames and close,
    since closing a stream with bytes in flight can reset it.
    """
    state = _Splice(data_limit_bytes, idle_timeout_s)
    up = asyncio.ensure_future(state.pump(0, client[0], target[1]))
    down = asyncio.ensure_future(state.pump(1, target[0], client[1]))
    dog = asyncio.ensure_future(state.watchdog())
    try:
        done, _ = await asyncio.wait({up, down, dog}, return_when=asyncio.FIRST_COMPLETED)
        if down in done and up not in done and state.ended_by == "eof1":
            await asyncio.wait({up}, timeout=grace_s)
    finally:
        for task in (up, down, dog):
            task.cancel()
        for task in (up, down, dog):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _, writer in (client, target):
            writer.close()
    return state.bytes[0], state.bytes[1], state.ended_by


class RelayService:
    """Serves ``peerd/relay/1``: reservations from peers behind NAT, relayed streams to them.

    Only streams named in ``streams`` may be relayed (never the relay protocols themselves, so
    relays cannot be chained into loops). Going over a limit is answered with a retryable error.
    """

    def __init__(
        self,
        p2p: P2P,
        streams: Collection[str],
        limits: RelayLimits | None = None,
        on_relayed: Callable[[int], None] | None = None,
    ) -> None:
        self.p2p = p2p
        self.on_relayed = on_relayed  # told the bytes of each relayed stream when it ends (metrics)
        self.streams = frozenset(streams)
        self.limits = limits or RelayLimits()
        self.reservations: dict[str, asyncio.Event] = {}  # reserving peer id -> set when it ends
        self._per_target: Counter[str] = Counter()
        self._per_origin: Counter[str] = Counter()
        self.open_streams = 0
        self.relayed_bytes = 0  # both directions, all streams so far (for metrics)
        self.refused = 0

    def terms(self) -> RelayReserved:
        lim = self.limits
        return RelayReserved(lim.max_streams_per_target, lim.data_limit_bytes, lim.idle_timeout_s)

    async def handle(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(stream_info.peer_id)
        try:
            try:
                async with asyncio.timeout(HEADER_TIMEOUT_S):
                    first = decode_message(await read_frame(reader, MAX_RELAY_FRAME_BYTES), MAX_RELAY_FRAME_BYTES)
                if isinstance(first, RelayReserve):
                    await self._hold_reservation(peer, reader, writer)
                elif isinstance(first, RelayConnect):
                    await self._connect(peer, first, reader, writer)
                else:
                    raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{first.TYPE} cannot open a relay stream")
            except ProtocolError as exc:
                self.refused += 1
                writer.write(encode_frame(error_from_exception(exc)))
                await writer.drain()
        except (OSError, ConnectionError, TimeoutError, EOFError, asyncio.IncompleteReadError):
            pass  # the other side went away: nothing to answer
        finally:
            writer.close()

    async def _hold_reservation(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if peer not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            raise ProtocolError(ErrorCode.OVERLOADED, "this relay holds all the reservations it allows")
        previous = self.reservations.get(peer)
        if previous is not None:
            previous.set()  # a reconnecting peer replaces its old reservation stream
        ended = asyncio.Event()
        self.reservations[peer] = ended
        logger.info("relay: %s reserved a slot (%d held)", peer, len(self.reservations))
        try:
            writer.write(encode_frame(self.terms()))
            await writer.drain()
            eof = asyncio.ensure_future(reader.read())  # the reserving peer sends nothing; EOF ends it
            stop = asyncio.ensure_future(ended.wait())
            try:
                await asyncio.wait({eof, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (eof, stop):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        finally:
            if self.reservations.get(peer) is ended:
                del self.reservations[peer]
                logger.info("relay: reservation of %s ended (%d held)", peer, len(self.reservations))

    def _admit(self, origin: str, request: RelayConnect) -> None:
        lim = self.limits
        if request.stream not in self.streams:
            raise ProtocolError(ErrorCode.NOT_ALLOWED, f"this relay does not relay {request.stream!r}")
        if request.target not in self.reservations:
            raise ProtocolError(ErrorCode.NOT_REACHABLE, f"no reservation here for {request.target[:16]}...")
        if self.open_streams >= lim.max_streams:
            raise ProtocolError(ErrorCode.OVERLOADED, "this relay is relaying all the streams it allows")
        if self._per_target[request.target] >= lim.max_streams_per_target:
            raise ProtocolError(ErrorCode.OVERLOADED, "too many relayed streams to that peer; try later")
        if self._per_origin[origin] >= lim.max_streams_per_origin:
            raise ProtocolError(ErrorCode.OVERLOADED, "too many relayed streams from you; close some first")

    async def _connect(
        self, origin: str, request: RelayConnect, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._admit(origin, request)
        self.open_streams += 1
        self._per_target[request.target] += 1
        self._per_origin[origin] += 1
        try:
            try:
                async with asyncio.timeout(self.limits.connect_timeout_s):
                    _, t_reader, t_writer = await self.p2p.call_binary_stream_handler(
                        PeerID.from_base58(request.target), STREAM_RELAYED
                    )
            except Exception as exc:
                raise ProtocolError(ErrorCode.NOT_REACHABLE, f"could not open a stream to the target: {exc}") from exc
            t_writer.write(encode_frame(RelayedStream(origin, request.stream)))
            up, down, why = await splice(
                (reader, writer),
                (t_reader, t_writer),
                data_limit_bytes=self.limits.data_limit_bytes,
                idle_timeout_s=self.limits.idle_timeout_s,
            )
            self.relayed_bytes += up + down
            if self.on_relayed is not None:
                self.on_relayed(up + down)
            if why in ("data limit", "idle"):
                logger.info("relay: closed a stream %s -> %s (%s)", origin[:16], request.target[:16], why)
        finally:
            self.open_streams -= 1
            self._per_target[request.target] -= 1
            self._per_origin[origin] -= 1
            for counter, key in ((self._per_target, request.target), (self._per_origin, origin)):
                if counter[key] <= 0:
                    del counter[key]
