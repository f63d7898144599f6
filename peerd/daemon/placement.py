"""Which blocks a peer hosts, and when it should move: pure functions, no I/O.

The swarm has no coordinator, so every peer runs the same rule on the same public data (the DHT
records) and places *itself*. The rule, in words:

* A peer hosts as many contiguous blocks as fit its memory budget (weights + its KV cache budget
  + a reserve), because a longer span means fewer network hops per token for clients.
* It starts where the swarm is weakest: first where it covers the most blocks that nobody serves
  (gaps make the model unusable), then where the resulting bottleneck -- the minimum total
  throughput over all blocks -- is highest, then where its span's current throughput is lowest.
  Remaining ties are broken at random, so peers that decide at the same moment tend to spread.
* Later, every (randomised) period it asks whether moving would raise the bottleneck by more than
  a threshold (hysteresis: a peer must not oscillate between two nearly equal places), and moves
  only if no block would be left without a peer by its departure.

The same idea as Petals' block selection (throughput-weighted swarm balance), written as small
functions that unit tests can drive through whole simulated swarms.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "PlacedPeer",
    "Placement",
    "block_throughputs",
    "blocks_that_fit",
    "choose_placement",
    "decide_move",
    "gaps",
    "recheck_after_joining",
]


@dataclass(frozen=True)
class PlacedPeer:
    """What placement needs to know about one peer (from its DHT record)."""

    peer_id: str
    start: int
    end: int
    tokens_per_s: float  # per-block throughput this peer contributes to each of its blocks


@dataclass(frozen=True)
class Placement:
    """A decision and the reason for it (logged by the daemon, so operators can see why)."""

    start: int
    end: int
    reason: str


def blocks_that_fit(
    *, budget_bytes: int, bytes_per_block: int, cache_bytes_per_block: int, reserve_bytes: int, num_blocks: int
) -> int:
    """How many blocks fit ``budget_bytes`` after a reserve; each block needs weights + its KV cache."""
    per_block = bytes_per_block + cache_bytes_per_block
    if per_block <= 0:
        raise ValueError("a block must cost some memory")
    return max(0, min(num_blocks, (budget_bytes - reserve_bytes) // per_block))


def block_throughputs(peers: Iterable[PlacedPeer], num_blocks: int) -> list[float]:
    """Total throughput serving each block (0.0 = a gap)."""
    totals = [0.0] * num_blocks
    for peer in peers:
        start, end, tokens_per_s = peer.start, peer.end, peer.tokens_per_s
        # clipped to the model without min/max calls: every peer of a large swarm sums this often
        for block in range(start if start > 0 else 0, end if end < num_blocks else num_blocks):
            totals[block] += tokens_per_s
    return totals


def gaps(peers: Iterable[PlacedPeer], num_blocks: int) -> list[int]:
    covered = [False] * num_blocks
    for peer in peers:
        for block in range(max(0, peer.start), min(num_blocks, peer.end)):
            covered[block] = True
    return [b for b, c in enumerate(covered) if not c]


def _score(totals: Sequence[float], start: int, length: int, tokens_per_s: float) -> tuple[int, float, float]:
    """Higher is better: (gap blocks filled, bottleneck after placing, -current throughput of the span)."""
    window = totals[start : start + length]
    filled = sum(1 for t in window if t == 0.0)
    after = list(totals)
    for block in range(start, start + length):
        after[block] += tokens_per_s
    return filled, min(after), -sum(window)


def _best_starts(totals: list[float], length: int, tokens_per_s: float) -> tuple[tuple[int, float, float], list[int]]:
    """The highest ``_score`` over every start and the starts that reach it (ascending), equal bit for
    bit to scoring each start with ``_score``, but cheaper: the bottleneck outside the window comes
    from prefix and suffix minima (the minimum of ``t + x`` over a window is ``min(t) + x`` exactly:
    rounding is monotonic), filled blocks from a running count, and the span's sum (in the same
    order as ``_score``) only for the starts tied on the first two. Every peer of a large swarm
    rebalances with this every few minutes (docs/scale.md)."""
    n = len(totals)
    prefix = [float("inf")] * (n + 1)  # prefix[i] = min(totals[:i])
    suffix = [float("inf")] * (n + 1)  # suffix[i] = min(totals[i:])
    zeros = [0] * (n + 1)  # zeros[i] = blocks nobody serves among totals[:i]
    for i in range(n):
        t, u = totals[i], totals[n - 1 - i]
        prefix[i + 1] = t if t < prefix[i] else prefix[i]  # min(), without the call
        suffix[n - 1 - i] = u if u < suffix[n - i] else suffix[n - i]
        zeros[i + 1] = zeros[i] + (t == 0.0)
    best: tuple[int, float] | None = None
    starts: list[int] = []
    for start in range(n - length + 1):
        stop = start + length
        bottleneck = min(prefix[start], min(totals[start:stop]) + tokens_per_s, suffix[stop])
        key = (zeros[stop] - zeros[start], bottleneck)
        if best is None or key > best:
            best, starts = key, [start]
        elif key == best:
            starts.append(start)
    assert best is not None, "length must be within 1..len(totals)"
    sums = [-sum(totals[start : start + length]) for start in starts]
    top = max(sums)
    return (best[0], best[1], top), [start for start, value in zip(starts, sums, strict=True) if value == top]


def choose_placement(
    peers: Sequence[PlacedPeer],
    *,
    num_blocks: int,
    length: int,
    tokens_per_s: float,
    rng: random.Random | None = None,
) -> Placement:
    """Where a new peer hosting ``length`` blocks should start (see the module docstring)."""
    if not 1 <= length <= num_blocks:
        raise ValueError(f"cannot host {length} blocks of a {num_blocks}-block model")
    rng = rng or random.Random()
    totals = block_throughputs(peers, num_blocks)
    best, starts = _best_starts(totals, length, tokens_per_s)
    start = rng.choice(starts)
    filled, bottleneck, _ = best
    if filled:
        reason = f"fills {filled} block(s) nobody serves"
    else:
        weakest = min(totals[start : start + length])
        reason = f"strengthens the weakest span (its weakest block had {weakest:.0f} tok/s)"
    return Placement(start, start + length, f"{reason}; swarm bottleneck becomes {bottleneck:.0f} tok/s")


def decide_move(
    peers: Sequence[PlacedPeer],
    me: PlacedPeer,
    *,
    num_blocks: int,
    threshold: float = 0.2,
    rng: random.Random | None = None,
) -> Placement | None:
    """A better place for ``me`` if moving raises the bottleneck by more than ``threshold`` (relative).

    ``peers`` is the swarm including ``me``. Returns None to stay. Never returns a move that would
    leave a block uncovered: every block of my current span must be served by someone else, or
    by my new span.
    """
    others = [p for p in peers if p.peer_id != me.peer_id]
    length = me.end - me.start
    current = min(block_throughputs([*others, me], num_blocks))
    candidate = choose_placement(others, num_blocks=num_blocks, length=length, tokens_per_s=me.tokens_per_s, rng=rng)
    if (candidate.start, candidate.end) == (me.start, me.end):
        return None
    moved = PlacedPeer(me.peer_id, candidate.start, candidate.end, me.tokens_per_s)
    after_totals = block_throughputs([*others, moved], num_blocks)
    if any(t == 0.0 for t in after_totals):
        return None  # the move would open a gap (or leave one): stay
    after = min(after_totals)
    # from a gap (current == 0): any gap-free result is better; otherwise demand the hysteresis margin
    improves = after > 0.0 if current == 0.0 else after > current * (1.0 + threshold)
    if not improves:
        return None
    return Placement(
        candidate.start,
        candidate.end,
        f"moving {me.start}:{me.end} -> {candidate.start}:{candidate.end} raises the swarm bottleneck "
        f"from {current:.0f} to {after:.0f} tok/s",
    )


def recheck_after_joining(
    peers: Sequence[PlacedPeer],
    me: PlacedPeer,
    *,
    num_blocks: int,
    rng: random.Random | None = None,
) -> Placement | None:
    """Second look after announcing JOINING: did peers that decided at the same moment collide?

    Peers that start together see the same swarm and may choose the same blocks. Once they have
    announced, each sees the others. A peer re-places itself if a strictly better place exists and
    either (a) a peer with a smaller id overlaps its span -- only the larger id yields, so two
    colliding peers do not both jump to the same next-best place -- or (b) the better place would
    fill more blocks that nobody serves.
    """
    others = [p for p in peers if p.peer_id != me.peer_id]
    length = me.end - me.start
    totals = block_throughputs(others, num_blocks)
    mine = _score(totals, me.start, length, me.tokens_per_s)
    candidate = choose_placement(others, num_blocks=num_blocks, length=length, tokens_per_s=me.tokens_per_s, rng=rng)
    theirs = _score(totals, candidate.start, length, me.tokens_per_s)
    if theirs <= mine:
        return None
    rivals = [p for p in others if p.start < me.end and me.start < p.end and p.peer_id < me.peer_id]
    if rivals:
        why = f"{rivals[0].peer_id[:12]} chose an overlapping span at the same time"
    elif theirs[0] > mine[0]:
        why = "a place with more uncovered blocks appeared"
    else:
        return None
    return Placement(candidate.start, candidate.end, f"{why}; {candidate.reason}")
