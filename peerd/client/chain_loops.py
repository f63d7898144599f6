"""The loops of the simulator's planners (``chain_index.ChainLayout``,
``pruned_chains.PrunedChains``), written as plain Python over arrays so that numba can compile
them (``compiled``; the `simulate` extra). Each has a numpy counterpart in those modules that runs
without numba and gives the same result: the tests run both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _boundary_dp(
    bounds: np.ndarray,
    peer: np.ndarray,
    prev: np.ndarray,
    block: np.ndarray,
    hop_ms: np.ndarray,
    per_block_ms: np.ndarray,
    use: np.ndarray,
    draws: np.ndarray,
    spread: float,
    start: int,
    end: int,
    cost: np.ndarray,
    spans: np.ndarray,
    enter_ms: np.ndarray,
    step_ms: np.ndarray,
) -> int:
    """``ChainLayout.fastest_chain``'s DP and walk back as one loop over the pairs (compiled with
    numba) for hop costs ``hop_ms x scale`` where ``use`` (else infinite) and block costs
    ``per_block_ms x scale``, with ``scale = 1 + spread x draws`` (``routing.cost_factors``): the
    same products and sums in the same order, ties to the lowest pair, so the same routes. Writes
    the spans last first into ``spans`` (rows: peer, first block, end block) and returns how many,
    or -1. ``enter_ms`` and ``step_ms``: scratch, one slot per peer, for the scaled costs (computed
    once per peer, not per pair, and no branch on ``use`` per pair). Whether a pair's ride was
    entered there is not stored per pair: the walk back compares the same two sums again (each
    pair's cost is written once per plan, so they are still there), a fifth of the DP's time."""
    for p in range(enter_ms.size):  # the layout's peers
        if use[p]:
            scale = 1.0 + spread * draws[p]
            enter_ms[p], step_ms[p] = hop_ms[p] * scale, per_block_ms[p] * scale
        else:  # an unusable peer's pairs stay infinite
            enter_ms[p], step_ms[p] = np.inf, 0.0
    best = 0.0
    cheapest = np.empty(end - start, np.int64)
    for b in range(start, end):
        a, z = bounds[b], bounds[b + 1]
        if a == z:
            return -1
        k, low = -1, np.inf
        if b == start:  # nothing to continue at the first block
            for i in range(a, z):
                p = peer[i]
                here = enter_ms[p] + best + step_ms[p]
                cost[i] = here
                if here < low:
                    k, low = i, here
        else:
            for i in range(a, z):
                p = peer[i]
                enter = enter_ms[p] + best
                cont = cost[prev[i]]
                here = (enter if enter < cont else cont) + step_ms[p]
                cost[i] = here
                if here < low:
                    k, low = i, here
        if k < 0:
            return -1
        best = low
        cheapest[b - start] = k
    n, boundary = 0, end
    while boundary > start:
        pair = cheapest[boundary - 1 - start]
        while block[pair] > start:  # ride back along the same peer to where it was entered
            before = cost[cheapest[block[pair] - 1 - start]]  # the cheapest route to the pair's block
            if enter_ms[peer[pair]] + before < cost[prev[pair]]:
                break
            pair = prev[pair]
        spans[n, 0], spans[n, 1], spans[n, 2] = peer[pair], block[pair], boundary
        n += 1
        boundary = block[pair]
    return n


def _compiled(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """``function`` compiled by numba (the `simulate` extra: the simulator's clients plan hundreds of
    routes a second), or None without numba: then its numpy counterpart runs instead, slower."""
    try:
        from numba import njit
    except ImportError:
        return None
    compiled: Callable[..., Any] = njit(cache=True, nogil=True)(function)
    return compiled


def _cut_pairs(
    local: np.ndarray, peer: np.ndarray, block: np.ndarray, prev: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ChainLayout.subset``'s pairs in one pass (compiled with numba): the pairs of peers with a
    ``local`` index, in their order, renumbered, each ``prev`` pointing into the cut (the last slot
    to the cut's last slot). A pair's ``prev`` comes before it (or is the last slot), so its new
    position is known when the pair is reached."""
    n = peer.size
    position = np.empty(n + 1, np.int64)
    cut_peer, cut_block, cut_prev = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    count = 0
    for i in range(n):  # no branch: a pair left out is written and then overwritten (a third faster)
        q = local[peer[i]]
        position[i] = count
        cut_peer[count], cut_block[count] = q, block[i]
        cut_prev[count] = -1 if prev[i] == n else position[prev[i]]  # -1: the last slot, known at the end
        count += q >= 0
    for j in range(count):
        if cut_prev[j] < 0:
            cut_prev[j] = count
    return cut_peer[:count], cut_block[:count], cut_prev[:count]


def _considered_pairs(ok: np.ndarray, dominators: np.ndarray, considered: np.ndarray) -> None:
    """``PrunedChains._considered`` into ``considered`` in one pass (compiled with numba)."""
    for q in range(considered.size):
        keep = ok[q]
        if keep:
            for r in range(dominators.shape[0]):
                if ok[dominators[r, q]]:
                    keep = False
                    break
        considered[q] = keep


def _laid_out_pairs(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ChainLayout``'s pairs by a counting sort over the blocks (compiled with numba; starts must
    not be negative): by block, then by peer, as the stable argsort lays them out."""
    top, total = 0, 0
    for p in range(start.size):
        if end[p] > start[p]:
            total += end[p] - start[p]
            top = max(top, end[p])
    following = np.zeros(top + 1, np.int64)  # per block: where its next pair goes
    for p in range(start.size):
        for b in range(start[p], end[p]):
            following[b + 1] += 1
    for b in range(top):
        following[b + 1] += following[b]
    peer, block, prev = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int64)
    for p in range(start.size):
        last = total  # the last slot (an infinite cost): no pair of this peer before its first block
        for b in range(start[p], end[p]):
            i = following[b]
            following[b] += 1
            peer[i], block[i], prev[i] = p, b, last
            last = i
    return peer, block, prev


def _carried_lists(
    listed: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    hop_ms: np.ndarray,
    per_block_ms: np.ndarray,
    candidates: np.ndarray,
    factor: float,
    dominators: np.ndarray,
    counts: np.ndarray,
) -> None:
    """``PrunedChains._carried`` into ``dominators`` (rows x peers) and ``counts``: the ``listed``
    dominators of a view with fewer or as many peers (its "none" is its peer count) that are
    candidates and still dominate with these arrays; the others become "none" (this peer count)."""
    rows, old = listed.shape
    size = start.size
    counts[:] = 0
    for r in range(rows):
        for q in range(size):
            d = listed[r, q] if q < old else old
            valid = (
                d < old
                and candidates[d]
                and start[d] <= start[q]
                and end[d] >= end[q]
                and hop_ms[d] * factor < hop_ms[q]
                and per_block_ms[d] * factor < per_block_ms[q]
            )
            dominators[r, q] = d if valid else size
            counts[q] += valid


def _listed_again(
    who: np.ndarray,
    pools: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    hop_ms: np.ndarray,
    per_block_ms: np.ndarray,
    trusted: np.ndarray,
    usable: np.ndarray,
    factor: float,
    dominators: np.ndarray,
    counts: np.ndarray,
) -> None:
    """``PrunedChains._look_for`` for the peers ``who``: each one's dominators among the pool of its
    first block (trusted, and ``usable``: masks with a last False slot), listed spread over those
    found, where that finds at least as many as are listed."""
    size = start.size
    keep = dominators.shape[0]
    found = np.empty(pools.shape[1], np.int64)
    for w in who:
        total = 0
        for d in pools[start[w]]:
            if (
                d < size
                and trusted[d]
                and usable[d]
                and start[d] <= start[w]
                and end[d] >= end[w]
                and hop_ms[d] * factor < hop_ms[w]
                and per_block_ms[d] * factor < per_block_ms[w]
            ):
                found[total] = d
                total += 1
        if total >= counts[w]:
            for slot in range(keep):
                dominators[slot, w] = found[slot * total // keep] if total > slot else size
            counts[w] = total


def _marked_usable(
    ok: np.ndarray,
    hosts: np.ndarray,
    usable: np.ndarray,
    kept: np.ndarray,
    use: np.ndarray,
    outside: np.ndarray,
    listed: np.ndarray,
) -> int:
    """``PrunedChains._mark_usable``: ``ok`` = ``hosts`` and ``usable`` (its last slot stays False),
    ``use`` = ``ok`` of the laid-out peers ``kept``; returns how many of the peers ``outside`` (not
    laid out) are usable with no usable dominator among their ``listed`` ones (rows x those peers)."""
    for q in range(hosts.size):
        ok[q] = hosts[q] and usable[q]
    for k in range(kept.size):
        use[k] = ok[kept[k]]
    stranded = 0
    for j in range(outside.size):
        if ok[outside[j]]:
            covered = False
            for r in range(listed.shape[0]):
                if ok[listed[r, j]]:
                    covered = True
                    break
            if not covered:
                stranded += 1
    return stranded


def _whole_mean(headroom: np.ndarray, pool: np.ndarray) -> float:
    """The mean of ``headroom`` over the ``pool`` peers if they are whole numbers whose sum is exact
    in any order (then numpy's pairwise sum gives the same), else NaN (also for an empty pool)."""
    total, magnitude, n = 0.0, 0.0, 0
    for q in range(headroom.size):
        if pool[q]:
            h = headroom[q]
            if h != np.floor(h):
                return np.nan
            total += h
            magnitude += abs(h)
            n += 1
    if n == 0 or magnitude >= 2.0**53:  # then some partial sum may round
        return np.nan
    return total / n


def _draw_inputs(
    headroom: np.ndarray,
    kept: np.ndarray,
    use: np.ndarray,
    uniforms: np.ndarray,
    mean: float,
    base: np.ndarray,
    exponent: np.ndarray,
) -> int:
    """``PrunedChains._draw``'s inputs to ``routing.spread_draws``, per laid-out peer (``kept``): the
    uniform and ``(headroom + 1) / (mean + 1)`` of those in ``use``, 1 and 1 for the others.
    Returns how many are in use. (One loop with ``_whole_mean``'s ran 2.5x slower than the two.)"""
    shift = mean + 1.0
    used = 0
    for k in range(kept.size):
        if use[k]:
            base[k], exponent[k] = uniforms[kept[k]], (headroom[kept[k]] + 1.0) / shift
            used += 1
        else:
            base[k], exponent[k] = 1.0, 1.0
    return used
