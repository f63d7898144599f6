"""Speed claims are measured, not believed: the decode speed a client plans with for each peer.

A record's throughput is whatever its owner wrote: a peer announcing 1e9 tokens/s got the route of
every fresh client. Here the client times every inference step it sends (network included) and
keeps, per peer, a running estimate of its per-block decode speed. Planning uses that estimate once
a peer has answered :data:`MIN_SAMPLES` steps; before that, the claim capped at
:data:`CLAIM_CAP_FACTOR` x the (low) median claim of the view: a new peer may be somewhat faster
than the others, but one outlier's claim cannot outbid everyone by orders of magnitude. A peer whose
observed speed is under 1/:data:`OVERCLAIM_FACTOR` of its claim is overclaiming: the session leaves
it when another peer can take its blocks, and the ban that comes with leaving doubles on every repeat.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from peerd.swarm.records import ServerRecord

__all__ = ["CLAIM_CAP_FACTOR", "MIN_SAMPLES", "OVERCLAIM_FACTOR", "SpeedBook"]

EWMA = 0.3  # weight of the newest step in a peer's observed speed
CLAIM_CAP_FACTOR = 4.0  # an unmeasured claim counts for at most this many times the median claim
MIN_SAMPLES = 3  # steps before a peer's observed speed replaces its (capped) claim
# Far beyond measurement noise: the client's timing includes the network and the peer's other
# sessions, so an honest peer is often 2-5x under its benchmark, never 20x for long.
OVERCLAIM_FACTOR = 20.0


@dataclass
class _Observed:
    tokens_per_s: float  # per block, one-token steps, as this client saw them
    samples: int


class SpeedBook:
    """Observed per-block decode speeds of the peers one client used, and the speeds it plans with."""

    def __init__(self) -> None:
        self._observed: dict[str, _Observed] = {}

    def observe(self, peer_id: str, blocks: int, tokens: int, elapsed_s: float) -> None:
        """A step of ``tokens`` tokens per row through ``blocks`` blocks took ``elapsed_s``."""
        if blocks <= 0 or tokens <= 0 or elapsed_s <= 0:
            return
        rate = blocks * tokens / elapsed_s
        seen = self._observed.get(peer_id)
        if seen is None:
            self._observed[peer_id] = _Observed(rate, 1)
        else:
            seen.tokens_per_s = (1 - EWMA) * seen.tokens_per_s + EWMA * rate
            seen.samples += 1

    def observed(self, peer_id: str) -> float | None:
        """This client's measured per-block decode speed of ``peer_id``, once measured enough."""
        seen = self._observed.get(peer_id)
        return seen.tokens_per_s if seen is not None and seen.samples >= MIN_SAMPLES else None

    def samples(self, peer_id: str) -> int:
        """How many inference steps of ``peer_id`` this client has timed."""
        seen = self._observed.get(peer_id)
        return seen.samples if seen is not None else 0

    def overclaims(self, record: ServerRecord) -> bool:
        observed = self.observed(record.peer_id)
        return observed is not None and observed * OVERCLAIM_FACTOR < record.decode_tokens_per_s

    def planning_speeds(self, records: Mapping[str, ServerRecord]) -> dict[str, float]:
        """Per peer: the observed speed if measured, else its claim capped (CLAIM_CAP_FACTOR x median)."""
        claims = [r.decode_tokens_per_s for r in records.values() if r.decode_tokens_per_s > 0]
        cap = CLAIM_CAP_FACTOR * statistics.median_low(claims) if claims else 0.0
        speeds = {}
        for peer_id, record in records.items():
            observed = self.observed(peer_id)
            speeds[peer_id] = observed if observed is not None else min(record.decode_tokens_per_s, cap)
        return speeds

    def claimed_vs_observed(self, records: Mapping[str, ServerRecord]) -> dict[str, tuple[float, float | None]]:
        """Per peer of ``records``: (claimed, observed or None) per-block decode tokens/s, for display."""
        return {p: (r.decode_tokens_per_s, self.observed(p)) for p, r in records.items()}
