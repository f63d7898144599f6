"""Peers that can never be on a client's fastest route, so a plan over thousands can skip them.

Peer q *robustly dominates* peer p when q hosts every block p hosts and both q's hop cost and its
per-block cost, times ``1 + spread``, are still below p's. The spread scales each peer's costs by a
factor in [1, 1 + spread) (``cost_factors``), so whatever the draws, swapping p's ride for q's over
the same blocks makes any route strictly cheaper: p is never on the fastest route, nor on the
cheapest way to any block boundary, so planning without it gives the same route. That holds only
while q may be used in the plan (not banned, with room), so each pruned peer keeps a few dominators
and is planned over again in a plan where none of them is usable, or where costs changed (measured
speeds) so that none dominates any more. With 10,000 simulated peers about nine in ten are
dominated for a client (docs/scale.md), which makes a plan several times cheaper.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Dominators"]

POOL = 512  # dominators are looked for among this many peers with the cheapest blocks
KEEP = 3  # dominators kept per peer


class Dominators:
    """For one set of peers (a client's view): up to ``KEEP`` dominators per peer, found among the
    ``POOL`` peers with the lowest cost per block (hop spread over its blocks plus compute)."""

    def __init__(
        self, start: np.ndarray, end: np.ndarray, hop_ms: np.ndarray, per_block_ms: np.ndarray, spread: float
    ) -> None:
        self.factor = 1.0 + spread
        n = start.size
        self.of = np.full((n, KEEP), -1, dtype=np.int64)
        blocks = end - start
        listed = np.flatnonzero(blocks > 0)
        if not listed.size:
            return
        per_block = hop_ms[listed] / blocks[listed] + per_block_ms[listed]
        pool = listed[np.argsort(per_block, kind="stable")[:POOL]]
        thirds = [0, pool.size // 3, 2 * pool.size // 3]
        for first in range(0, n, 1024):
            rows = np.arange(first, min(n, first + 1024))
            dominated = self._dominates(pool[None, :], rows[:, None], start, end, hop_ms, per_block_ms)
            for k, lo in enumerate(thirds):
                tail = dominated[:, lo:]
                col = lo + np.argmax(tail, axis=1)
                self.of[rows, k] = np.where(tail.any(axis=1), pool[col], -1)

    def _dominates(
        self,
        q: np.ndarray,
        p: np.ndarray,
        start: np.ndarray,
        end: np.ndarray,
        hop_ms: np.ndarray,
        per_block_ms: np.ndarray,
    ) -> np.ndarray:
        return (
            (start[q] <= start[p])
            & (end[q] >= end[p])
            & (hop_ms[q] * self.factor < hop_ms[p])
            & (per_block_ms[q] * self.factor < per_block_ms[p])
        )

    def needed(
        self, start: np.ndarray, end: np.ndarray, hop_ms: np.ndarray, per_block_ms: np.ndarray, usable: np.ndarray
    ) -> np.ndarray:
        """Peers a plan with these (unscaled) costs and usable mask must consider: all but those with
        a usable dominator that, checked on these costs and spans, still dominates."""
        if start.size > self.of.shape[0]:  # peers listed since: no dominators known for them
            self.of = np.concatenate([self.of, np.full((start.size - self.of.shape[0], KEEP), -1, np.int64)])
        p = np.arange(start.size)[:, None]
        q = np.maximum(self.of, 0)
        held = (self.of >= 0) & usable[q] & self._dominates(q, p, start, end, hop_ms, per_block_ms)
        return ~held.any(axis=1)
