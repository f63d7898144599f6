"""The KV cache this client has taken on peers that their DHT records do not show yet.

A record's ``cache_tokens_free`` is as old as its peer's last announce (up to one announce period,
30 s by default). A client that opens several sessions in that time would otherwise count the same
free cache again for each of them and send them all to one peer until it refuses with
``CACHE_FULL``. The planner subtracts what this book holds (``CacheBook.taken``) from each record.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

__all__ = ["BUSY_WAIT_S", "HOLD_S", "CacheBook", "busy_backoff_s"]

HOLD_S = 30.0  # the daemon's default announce period: by then the peer's record shows the session
# A new session that finds every peer of some blocks full (SwarmBusyError) waits this long for room
# before giving up: it holds nothing while it waits, and sessions finishing elsewhere free cache every
# few seconds. The swarm simulator showed that failing after the 30 s failover timeout instead turned
# a busy minute into failed requests (docs/scale.md).
BUSY_WAIT_S = 180.0
BUSY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # waits between re-plans, then the last one repeated
FULL_TOKENS = 1 << 40  # what a refusal reserves: more than any record's free cache


def busy_backoff_s(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before re-planning for the ``attempt``-th time (from 0) after SwarmBusyError:
    doubling from 1 s to 8 s, jittered by x[0.5, 1.5) so clients turned away together do not all
    come back in the same second, when the records they read are still the same."""
    return BUSY_BACKOFF_S[min(attempt, len(BUSY_BACKOFF_S) - 1)] * rng.uniform(0.5, 1.5)


class CacheBook:
    """Cache tokens this client reserved per peer in the last ``hold_s`` seconds.

    ``take`` when a peer accepted a session, ``release`` when the session closes (the peer frees
    the cache at once; a record written before the open never counted it). An entry older than
    ``hold_s`` is dropped: the peer has announced since, and its record counts the session itself.
    Holding an entry too long only makes the client spread more; it never blocks a route that has
    room according to the peer's own next announcement.
    """

    def __init__(
        self,
        hold_s: float = HOLD_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self.hold_s = hold_s
        self.clock = clock
        # called with (peer, its new total) whenever a peer's total changes (0: nothing held), so a
        # caller can keep the totals in its own form instead of reading ``taken()`` on every plan
        self.on_change = on_change
        self._entries: dict[str, deque[tuple[float, int]]] = {}  # peer -> (taken at, tokens), oldest first
        self._totals: dict[str, int] = {}  # peer -> sum of its entries' tokens
        self._order: deque[tuple[float, str]] = deque()  # every take, oldest first: what may expire next

    def take(self, peer_id: str, tokens: int) -> None:
        now = self.clock()
        self._entries.setdefault(peer_id, deque()).append((now, tokens))
        self._totals[peer_id] = self._totals.get(peer_id, 0) + tokens
        self._order.append((now, peer_id))
        if self.on_change is not None:
            self.on_change(peer_id, self._totals[peer_id])

    def mark_full(self, peer_id: str) -> None:
        """``peer_id`` refused a session with ``CACHE_FULL``: count it as full until its next announce
        (``hold_s``), when its record tells again. A full peer is not failing, so it is not banned:
        a ban doubles on repeats, and under load every peer refuses now and then."""
        self.take(peer_id, FULL_TOKENS)

    def release(self, peer_id: str, tokens: int) -> None:
        """Forget one reservation of ``tokens`` on ``peer_id`` (the newest: older ones expire first)."""
        entries = self._entries.get(peer_id)
        if not entries:
            return
        for i in range(len(entries) - 1, -1, -1):
            if entries[i][1] == tokens:
                del entries[i]
                self._subtract(peer_id, tokens)
                return

    def _subtract(self, peer_id: str, tokens: int) -> None:
        left = self._totals[peer_id] - tokens
        if self._entries[peer_id]:
            self._totals[peer_id] = left
        else:
            del self._totals[peer_id], self._entries[peer_id]
            left = 0
        if self.on_change is not None:
            self.on_change(peer_id, left)

    def taken(self) -> dict[str, int]:
        """Tokens reserved per peer within the last ``hold_s`` seconds (peers with none are absent).
        Only the peers with a take old enough to expire are looked at (a client planning over
        thousands of peers calls this on every plan)."""
        self.expire()
        return dict(self._totals)

    def expire(self) -> None:
        """Drop the reservations older than ``hold_s`` (``taken()`` does it first)."""
        cutoff = self.clock() - self.hold_s
        while self._order and self._order[0][0] <= cutoff:
            _, peer_id = self._order.popleft()
            entries = self._entries.get(peer_id)
            while entries and entries[0][0] <= cutoff:
                self._subtract(peer_id, entries.popleft()[1])
