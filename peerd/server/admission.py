"""Admission of stateless requests: each client (a libp2p-authenticated peer id) gets a fixed number
of requests in flight on this peer, so one client cannot take the compute others are waiting for."""

from __future__ import annotations

import asyncio
import collections

from protocols import ErrorCode, ProtocolError

__all__ = ["OVERLOAD_TARPIT_S", "OVERLOAD_WAIT_S", "Admission"]

OVERLOAD_WAIT_S = 5.0  # how long a request over its client's in-flight limit may wait for a slot
OVERLOAD_TARPIT_S = 1.0  # delay before refusing a client that has its limit in flight and waiting


class Admission:
    """In-flight slots per owner: ``admit`` before serving a request, ``release`` after (always)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight: collections.Counter[str] = collections.Counter()  # requests being served, per owner
        self.waiting: collections.Counter[str] = collections.Counter()  # requests queued for a slot
        self._slots = asyncio.Condition()  # notified whenever an in-flight request ends

    async def admit(self, owner: str) -> None:
        """Take one of ``owner``'s in-flight slots, waiting a little for one; else OVERLOADED.

        A client over its limit first waits (bounded) for one of its own requests to finish, so an
        honest client that pipelines a little more than allowed is slowed, not refused. Past that
        many waiting, refusals come after a delay: a flooder that retries at once would otherwise
        turn cheap refusals into a stream-opening flood that costs this peer more than the work.
        """
        limit = self.limit
        if self.inflight[owner] >= limit:
            if self.waiting[owner] >= limit:
                await asyncio.sleep(OVERLOAD_TARPIT_S)
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"{limit} requests of yours are in flight here and {limit} more waiting; "
                    "wait for them or use another peer",
                )
            self.waiting[owner] += 1
            try:
                async with asyncio.timeout(OVERLOAD_WAIT_S), self._slots:
                    await self._slots.wait_for(lambda: self.inflight[owner] < limit)
            except TimeoutError:
                raise ProtocolError(
                    ErrorCode.OVERLOADED, f"no slot freed within {OVERLOAD_WAIT_S:.0f}s (limit {limit} per client)"
                ) from None
            finally:
                self.waiting[owner] -= 1
                if not self.waiting[owner]:
                    del self.waiting[owner]
        self.inflight[owner] += 1

    async def release(self, owner: str) -> None:
        self.inflight[owner] -= 1
        if not self.inflight[owner]:
            del self.inflight[owner]  # no entry per client ever seen: the counter stays small
        async with self._slots:
            self._slots.notify_all()
