"""The swarm as one peer sees it, for the health page, its JSON API and the swarm gauges.

Reading the DHT costs one lookup per block, so a page that refreshes every few seconds (or a
few operators looking at once, or Prometheus scraping) must not turn into a stream of DHT reads:
:class:`SwarmView` keeps the last answer for ``max_age_s`` and lets concurrent callers share one
read. :class:`RttProbe` measures the round trip from this peer to others with an ``info`` call,
at most once per peer per ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["RttProbe", "SwarmView"]

Clock = Callable[[], float]


class SwarmView:
    """Caches the result of ``read`` (an async callable) for ``max_age_s`` seconds.

    Concurrent ``get`` calls wait for the same read instead of starting their own. A failed read
    raises to the callers of that read and leaves the previous value in place for later ones.
    """

    def __init__(
        self, read: Callable[[], Awaitable[dict[str, Any]]], *, max_age_s: float = 2.0, clock: Clock = time.monotonic
    ) -> None:
        self._read = read
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._value: dict[str, Any] | None = None
        self._read_at = 0.0
        self.reads = 0  # how many times the DHT was actually read (tests and debugging)

    @property
    def last(self) -> dict[str, Any] | None:
        """The last value read, however old (None before the first read)."""
        return self._value

    async def get(self, max_age_s: float | None = None) -> dict[str, Any]:
        """The cached value if younger than ``max_age_s`` (default: the view's), else a fresh read."""
        limit = self.max_age_s if max_age_s is None else max_age_s
        async with self._lock:
            if self._value is not None and self._clock() - self._read_at < limit:
                return self._value
            value = await self._read()
            self.reads += 1
            self._value, self._read_at = value, self._clock()
            return value


class RttProbe:
    """Round-trip times (ms) from this peer to others, measured by ``ping`` and cached per peer.

    ``ping(peer_id)`` performs one request/answer round trip (the daemon uses an ``info`` RPC);
    a peer that fails or times out gets ``None`` until its next probe.
    """

    def __init__(
        self,
        ping: Callable[[str], Awaitable[object]],
        *,
        ttl_s: float = 30.0,
        timeout_s: float = 2.0,
        max_probes: int = 32,
        clock: Clock = time.monotonic,
    ) -> None:
        self._ping = ping
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        # anyone can put records in the DHT: never open more than this many streams per call
        self.max_probes = max_probes
        self._clock = clock
        self._cache: dict[str, tuple[float, float | None]] = {}  # peer id -> (measured at, rtt ms)

    async def _measure(self, peer_id: str) -> float | None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._ping(peer_id)
        except Exception:  # unreachable, refusing or slow: shown as unknown, never an error page
            return None
        return (time.perf_counter() - started) * 1e3

    async def rtts_ms(self, peer_ids: Iterable[str]) -> dict[str, float | None]:
        """RTT of each of ``peer_ids``; up to ``max_probes`` stale or unknown ones are probed now,
        concurrently (never-measured first), the rest on later calls (None until then)."""
        wanted = list(dict.fromkeys(peer_ids))
        now = self._clock()
        stale = [p for p in wanted if p not in self._cache or now - self._cache[p][0] >= self.ttl_s]
        stale.sort(key=lambda p: self._cache[p][0] if p in self._cache else float("-inf"))
        stale = stale[: self.max_probes]
        if stale:
            results = await asyncio.gather(*(self._measure(p) for p in stale))
            measured_at = self._clock()
            for peer_id, rtt in zip(stale, results, strict=True):
                self._cache[peer_id] = (measured_at, rtt)
        # forget peers that left, so a long-lived daemon does not accumulate every peer it ever saw
        for gone in set(self._cache) - set(wanted):
            del self._cache[gone]
        return {p: self._cache[p][1] if p in self._cache else None for p in wanted}
