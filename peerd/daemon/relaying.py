"""A peer's part in peerd's relay: a relay for others when it can be dialled, a reserving peer when not.

(The relay itself is in ``peerd/rpc/relay.py``, the reserving end in ``peerd/rpc/relayed.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from hivemind.p2p import P2P

from peerd.daemon.reachability import Reachability
from peerd.rpc.relay import RelayLimits, RelayService
from peerd.rpc.relayed import RelayedStreams, RelayReservations
from peerd.rpc.streams import STREAM_NAMES
from protocols import STREAM_RELAY, STREAM_RELAYED

__all__ = ["Relaying", "serve_as_relay"]

FIRST_RESERVATION_TIMEOUT_S = 10.0

logger = logging.getLogger(__name__)
Handler = Callable[..., Awaitable[None]]


async def serve_as_relay(
    p2p: P2P, limits: RelayLimits | None = None, on_relayed: Callable[[int], None] | None = None
) -> RelayService:
    """Offer peerd's relay on ``p2p`` (peers and bootstrap nodes that others can dial)."""
    service = RelayService(p2p, STREAM_NAMES.values(), limits, on_relayed)
    await p2p.add_binary_stream_handler(STREAM_RELAY, service.handle)
    return service


class Relaying:
    """Owns the relay role of one peer for its lifetime: ``start``, then ``close``.

    Dialable (or unknown) peers relay for others; relayed peers hold reservations on their relays
    (in a task owned here) and serve the streams the relays open for clients.
    """

    def __init__(
        self,
        p2p: P2P,
        reachability: Reachability,
        on_relayed: Callable[[int], None] | None = None,
        first_reservation_timeout_s: float = FIRST_RESERVATION_TIMEOUT_S,
    ) -> None:
        self.p2p = p2p
        self.first_reservation_timeout_s = first_reservation_timeout_s
        self.on_relayed = on_relayed
        self.relayed = reachability.reach == "relayed"
        self.service: RelayService | None = None
        self.reservations = RelayReservations(p2p, reachability.relays) if self.relayed else None
        self._task: asyncio.Task[None] | None = None
        self._handler_name = STREAM_RELAYED if self.relayed else STREAM_RELAY

    async def start(self, handlers: Mapping[str, Handler]) -> None:
        """Start relaying (``handlers``: stream protocol name -> the servicer's handler).

        A relayed peer waits for its first reservation (or a timeout), so that its first
        announcement already gives clients a way in.
        """
        if self.reservations is None:
            self.service = await serve_as_relay(self.p2p, on_relayed=self.on_relayed)
            return
        reservations = self.reservations
        await self.p2p.add_binary_stream_handler(
            STREAM_RELAYED, RelayedStreams(reservations.relay_ids, handlers).handle
        )
        self._task = asyncio.create_task(reservations.run(), name="relay-reservations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reservations.reserved.wait(), self.first_reservation_timeout_s)
        if not reservations.active:
            logger.error(
                "no relay accepted a reservation within %.0fs: nobody can reach this peer yet; it announces "
                "itself offline until a relay does (check that the peers in --initial-peers are up)",
                self.first_reservation_timeout_s,
            )

    def active_relays(self) -> tuple[str, ...]:
        """Multiaddrs of the relays holding a reservation for us now (empty when not relayed)."""
        return tuple(self.reservations.active_maddrs()) if self.reservations is not None else ()

    @property
    def unreachable(self) -> bool:
        """True for a relayed peer that no relay holds a reservation for: nobody can reach it."""
        return self.relayed and not self.active_relays()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.p2p.remove_binary_stream_handler(self._handler_name), 2.0)
