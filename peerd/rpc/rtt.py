"""Round-trip times to other peers: the one RTT probe clients and peers use, with one TTL.

A client weighs route hops by RTT, a peer publishes its RTT to the peers serving the next blocks
(for clients' routing), and the health page shows RTTs: all three measure the same way (one
``info`` round trip, stream open included, the faster of two in a row) and cache each peer's value
for :data:`RTT_TTL_S`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

__all__ = ["MAX_RTT_PROBES", "PINGS_PER_PROBE", "RTT_TIMEOUT_S", "RTT_TTL_S", "RttProbe"]

RTT_TTL_S = 30.0  # re-measure a peer's RTT after this long (about one announce period)
RTT_TIMEOUT_S = 2.0  # a peer slower than this to answer `info` counts as unreachable for now
MAX_RTT_PROBES = 32  # peers probed per call at most: anyone can put records in the DHT
PINGS_PER_PROBE = 2  # round trips per probe, the fastest kept (the first may include a dial)

Clock = Callable[[], float]


class RttProbe:
    """Round-trip times (ms) from this peer to others, measured by ``ping`` and cached per peer.

    ``ping(peer_id)`` performs one request/answer round trip (the daemon uses an ``info`` RPC);
    a peer that fails or times out gets ``None`` until its next probe.
    """

    def __init__(
        self,
        ping: Callable[[str], Awaitable[object]],
        *,
        ttl_s: float = RTT_TTL_S,
        timeout_s: float = RTT_TIMEOUT_S,
        max_probes: int = MAX_RTT_PROBES,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ping = ping
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        # anyone can put records in the DHT: never open more than this many streams per call
        self.max_probes = max_probes
        self._clock = clock
        self._cache: dict[str, tuple[float, float | None]] = {}  # peer id -> (measured at, rtt ms)
        self.background: asyncio.Task[None] | None = None  # stale values being measured again (rtts_ms)

    def measured_at(self, peer_id: str) -> float | None:
        """When ``peer_id`` was last probed (its RTT may still be None: it did not answer); None: never."""
        entry = self._cache.get(peer_id)
        return entry[0] if entry is not None else None

    async def _measure(self, peer_id: str) -> float | None:
        """The faster of two round trips in a row, both within ``timeout_s``: the first to a peer
        not connected yet also dials it (TCP, then the security and muxer handshakes: several round
        trips), which is not the link's RTT. On loopback a first probe read 13-18 ms, and a client
        took its local peers for internet ones (auto push, routing weights)."""
        best: float | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                for _ in range(PINGS_PER_PROBE):
                    started = time.perf_counter()
                    await self._ping(peer_id)
                    rtt = (time.perf_counter() - started) * 1e3
                    best = rtt if best is None else min(best, rtt)
        except Exception:  # unreachable, refusing or slow: shown as unknown, never an error page
            pass  # a peer that answered once has an RTT; one that never did has none
        return best

    async def rtts_ms(self, peer_ids: Iterable[str], *, stale_in_background: bool = False) -> dict[str, float | None]:
        """RTT of each of ``peer_ids``; up to ``max_probes`` stale or unknown ones are probed now,
        concurrently (never-measured first), the rest on later calls (None until then).

        ``stale_in_background``: only never-measured peers are probed before returning; peers
        measured more than ``ttl_s`` ago keep their last value, and are probed in a background task
        whose results later calls see (a client opening a session should not wait two round trips
        per peer to learn what it knew 30 s ago).
        """
        wanted = list(dict.fromkeys(peer_ids))
        now = self._clock()
        stale = [p for p in wanted if p not in self._cache or now - self._cache[p][0] >= self.ttl_s]
        stale.sort(key=lambda p: self._cache[p][0] if p in self._cache else float("-inf"))
        stale = stale[: self.max_probes]
        if stale_in_background:
            known = [p for p in stale if p in self._cache]
            stale = [p for p in stale if p not in self._cache]
            if known and (self.background is None or self.background.done()):
                self.background = asyncio.create_task(self._probe(known))
        if stale:
            await self._probe(stale)
        # forget peers that left, so a long-lived daemon does not accumulate every peer it ever saw
        for gone in set(self._cache) - set(wanted):
            del self._cache[gone]
        return {p: self._cache[p][1] if p in self._cache else None for p in wanted}

    async def _probe(self, peer_ids: list[str]) -> None:
        results = await asyncio.gather(*(self._measure(p) for p in peer_ids))
        measured_at = self._clock()
        for peer_id, rtt in zip(peer_ids, results, strict=True):
            self._cache[peer_id] = (measured_at, rtt)
