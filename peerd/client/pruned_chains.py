"""Many route plans over one view, fast: the peers no plan can pick set aside.

``PrunedChains`` adds to a ``ChainLayout``, per client (its hop costs) and per set of per-block
speeds, the peers that a plan never needs: a peer ``q`` is *dominated* by ``p`` if ``p`` hosts
every block ``q`` hosts, and ``p``'s hop and per-block costs are below ``q``'s by more than the
spread's largest factor. Then whatever the spread draws, on every block ``p``'s DP state costs
strictly less than ``q``'s (an induction over the blocks: ``p`` can be entered wherever ``q`` can,
and continues wherever ``q`` continues), so ``q`` is never the cheapest entry and dropping it
changes no plan. A peer is left out of the layout if enough dominators are listed for it; a plan
checks that one of them is usable (bans and full peers change per plan) and otherwise lists again
or lays the peer out. At 10,000 peers about two thirds of the peers stay laid out (a dominator must
host every block of the peer it sets aside: docs/scale.md, finding 10).

It returns exactly ``plan_over_table``'s routes (``tests/unit/test_chain_index.py`` compares them
on random swarms).
"""

from __future__ import annotations

import numpy as np

from peerd.client.chain_index import ChainLayout
from peerd.client.chain_loops import (
    _carried_lists,
    _compiled,
    _considered_pairs,
    _draw_inputs,
    _listed_again,
    _marked_usable,
    _whole_mean,
)
from peerd.client.routing import RouteTable, plan_over_table, spread_draws

__all__ = ["PrunedChains"]

# A dominator's costs must be below (1 + spread) x (1 + DOMINANCE_MARGIN) times the dominated peer's:
# the margin keeps the inequality strict after floating-point rounding of the DP's sums (their
# relative error is ~1e-14; a step is never 1e-6 of a route's cost here).
DOMINANCE_MARGIN = 1e-6

_COMPILED_CONSIDERED = _compiled(_considered_pairs)
_COMPILED_CARRIED = _compiled(_carried_lists)
_COMPILED_LISTED = _compiled(_listed_again)
_COMPILED_MARKED = _compiled(_marked_usable)
_COMPILED_DRAW_INPUTS = _compiled(_draw_inputs)
_COMPILED_WHOLE_MEAN = _compiled(_whole_mean)


class PrunedChains:
    """``plan_over_table`` for many plans over one set of peers with fixed hop and per-block costs
    (before the spread): a client's view and speed book between two updates. Peers with enough
    dominators listed (the module docstring) are left out of the layout, which is built once; a plan
    checks that each of them has a usable one.

    ``candidates``: the peers plans may use (a plan's ``usable`` is normally a subset; a peer
    outside is planned correctly, only more slowly). ``layout``: a ``ChainLayout`` of ``start`` and
    ``end``, if the caller keeps one for the view. ``pool``: per block, how many of the cheapest
    peers are tried as dominators; ``keep``: how many dominators are listed per peer.
    ``reuse_pools``: try ``previous``'s pools again (same peers with new speeds: computing them is
    a third of a rebuild; which peers are tried changes no route, only how many are set aside).
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
        pool: int = 64,
        keep: int = 4,
        robust: int = 3,
        dominators_from: np.ndarray | None = None,
        previous: PrunedChains | None = None,
        reuse_pools: bool = False,
    ) -> None:
        self.start, self.end, self.hop_ms, self.per_block_ms, self.spread = start, end, hop_ms, per_block_ms, spread
        self.size = start.size
        self._hosts = start < end  # peers hosting at least one block
        self.candidates = candidates & self._hosts
        self.full_layout = layout or ChainLayout(start, end)
        self._pool, self._keep, self._robust = pool, keep, robust
        self._usable = np.zeros(self.size + 1, dtype=bool)  # scratch: a plan's usable peers, the last slot False
        self._everyone = np.ones(0, dtype=bool)  # the pool of a plan's mean headroom when all are usable
        self.repairs = 0  # plans that found a usable peer dominated by no usable one, and listed again
        self.fallbacks = 0  # plans that still had to consider a peer outside ``kept``: over every peer
        self._trusted = self.candidates if dominators_from is None else self.candidates & dominators_from
        # where dominators are looked for: _pools_of(_trusted) when first needed, or the previous ones
        self._pools = self._pools_carried(previous) if reuse_pools else None
        if previous is not None and (previous.size > self.size or (previous.spread, previous._keep) != (spread, keep)):
            previous = None  # other peers, another spread or list length: nothing carries over
        if previous is not None:
            self.dominators, self.counts = self._carried(previous)
            # looked for again: peers that lost a listed dominator, and new or changed ones
            redo = self._changed(previous)
            redo[: previous.size] |= self.counts[: previous.size] < previous.counts
        else:
            self.dominators = np.full((keep, self.size), self.size, dtype=np.int64)  # self.size: none
            self.counts = np.zeros(self.size, dtype=np.int64)  # valid dominators listed per peer
            redo = np.ones(self.size, dtype=bool)
        self._look_for(redo & self.candidates & (self.counts < robust))
        # laid out for every plan: the candidates with fewer than ``robust`` dominators (the cheapest
        # peers dominate the most, and they are the ones that fill up and go unusable), or the
        # previous view's laid-out peers if they include those and have the same spans
        kept = np.flatnonzero(self.candidates & (self.counts < robust))
        if previous is not None and self._still_covers(previous, kept):
            self._lay_out(previous.kept, previous.layout)
        else:
            self._lay_out(kept)

    def _pools_carried(self, previous: PrunedChains | None) -> np.ndarray | None:
        """``previous``'s pools, their "none" renumbered, if it has pools for as many blocks: peers in
        them that moved or are no longer trusted are skipped when tried."""
        if previous is None or previous._pools is None or previous.size > self.size:
            return None
        if previous._pools.shape[0] != len(self.full_layout.bounds) - 1:
            return None
        return np.where(previous._pools == previous.size, self.size, previous._pools)

    def _changed(self, previous: PrunedChains) -> np.ndarray:
        """Peers new since ``previous`` or whose span, costs or candidacy changed."""
        n = previous.size
        changed = np.ones(self.size, dtype=bool)
        changed[:n] = (
            (previous.start != self.start[:n])
            | (previous.end != self.end[:n])
            | (previous.hop_ms != self.hop_ms[:n])
            | (previous.per_block_ms != self.per_block_ms[:n])
            | (previous.candidates != self.candidates[:n])
        )
        return changed

    def _carried(self, previous: PrunedChains) -> tuple[np.ndarray, np.ndarray]:
        """``previous``'s listed dominators (index i the same peer in both) that still dominate with
        this object's arrays, and how many per peer: only the others are looked for again."""
        size, factor = self.size, (1.0 + self.spread) * (1.0 + DOMINANCE_MARGIN)
        listed = previous.dominators
        dominators = np.full((listed.shape[0], size), size, dtype=np.int64)
        counts = np.zeros(size, dtype=np.int64)
        if _COMPILED_CARRIED is not None:
            arrays = (self.start, self.end, self.hop_ms, self.per_block_ms, self.candidates)
            _COMPILED_CARRIED(listed, *arrays, factor, dominators, counts)
            return dominators, counts
        dominators[:, : previous.size] = np.where(listed == previous.size, size, listed)
        start, end = np.append(self.start, np.iinfo(np.int64).max), np.append(self.end, -1)
        hop, step = np.append(self.hop_ms, np.inf) * factor, np.append(self.per_block_ms, np.inf) * factor
        candidates = np.append(self.candidates, False)
        for row in dominators:
            valid = (
                candidates[row]
                & (start[row] <= self.start)
                & (end[row] >= self.end)
                & (hop[row] < self.hop_ms)
                & (step[row] < self.per_block_ms)
            )
            row[~valid] = size
            counts += valid
        return dominators, counts

    def _still_covers(self, previous: PrunedChains, kept: np.ndarray) -> bool:
        """Whether ``previous``'s laid-out peers include ``kept``, with unchanged spans, and not too
        many more (each costs every plan a little)."""
        laid = previous.kept
        if laid.size > 1.25 * kept.size + 64:
            return False
        inside = np.zeros(self.size, dtype=bool)
        inside[laid] = True
        return (
            bool(inside[kept].all())
            and bool((previous.start[laid] == self.start[laid]).all())
            and bool((previous.end[laid] == self.end[laid]).all())
        )

    def _lay_out(self, kept: np.ndarray, layout: ChainLayout | None = None) -> None:
        self.kept = kept
        self._in_kept = np.zeros(self.size, dtype=bool)
        self._in_kept[kept] = True
        self.layout = layout or self.full_layout.subset(kept)
        self._kept_hop, self._kept_step = self.hop_ms[kept], self.per_block_ms[kept]
        # a plan's scratch, per laid-out peer: usable or not, and its spread draw (with its inputs)
        self._use = np.zeros(kept.size, dtype=bool)
        self._draws, self._no_draws = np.zeros(kept.size), np.zeros(kept.size)
        self._base, self._exponent = np.ones(kept.size), np.ones(kept.size)
        self._outside: tuple[np.ndarray, np.ndarray] | None = None  # _outside_lists(), when needed

    def _outside_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """The hosting peers not laid out, and their listed dominators (rows x those peers): what a
        plan checks for a usable peer that nothing usable sets aside."""
        if self._outside is None:
            outside = np.flatnonzero(self._hosts & ~self._in_kept)
            self._outside = (outside, self.dominators[:, outside])
        return self._outside

    def _mark_usable(self, usable: np.ndarray | None) -> int:
        """Set ``_usable`` (the hosting peers usable now; its last slot stays False) and ``_use`` (the
        same for the laid-out peers); return how many usable peers outside ``kept`` have no usable
        dominator listed."""
        ok, mask = self._usable, self._hosts if usable is None else usable
        outside, listed = self._outside_lists()
        if _COMPILED_MARKED is not None:
            return int(_COMPILED_MARKED(ok, self._hosts, mask, self.kept, self._use, outside, listed))
        ok[: self.size] = self._hosts & mask
        self._use[:] = ok[self.kept]
        return int(np.count_nonzero(ok[outside] & ~ok[listed].any(axis=0)))

    def _pools_of(self, trusted: np.ndarray) -> np.ndarray:
        """Per block, the ``pool`` ``trusted`` peers hosting it with the lowest ``_score`` (padded
        with ``size``): where dominators are looked for."""
        score, layout, pool = self._score(), self.full_layout, self._pool
        pools = np.full((max(1, len(layout.bounds) - 1), pool), self.size, dtype=np.int64)
        for block in range(len(layout.bounds) - 1):
            peers = layout.peer[layout.bounds[block] : layout.bounds[block + 1]]
            peers = peers[trusted[peers]]
            if peers.size > pool:
                peers = peers[np.argpartition(score[peers], pool - 1)[:pool]]
            pools[block, : peers.size] = peers
        return pools

    def _look_for(self, rows: np.ndarray, usable: np.ndarray | None = None) -> None:
        """List again up to ``keep`` dominators for the peers in ``rows``, tried among the pool of
        the peer's first block (only those ``usable``, a mask with a last False slot, if given),
        where that finds at least as many as are listed."""
        who = np.flatnonzero(rows)
        if not who.size:
            return
        self._outside = None  # lists change
        size, keep = self.size, self._keep
        factor = (1.0 + self.spread) * (1.0 + DOMINANCE_MARGIN)
        if self._pools is None:
            self._pools = self._pools_of(self._trusted)
        if _COMPILED_LISTED is not None:
            trusted, everyone = np.append(self._trusted, False), np.ones(size + 1, dtype=bool)
            arrays = (self.start, self.end, self.hop_ms, self.per_block_ms)
            _COMPILED_LISTED(
                who,
                self._pools,
                *arrays,
                trusted,
                everyone if usable is None else usable,
                factor,
                self.dominators,
                self.counts,
            )
            return
        tried = self._pools[self.start[who]]  # (peers, pool): each covers the peer's first block
        start, end = np.append(self.start, np.iinfo(np.int64).max), np.append(self.end, -1)
        hop = np.append(self.hop_ms, np.inf) * factor
        step = np.append(self.per_block_ms, np.inf) * factor
        dominates = (
            np.append(self._trusted, False)[tried]
            & (start[tried] <= self.start[who, None])
            & (end[tried] >= self.end[who, None])
            & (hop[tried] < self.hop_ms[who, None])
            & (step[tried] < self.per_block_ms[who, None])
        )
        if usable is not None:
            dominates &= usable[tried]
        count = np.cumsum(dominates, axis=1)
        total = count[:, -1]
        better = total >= self.counts[who]
        who, tried, count, total = who[better], tried[better], count[better], total[better]
        # listed: dominators spread over those found, not only the cheapest (they fill up first)
        for slot in range(keep):
            column = np.argmax(count > (slot * total)[:, None] // keep, axis=1)
            has = total > slot
            self.dominators[slot, who] = np.where(has, tried[np.arange(who.size), column], size)
        self.counts[who] = total

    def _score(self) -> np.ndarray:
        """Lower for peers likely to dominate many: cheap hop, cheap blocks, a long span."""
        score: np.ndarray = self.hop_ms * self.per_block_ms / np.maximum(1, self.end - self.start)
        return score

    def _repair(self, ok: np.ndarray) -> int:
        """Some usable peer outside ``kept`` has no usable dominator listed (they filled up since they
        were listed): list dominators again for such peers among the peers usable now, and lay out
        with the rest those that still have none. Returns how many usable peers are still outside
        ``kept`` with nothing usable setting them aside (they are not candidates)."""
        self.repairs += 1
        stranded = self._considered(ok)
        stranded[self.kept] = False
        self.counts[stranded] = 0
        self._look_for(stranded & self.candidates, ok)
        considered = self._considered(ok)
        extra = considered & self.candidates
        extra[self.kept] = False
        if extra.any():
            self._lay_out(np.flatnonzero(self._in_kept | extra))  # ascending, as union1d would give
        return int(np.count_nonzero(considered) - np.count_nonzero(considered[self.kept]))

    def _considered(self, ok: np.ndarray) -> np.ndarray:
        """The usable peers (``ok``) that no listed usable dominator sets aside."""
        considered = np.empty(self.size, dtype=bool)
        if _COMPILED_CONSIDERED is not None:
            _COMPILED_CONSIDERED(ok, self.dominators, considered)
            return considered
        covered = ok[self.dominators[0]]
        for row in self.dominators[1:]:
            covered |= ok[row]
        np.logical_and(ok[: self.size], ~covered, out=considered)
        return considered

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
        # some usable peer outside kept has no usable dominator: repair; one still left is no candidate
        if self._mark_usable(usable):
            if self._repair(self._usable):
                self.fallbacks += 1
                table = RouteTable(self.start, self.end, self.hop_ms, self.per_block_ms, headroom_tokens)
                return plan_over_table(
                    table, start, end, uniforms=uniforms, spread=self.spread, usable=usable, layout=self.full_layout
                )
            self._use[:] = self._usable[self.kept]  # the repair may have laid out more peers
        # every usable peer laid out: those a usable peer dominates are never the cheapest (they could
        # be left out, as the module docstring says, but looking that up costs more than planning them)
        drawn = uniforms is not None and self.spread > 0 and self._draw(headroom_tokens, uniforms, usable)
        draws, spread = (self._draws, self.spread) if drawn else (self._no_draws, 0.0)
        chain = self.layout.scaled_chain(self._kept_hop, self._kept_step, self._use, draws, spread, start, end)
        return None if chain is None else [(int(self.kept[i]), s, e) for i, s, e in chain]

    def _draw(self, headroom_tokens: np.ndarray, uniforms: np.ndarray, usable: np.ndarray | None) -> bool:
        """``_draws`` for the laid-out peers in ``_use`` (``spread_draws`` against the mean headroom of
        every usable peer, as ``plan_over_table`` draws them; the other entries are not read), or
        False if none is in use."""
        if _COMPILED_DRAW_INPUTS is not None and _COMPILED_WHOLE_MEAN is not None:
            if self._everyone.size != headroom_tokens.size:
                self._everyone = np.ones(headroom_tokens.size, dtype=bool)
            pool = self._everyone if usable is None else usable
            mean = _COMPILED_WHOLE_MEAN(headroom_tokens, pool)
            if np.isnan(mean):  # not whole numbers (or none usable): numpy's mean, as plan_over_table takes
                if not self._use.any():
                    return False
                mean = float(headroom_tokens[pool].mean())
            inputs = (self._base, self._exponent)
            used = _COMPILED_DRAW_INPUTS(headroom_tokens, self.kept, self._use, uniforms, mean, *inputs)
            if used:  # numpy's power, as spread_draws computes it (numba's differs in the last bit)
                np.power(self._base, self._exponent, out=self._draws)
            return bool(used)
        where = np.flatnonzero(self._use)
        if not where.size:
            return False
        pool = headroom_tokens if usable is None else headroom_tokens[usable]
        peers = self.kept[where]
        self._draws[where] = spread_draws(headroom_tokens[peers], uniforms[peers], float(pool.mean()))
        return True
