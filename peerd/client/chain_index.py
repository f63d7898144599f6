"""Many route plans over one view, fast: the planner's pairs laid out once.

``plan_over_table`` (``routing.py``) is exact and runs in milliseconds over 10,000 peers, which is
fine for one client but not for the swarm simulator, whose clients plan over a hundred sessions a
second against the same view. ``ChainLayout`` lays out the (peer, hosted block) pairs of a view
block by block once, so a plan steps through each block's pairs as one slice; it notes per pair
whether the ride was entered there and recovers the entry points on the walk back instead of
carrying them through the DP. ``pruned_chains.PrunedChains`` builds on it to set aside the peers
no plan can pick.

It returns exactly ``plan_over_table``'s routes (``tests/unit/test_chain_index.py`` compares them
on random swarms, with the previous implementation as the reference).
"""

from __future__ import annotations

import numpy as np

from peerd.client.chain_loops import _boundary_dp, _compiled, _cut_pairs, _laid_out_pairs

__all__ = ["COMPILED", "ChainLayout"]

_COMPILED_DP = _compiled(_boundary_dp)
_COMPILED_LAY_OUT = _compiled(_laid_out_pairs)
_COMPILED_CUT = _compiled(_cut_pairs)
COMPILED = _COMPILED_DP is not None


class ChainLayout:
    """``plan_over_table``'s (peer, hosted block) pairs for a set of peers, laid out block by block
    once, so that many plans over the same peers (a client's view between two DHT reads) skip the
    sort and step through each block's pairs as one slice. A peer that cannot be used costs an
    infinite hop. The routes are those of ``plan_over_table`` without a layout: the same costs, added
    in the same order, and the same ties (a block's pairs in peer order)."""

    def __init__(self, start: np.ndarray, end: np.ndarray) -> None:
        if _COMPILED_LAY_OUT is not None and (start.size == 0 or start.min() >= 0):
            self._set(start.size, *_COMPILED_LAY_OUT(start.astype(np.int64), end.astype(np.int64)))
            return
        length = np.maximum(0, end - start)
        peer_of = np.repeat(np.arange(start.size), length)
        block_of = np.arange(peer_of.size) - np.repeat(np.cumsum(length) - length - start, length)
        order = np.argsort(block_of.astype(np.int32), kind="stable")  # by block, then by peer
        position = np.empty(order.size, dtype=np.int64)
        position[order] = np.arange(order.size)
        block = block_of[order]
        # the same peer's pair for the block before, or the last slot (an infinite cost) if none
        prev = np.where(block > start[peer_of[order]], position[np.maximum(order - 1, 0)], order.size)
        self._set(start.size, peer_of[order], block, prev)

    def _set(self, peers: int, peer: np.ndarray, block: np.ndarray, prev: np.ndarray) -> None:
        self.peers, self.peer, self.block, self.prev = peers, peer, block, prev
        top = int(block.max()) + 2 if block.size else 1
        self.bounds = np.searchsorted(block, np.arange(top))
        self._bounds: list[int] = self.bounds.tolist()
        self._cost = np.full(block.size + 1, np.inf)  # per pair, rewritten by each plan; the last stays inf
        self._entered = np.zeros(0, dtype=bool)  # per pair, numpy DP only: the ride was entered at this block
        self._zeros, self._all = np.zeros(0), np.ones(0, dtype=bool)  # draws and use of an unscaled plan
        self._enter_ms, self._step_ms = np.empty(peers), np.empty(peers)  # the DP's scratch

    def hosting(self, block: int) -> np.ndarray:
        """The peers hosting ``block``, ascending (none for a block past the last hosted one)."""
        if block + 1 >= len(self._bounds):
            return self.peer[:0]
        return self.peer[self._bounds[block] : self._bounds[block + 1]]

    def subset(self, peers: np.ndarray) -> ChainLayout:
        """``ChainLayout(start[peers], end[peers])`` for ascending peer indices ``peers`` (renumbered
        0, 1, ... in that order), cut out of this one without sorting again."""
        local = np.full(self.peers, -1, dtype=np.int64)
        local[peers] = np.arange(peers.size)
        cut = ChainLayout.__new__(ChainLayout)
        if _COMPILED_CUT is not None:
            cut._set(peers.size, *_COMPILED_CUT(local, self.peer, self.block, self.prev))
            return cut
        kept = local[self.peer] >= 0  # the order (by block, then by peer) is kept
        position = np.append(np.cumsum(kept) - 1, np.count_nonzero(kept))  # the last slot maps to the last
        cut._set(peers.size, local[self.peer[kept]], self.block[kept], position[self.prev[kept]])
        return cut

    def fastest_chain(
        self, hop_ms: np.ndarray, per_block_ms: np.ndarray, start: int, end: int
    ) -> list[tuple[int, int, int]] | None:
        """The boundary DP of ``routing._fastest_chain`` over the laid-out pairs (``hop_ms`` infinite
        for unusable peers): (peer, first block, end block) spans, or None."""
        if _COMPILED_DP is not None:  # both paths check the range themselves
            if self._zeros.size < self.peers:
                self._zeros, self._all = np.zeros(self.peers), np.ones(self.peers, dtype=bool)
            return self.scaled_chain(hop_ms, per_block_ms, self._all, self._zeros, 0.0, start, end)
        return self._fastest_chain_numpy(hop_ms, per_block_ms, start, end)

    def scaled_chain(
        self,
        hop_ms: np.ndarray,
        per_block_ms: np.ndarray,
        use: np.ndarray,
        draws: np.ndarray,
        spread: float,
        start: int,
        end: int,
    ) -> list[tuple[int, int, int]] | None:
        """``fastest_chain(np.where(use, hop_ms * scale, np.inf), per_block_ms * scale, start, end)``
        with ``scale = 1 + spread * draws`` (``routing.cost_factors`` of ``routing.spread_draws``),
        without building those arrays (compiled with numba, else exactly that)."""
        if end + 1 > len(self._bounds):
            return None
        if _COMPILED_DP is None:
            scale = 1.0 + spread * draws
            return self._fastest_chain_numpy(np.where(use, hop_ms * scale, np.inf), per_block_ms * scale, start, end)
        spans = np.empty((end - start, 3), dtype=np.int64)
        n = _COMPILED_DP(
            self.bounds,
            self.peer,
            self.prev,
            self.block,
            hop_ms,
            per_block_ms,
            use,
            draws,
            spread,
            start,
            end,
            self._cost,
            spans,
            self._enter_ms,
            self._step_ms,
        )
        return None if n < 0 else [(int(p), int(s), int(e)) for p, s, e in spans[:n][::-1].tolist()]

    def _fastest_chain_numpy(
        self, hop_ms: np.ndarray, per_block_ms: np.ndarray, start: int, end: int
    ) -> list[tuple[int, int, int]] | None:
        """``fastest_chain`` without numba: each block's pairs as one numpy slice."""
        if self._entered.size != self.block.size:
            self._entered = np.zeros(self.block.size, dtype=bool)
        bounds, cost, entered = self._bounds, self._cost, self._entered
        if end + 1 > len(bounds):
            return None
        first = bounds[start]
        hop = hop_ms.take(self.peer[first : bounds[end]])  # per pair of the blocks planned, from `first`
        step = per_block_ms.take(self.peer[first : bounds[end]])
        best = 0.0
        cheapest: list[int] = []  # per block: the pair the cheapest route to the next boundary ends on
        for block in range(start, end):
            a, z = bounds[block], bounds[block + 1]
            if a == z:
                return None
            here = cost[a:z]
            enter = hop[a - first : z - first] + best
            if block > start:
                cont = cost.take(self.prev[a:z])  # the same peer's state after block - 1
                np.less(enter, cont, out=entered[a:z])
                np.minimum(enter, cont, out=here)
            else:  # nothing to continue at the first block
                np.less(enter, np.inf, out=entered[a:z])
                here[:] = enter
            here += step[a - first : z - first]
            k = int(here.argmin())
            best = float(here[k])
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
