"""The two other ends of peerd's relay (see ``peerd/rpc/relay.py``).

``RelayReservations`` runs on a peer behind NAT: it keeps one reservation stream open to each of
its relays, reopening it when it breaks, and ``RelayedStreams`` serves the streams those relays
open for clients, handing each to the ordinary handler of its protocol with the client's peer id
as the caller. ``open_via_relay`` is the client side: one stream to a relay that continues as a
stream to the target.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import P2P, PeerID

from peerd.rpc.relay import HEADER_TIMEOUT_S, MAX_RELAY_FRAME_BYTES
from peerd.swarm.addresses import peer_id_of
from protocols import (
    STREAM_RELAY,
    RelayConnect,
    RelayedStream,
    RelayReserve,
    RelayReserved,
    decode_message,
    encode_frame,
    expect_message,
    raise_if_error,
    read_frame,
)

__all__ = ["RelayReservations", "RelayedStreams", "open_via_relay", "relay_of"]

Handler = Callable[[Any, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # back-off between reservation attempts on one relay

logger = logging.getLogger(__name__)


def relay_of(maddr: str) -> tuple[str, str] | None:
    """``(relay peer id, relay multiaddr with /p2p/<id>)`` of a ``.../p2p/<relay>/p2p-circuit`` address."""
    head, sep, _ = maddr.partition("/p2p-circuit")
    parts = head.rstrip("/").split("/")
    if not sep or len(parts) < 3 or parts[-2] != "p2p":
        return None
    return parts[-1], head


@dataclass(frozen=True)
class _Caller:
    """What a handler learns about who called: the client behind the relay, not the relay."""

    peer_id: str
    relay: str


class RelayedStreams:
    """Serves ``peerd/relayed/1``: accepted only from ``relays``, dispatched by protocol name."""

    def __init__(self, relays: Callable[[], Collection[str]], handlers: Mapping[str, Handler]) -> None:
        self._relays = relays
        self.handlers = dict(handlers)

    async def handle(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = str(stream_info.peer_id)
        if relay not in self._relays():
            logger.warning("refused a relayed stream from %s: not one of our relays", relay[:16])
            writer.close()
            return
        try:
            async with asyncio.timeout(HEADER_TIMEOUT_S):
                body = await read_frame(reader, MAX_RELAY_FRAME_BYTES)
            header = expect_message(decode_message(body, MAX_RELAY_FRAME_BYTES), RelayedStream)
        except Exception as exc:  # a relay we chose sent garbage: drop this stream, serve the others
            logger.debug("bad relayed stream from %s: %s", relay[:16], exc)
            writer.close()
            return
        handler = self.handlers.get(header.stream)
        if handler is None:
            logger.warning("relay %s asked for %r, which we do not serve", relay[:16], header.stream)
            writer.close()
            return
        await handler(_Caller(header.origin, relay), reader, writer)  # the handler closes the stream


class RelayReservations:
    """Keeps a reservation on each relay (multiaddrs with /p2p/<id>) for as long as ``run`` runs."""

    def __init__(self, p2p: P2P, relays: Sequence[str]) -> None:
        self.p2p = p2p
        self.relays = {peer: maddr for peer, maddr in ((peer_id_of(m), m) for m in relays) if peer}
        self.active: dict[str, RelayReserved] = {}  # relay peer id -> its terms, while reserved
        self.reserved = asyncio.Event()  # set while at least one relay holds a reservation for us

    def relay_ids(self) -> frozenset[str]:
        return frozenset(self.relays)

    def active_maddrs(self) -> list[str]:
        """The relays holding a reservation for us now, in the order we were given them."""
        return [maddr for peer, maddr in self.relays.items() if peer in self.active]

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for peer in self.relays:
                tasks.create_task(self._keep(peer))

    async def _keep(self, relay: str) -> None:
        attempt = 0
        while True:
            try:
                await self._hold(relay)
                attempt = 0
            except Exception as exc:
                logger.warning("relay %s: no reservation (%s); retrying", relay[:16], exc)
            finally:
                self.active.pop(relay, None)
                if not self.active:
                    self.reserved.clear()
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1

    async def _hold(self, relay: str) -> None:
        async with asyncio.timeout(HEADER_TIMEOUT_S + 5.0):
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(relay), STREAM_RELAY)
        try:
            writer.write(encode_frame(RelayReserve()))
            async with asyncio.timeout(HEADER_TIMEOUT_S + 5.0):
                await writer.drain()
                body = await read_frame(reader, MAX_RELAY_FRAME_BYTES)
            decoded = raise_if_error(decode_message(body, MAX_RELAY_FRAME_BYTES))
            self.active[relay] = expect_message(decoded, RelayReserved)
            self.reserved.set()
            logger.info("relay %s holds a reservation for us", relay[:16])
            await reader.read()  # the relay never writes again: EOF or an error means it is over
            logger.warning("relay %s ended our reservation", relay[:16])
        finally:
            writer.close()


async def open_via_relay(
    p2p: P2P, relay: str, target: str, stream: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``target``'s ``stream`` protocol through ``relay`` (peer ids).

    No round trip is spent on the relay's answer: the caller writes its own frames right away and
    a relay that cannot connect answers with one Error frame in their place.
    """
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(relay), STREAM_RELAY)
    writer.write(encode_frame(RelayConnect(target, stream)))
    return reader, writer
