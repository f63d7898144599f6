"""Which peers this client avoids, and for how long."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LIAR_BAN_S", "BanList"]

LIAR_BAN_S = 24 * 3600.0  # a peer caught returning wrong numbers is not used again by this client


class BanList:
    """Peers that failed recently, each banned for a time that doubles on every repeat failure.

    A success resets the doubling (``succeeded``), as hivemind's blacklist does: a peer that failed
    once an hour ago and has served well since starts again from the base ban, not from a ban that
    grew over every hiccup of a long session.
    """

    def __init__(self, base_s: float = 5.0, max_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.clock: Callable[[], float] = clock
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def ban(self, peer_id: str, duration_s: float | None = None) -> float:
        """Ban ``peer_id`` for ``duration_s`` (default: the doubling failure ban); a longer ban stays."""
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = min(self.max_s, self.base_s * 2.0 ** (strikes - 1)) if duration_s is None else duration_s
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), self.clock() + duration)
        return self._until[peer_id] - self.clock()

    def banned(self) -> set[str]:
        now = self.clock()
        return {p for p, until in self._until.items() if until > now}

    def remaining_s(self, peer_id: str) -> float:
        """Seconds left of ``peer_id``'s ban (0 when not banned)."""
        return max(0.0, self._until.get(peer_id, 0.0) - self.clock())

    def is_banned(self, peer_id: str) -> bool:
        return self._until.get(peer_id, 0.0) > self.clock()

    def succeeded(self, peer_id: str) -> None:
        """``peer_id`` just served a request: forget its strikes, unless it is banned right now.

        A ban in force stays: a request that was already in flight when the peer failed (or was
        caught lying) may still come back fine, and must not lift that ban.
        """
        if peer_id in self._strikes and not self.is_banned(peer_id):
            self.forgive(peer_id)

    def forgive(self, peer_id: str) -> None:
        """Forget everything about ``peer_id``: its strikes and any ban."""
        self._strikes.pop(peer_id, None)
        self._until.pop(peer_id, None)
