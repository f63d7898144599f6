"""Many route plans over one view, fast: the planner's pairs laid out once, and the peers no plan can
pick set aside.

``plan_over_table`` (``routing.py``) is exact and runs in milliseconds over 10,000 peers, which is
fine for one client but not for the swarm simulator, whose clients plan over a hundred sessions a
second against the same view. Two structures make those plans cheaper without changing them:

* ``ChainLayout`` lays out the (peer, hosted block) pairs of a view block by block once, so a plan
  steps through each block's pairs as one slice; it notes per pair whether the ride was entered
  there and recovers the entry points on the walk back instead of carrying them through the DP.
* ``PrunedChains`` adds, per client (its hop costs) and per set of per-block speeds, the peers
  that a plan never needs: a peer ``q`` is *dominated* by ``p`` if ``p`` hosts every block ``q``
  hosts, and ``p``'s hop and per-block costs are below ``q``'s by more than the spread's largest
  factor. Then whatever the spread draws, on every block ``p``'s DP state costs strictly less than
  ``q``'s (an induction over the blocks: ``p`` can be entered wherever ``q`` can, and continues
  wherever ``q`` continues), so ``q`` is never the cheapest entry and dropping it changes no plan.
  A plan drops ``q`` only if one of the dominators listed for it is usable in that plan (bans and
  full peers change per plan); it then plans over the usual few hundred undominated peers.

Both return exactly ``plan_over_table``'s routes (``tests/unit/test_routing.py`` compares them on
random swarms, with the previous implementation as the reference).
"""

from __future__ import annotations

import numpy as np

from peerd.client.routing import RouteTable, cost_factors, plan_over_table

__all__ = ["ChainLayout", "PrunedChains"]

# A dominator's costs must be below (1 + spread) x (1 + DOMINANCE_MARGIN) times the dominated peer's:
# the margin keeps the inequality strict after floating-point rounding of the DP's sums (their
# relative error is ~1e-14; a step is never 1e-6 of a route's cost here).
DOMINANCE_MARGIN = 1e-6


class ChainLayout:
    """``plan_over_table``'s (peer, hosted block) pairs for a set of peers, laid out block by block
    once, so that many plans over the same peers (a client's view between two DHT reads) skip the
    sort and step through each block's pairs as one slice. A peer that cannot be used costs an
    infinite hop. The routes are those of ``plan_over_table`` without a layout: the same costs, added
    in the same order, and the same ties (a block's pairs in peer order)."""

    def __init__(self, start: np.ndarray, end: np.ndarray) -> None:
        length = np.maximum(0, end - start)
        peer_of = np.repeat(np.arange(start.size), length)
        block_of = np.arange(peer_of.size) - np.repeat(np.cumsum(length) - length - start, length)
        order = np.argsort(block_of.astype(np.int32), kind="stable")  # by block, then by peer
        self.peer = peer_of[order]
        self.block = block_of[order]
        self.start = start[self.peer]
        position = np.empty(order.size, dtype=np.int64)
        position[order] = np.arange(order.size)
        # the same peer's pair for the block before, or the last slot (an infinite cost) if none
        self.prev = np.where(self.block > self.start, position[np.maximum(order - 1, 0)], order.size)
        top = int(self.block.max()) + 2 if order.size else 1
        self.bounds = np.searchsorted(self.block, np.arange(top))
        self._bounds: list[int] = self.bounds.tolist()
        self._cost = np.full(order.size + 1, np.inf)  # per pair, rewritten by each plan; the last stays inf
        self._entered = np.zeros(order.size, dtype=bool)  # per pair: the ride was entered at this block

    def fastest_chain(
        self, hop_ms: np.ndarray, per_block_ms: np.ndarray, start: int, end: int
    ) -> list[tuple[int, int, int]] | None:
        """The boundary DP of ``routing._fastest_chain`` over the laid-out pairs (``hop_ms`` infinite
        for unusable peers): (peer, first block, end block) spans, or None."""
        bounds, cost, entered = self._bounds, self._cost, self._entered
        if end + 1 > len(bounds):
            return None
        best = 0.0
        cheapest: list[int] = []  # per block: the pair the cheapest route to the next boundary ends on
        for block in range(start, end):
            a, z = bounds[block], bounds[block + 1]
            if a == z:
                return None
            peers = self.peer[a:z]
            enter = hop_ms.take(peers)
            enter += best
            if block > start:
                cont = cost.take(self.prev[a:z])  # the same peer's state after block - 1
                np.less(enter, cont, out=entered[a:z])
                np.minimum(enter, cont, out=enter)
            else:  # nothing to continue at the first block
                np.less(enter, np.inf, out=entered[a:z])
            enter += per_block_ms.take(peers)
            cost[a:z] = enter
            k = int(enter.argmin())
            best = float(enter[k])
            if best == np.inf:
                return None
            cheapest.append(a + k)
        return self._walk_back(cheapest, start, end)

    def _walk_back(self, cheapest: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
        chain: list[tuple[int, int, int]] = []
        boundary = end
        while boundary > start:
            pair = cheapest[boundary - 1 - start]
            while not self._entered[pair]:  # ride back along the same peer to where it was entered
                pair = int(self.prev[pair])
            entered_at = int(self.block[pair])
            chain.append((int(self.peer[pair]), entered_at, boundary))
            boundary = entered_at
        chain.reverse()
        return chain


class PrunedChains:
    """``plan_over_table`` for many plans over one set of peers with fixed hop and per-block costs
    (before the spread): a client's view and speed book between two updates. Peers dominated by a
    usable peer (the module docstring) are left out of each plan; the rest are laid out once.

    ``candidates``: the peers plans may use (a plan's ``usable`` is normally a subset; a peer
    outside is planned correctly, only more slowly). ``layout``: a ``ChainLayout`` of ``start`` and
    ``end``, if the caller keeps one for the view. ``pool``: per block, how many of the cheapest
    peers are tried as dominators; ``keep``: how many dominators are listed per peer.
    """

    def __init__(
        self,
        start: np.ndarray,
        end: np.ndarray,
        hop_ms: np.ndarray,
        per_block_ms: np.ndarray,
        candidates: np.ndarray,
        *,
        spread: float,
        layout: ChainLayout | None = None,
        pool: int = 16,
        keep: int = 3,
    ) -> None:
        self.start, self.end, self.hop_ms, self.per_block_ms, self.spread = start, end, hop_ms, per_block_ms, spread
        self.size = start.size
        candidates = candidates & (start < end)
        dominators = self._dominators(candidates, layout or ChainLayout(start, end), pool, keep)
        self.dominators = dominators  # (keep, size): listed dominators per peer, self.size where none
        # candidates with none: every plan considers them (a plan that may use another peer not listed
        # here, or dominated by no usable peer, plans over every peer instead)
        self.kept = np.flatnonzero(candidates & (dominators[0] == self.size))
        self.layout = ChainLayout(start[self.kept], end[self.kept])
        self._kept_hop, self._kept_step = hop_ms[self.kept], per_block_ms[self.kept]
        self._usable = np.zeros(self.size + 1, dtype=bool)  # scratch: a plan's usable peers, the last slot False
        self.fallbacks = 0  # plans that had to consider a peer outside ``kept``

    def _dominators(self, candidates: np.ndarray, layout: ChainLayout, pool: int, keep: int) -> np.ndarray:
        """Per peer, up to ``keep`` candidate peers that dominate it, tried among the ``pool`` peers
        with the lowest hop + 8 x per-block cost on the peer's first block."""
        size, factor = self.size, (1.0 + self.spread) * (1.0 + DOMINANCE_MARGIN)
        score = self.hop_ms + 8.0 * self.per_block_ms
        blocks = len(layout.bounds) - 1
        pools = np.full((max(1, blocks), pool), size, dtype=np.int64)
        for block in range(blocks):
            peers = layout.peer[layout.bounds[block] : layout.bounds[block + 1]]
            peers = peers[candidates[peers]]
            if peers.size > pool:
                peers = peers[np.argpartition(score[peers], pool - 1)[:pool]]
            pools[block, : peers.size] = peers[np.argsort(score[peers], kind="stable")]
        found = np.full((keep, size), size, dtype=np.int64)
        who = np.flatnonzero(candidates)
        if not who.size:
            return found
        tried = pools[self.start[who]]  # (peers, pool): each covers the peer's first block
        end = np.append(self.end, -1)
        hop = np.append(self.hop_ms, np.inf) * factor
        step = np.append(self.per_block_ms, np.inf) * factor
        dominates = (
            (end[tried] >= self.end[who, None])
            & (hop[tried] < self.hop_ms[who, None])
            & (step[tried] < self.per_block_ms[who, None])
        )
        # the listed dominators are the last found (the least cheap): the cheapest peers fill up first
        for slot in range(keep):
            last = pool - 1 - np.argmax(dominates[:, ::-1], axis=1)
            has = dominates[np.arange(who.size), last]
            found[slot, who[has]] = tried[has, last[has]]
            dominates[np.flatnonzero(has), last[has]] = False
        return found

    def plan(
        self,
        headroom_tokens: np.ndarray,
        start: int,
        end: int,
        *,
        uniforms: np.ndarray | None,
        usable: np.ndarray | None,
    ) -> list[tuple[int, int, int]] | None:
        """``plan_over_table(RouteTable(start, end, hop_ms, per_block_ms, headroom_tokens), start, end,
        uniforms=uniforms, spread=spread, usable=usable)`` for this object's arrays."""
        ok = self._usable
        ok[: self.size] = self.start < self.end if usable is None else usable & (self.start < self.end)
        covered = ok[self.dominators[0]]
        for row in self.dominators[1:]:
            covered |= ok[row]
        considered = ok[: self.size] & ~covered
        if np.count_nonzero(considered) != np.count_nonzero(considered[self.kept]):  # a dominated peer is
            # usable but none of its dominators is: plan over everything (rare; the same routes)
            self.fallbacks += 1
            table = RouteTable(self.start, self.end, self.hop_ms, self.per_block_ms, headroom_tokens)
            return plan_over_table(table, start, end, uniforms=uniforms, spread=self.spread, usable=usable)
        use = considered[self.kept]
        hop_ms, per_block_ms = self._kept_hop, self._kept_step
        if uniforms is not None and self.spread > 0 and use.any():
            pool = headroom_tokens if usable is None else headroom_tokens[usable]
            peers = self.kept[use]
            scale = np.ones(use.size)
            scale[use] = cost_factors(headroom_tokens[peers], uniforms[peers], self.spread, float(pool.mean()))
            hop_ms, per_block_ms = hop_ms * scale, per_block_ms * scale
        chain = self.layout.fastest_chain(np.where(use, hop_ms, np.inf), per_block_ms, start, end)
        return None if chain is None else [(int(self.kept[i]), s, e) for i, s, e in chain]
