"""Placement and rebalancing on synthetic swarms (pure functions, simulated time)."""

from __future__ import annotations

import random

import pytest

from peerd.daemon.placement import (
    PlacedPeer,
    block_throughputs,
    blocks_that_fit,
    choose_placement,
    decide_move,
    gaps,
    recheck_after_joining,
)


def test_blocks_that_fit_counts_weights_cache_and_reserve() -> None:
    assert (
        blocks_that_fit(
            budget_bytes=1000, bytes_per_block=80, cache_bytes_per_block=20, reserve_bytes=200, num_blocks=30
        )
        == 8
    )
    assert (
        blocks_that_fit(
            budget_bytes=10**12, bytes_per_block=80, cache_bytes_per_block=20, reserve_bytes=0, num_blocks=30
        )
        == 30
    )
    assert (
        blocks_that_fit(
            budget_bytes=100, bytes_per_block=80, cache_bytes_per_block=20, reserve_bytes=200, num_blocks=30
        )
        == 0
    )


def test_fills_gaps_first() -> None:
    peers = [PlacedPeer("a", 0, 10, 100.0), PlacedPeer("b", 0, 10, 100.0), PlacedPeer("c", 20, 30, 1.0)]
    choice = choose_placement(peers, num_blocks=30, length=10, tokens_per_s=5.0, rng=random.Random(0))
    assert (choice.start, choice.end) == (10, 20)
    assert "nobody serves" in choice.reason
    # a partial gap: the span that covers most uncovered blocks wins even if it overlaps strong peers
    peers = [PlacedPeer("a", 0, 26, 100.0)]
    choice = choose_placement(peers, num_blocks=30, length=6, tokens_per_s=5.0, rng=random.Random(0))
    assert (choice.start, choice.end) == (24, 30)


def test_without_gaps_strengthens_the_bottleneck() -> None:
    peers = [PlacedPeer("a", 0, 15, 100.0), PlacedPeer("b", 15, 30, 10.0)]
    choice = choose_placement(peers, num_blocks=30, length=15, tokens_per_s=50.0, rng=random.Random(0))
    assert (choice.start, choice.end) == (15, 30)


RECHECKS = 3  # the daemon's JOINING re-checks (peerd.daemon.peer.Peer._choose_blocks)


def simulate_simultaneous_join(
    n_peers: int, num_blocks: int, lengths: list[int], seed: int, jitter_s: float = 2.0, latency_s: float = 0.5
) -> list[PlacedPeer]:
    """Peers start at the same moment. Each waits a random delay (the daemon's jitter), decides on
    the records visible by then (an announcement needs ``latency_s`` to become visible), announces
    JOINING, then re-checks RECHECKS times, one settle period (2 x latency) apart, as the daemon does."""
    rng = random.Random(seed)
    events = [(rng.uniform(0, jitter_s), i, 0) for i in range(n_peers)]  # (time, peer, round)
    announced: dict[str, tuple[float, PlacedPeer]] = {}
    while events:
        events.sort()
        t, i, round_ = events.pop(0)
        name = f"peer{i:02d}"
        visible = [p for at, p in announced.values() if at + latency_s <= t and p.peer_id != name]
        if round_ == 0:
            choice = choose_placement(
                visible, num_blocks=num_blocks, length=lengths[i % len(lengths)], tokens_per_s=10.0, rng=rng
            )
            announced[name] = (t, PlacedPeer(name, choice.start, choice.end, 10.0))
        else:
            me = announced[name][1]
            move = recheck_after_joining([*visible, me], me, num_blocks=num_blocks, rng=rng)
            if move is not None:
                announced[name] = (t, PlacedPeer(name, move.start, move.end, me.tokens_per_s))
        if round_ < RECHECKS:
            events.append((t + 2 * latency_s, i, round_ + 1))
    return [p for _, p in announced.values()]


@pytest.mark.parametrize("seed", range(20))
def test_eight_peers_joining_at_once_cover_the_model_evenly(seed: int) -> None:
    num_blocks = 30
    peers = simulate_simultaneous_join(8, num_blocks, lengths=[10, 8, 12], seed=seed)
    assert gaps(peers, num_blocks) == []
    coverage = [sum(1 for p in peers if p.start <= b < p.end) for b in range(num_blocks)]
    mean = sum(coverage) / num_blocks
    assert max(coverage) <= 2 * mean, coverage


def test_pile_up_without_the_recheck_is_what_the_recheck_prevents() -> None:
    # all eight decide before seeing anyone: without a second look they all take the same span
    rng = random.Random(1)
    naive = [choose_placement([], num_blocks=30, length=10, tokens_per_s=10.0, rng=rng) for _ in range(8)]
    assert len({(c.start, c.end) for c in naive}) < 8  # collisions happen (random ties help only a bit)
    peers = [PlacedPeer(f"p{i}", c.start, c.end, 10.0) for i, c in enumerate(naive)]
    for i in range(8):  # one recheck round, each peer seeing all the others
        me = peers[i]
        move = recheck_after_joining(peers, me, num_blocks=30, rng=rng)
        if move is not None:
            peers[i] = PlacedPeer(me.peer_id, move.start, move.end, me.tokens_per_s)
    assert gaps(peers, 30) == []


@pytest.mark.parametrize("seed", range(10))
def test_rebalancing_converges_and_never_opens_a_gap(seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = 30
    # a lopsided but complete swarm: one slow peer serves everything, the others (heterogeneous
    # throughputs and lengths) all piled onto the first half
    peers = [PlacedPeer("p0", 0, 30, 5.0)]
    for i in range(1, 9):
        length = rng.randint(14, 16)
        start = 0 if i <= 2 else rng.randint(0, 2)
        peers.append(PlacedPeer(f"p{i}", start, start + length, rng.uniform(5, 100)))
    moves = {p.peer_id: 0 for p in peers}
    for _period in range(50):
        for i in rng.sample(range(len(peers)), len(peers)):  # each peer's randomised timer
            move = decide_move(peers, peers[i], num_blocks=num_blocks, threshold=0.2, rng=rng)
            if move is None:
                continue
            peers[i] = PlacedPeer(peers[i].peer_id, move.start, move.end, peers[i].tokens_per_s)
            moves[peers[i].peer_id] += 1
            assert gaps(peers, num_blocks) == [], "a move opened a gap"
    assert max(moves.values()) <= 2, moves
    assert sum(moves.values()) >= 1  # the lopsided start really was improved


def test_move_that_would_open_a_gap_is_refused() -> None:
    # b alone serves 20:30; a better bottleneck elsewhere does not justify leaving 20:30 empty
    peers = [PlacedPeer("a", 0, 20, 1.0), PlacedPeer("b", 20, 30, 1000.0)]
    assert decide_move(peers, peers[1], num_blocks=30) is None


def test_move_closes_a_gap_elsewhere() -> None:
    peers = [PlacedPeer("a", 0, 10, 10.0), PlacedPeer("b", 0, 10, 10.0), PlacedPeer("c", 10, 20, 10.0)]
    move = decide_move(peers, peers[1], num_blocks=30, rng=random.Random(0))
    assert move is not None and (move.start, move.end) == (20, 30)
    assert block_throughputs(peers, 30)[25] == 0.0


def test_the_best_starts_are_those_of_the_one_start_score_bit_for_bit() -> None:
    """choose_placement finds the best starts at once (prefix/suffix minima, sums only for ties);
    ties are broken at random among equal scores, so it must pick exactly the starts, and give
    exactly the floats, that scoring each start with _score gives."""
    from peerd.daemon.placement import _best_starts, _score

    rng = random.Random(1)
    for _ in range(2000):
        n = rng.randint(1, 40)
        length = rng.randint(1, n)
        totals = [rng.choice([0.0, rng.uniform(0, 500), float(rng.randint(0, 3)) * 100.0]) for _ in range(n)]
        tps = rng.choice([rng.uniform(1, 300), 100.0])
        scored = [(_score(totals, s, length, tps), s) for s in range(n - length + 1)]
        best = max(score for score, _ in scored)
        assert _best_starts(totals, length, tps) == (best, [s for score, s in scored if score == best])
