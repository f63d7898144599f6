"""A cached async view: one expensive read shared by every caller within ``max_age_s``.

The health page, its JSON API and the swarm gauges all show the swarm as a peer sees it, and
reading the DHT costs one lookup per block, so a page that refreshes every few seconds (or a few
operators looking at once, or Prometheus scraping) must not turn into a stream of DHT reads:
:class:`SwarmView` keeps the last answer for ``max_age_s`` and lets concurrent callers share one
read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["SwarmView"]

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
