"""Route planning and the ban list, on synthetic records (no sockets)."""

from __future__ import annotations

import collections
import dataclasses
import random

import numpy as np
import pytest

from peerd.client.bans import BanList
from peerd.client.compression import AUTO, AUTO_BELOW_BYTES_PER_S, hop_compression, parse_compression, worst_case
from peerd.client.reservations import CacheBook
from peerd.client.routing import Span, hop_rate, plan_inference_route, plan_load_balanced_route
from peerd.rpc.errors import NoRouteError
from peerd.swarm.records import PeerState, ServerRecord
from protocols import Compression


def rec(peer: str, start: int, end: int, tps: float = 100.0, cache: int = 10_000) -> ServerRecord:
    return ServerRecord(
        peer_id=peer, state=PeerState.ONLINE, start=start, end=end, decode_tokens_per_s=tps,
        prefill_tokens_per_s=tps * 10, device="cpu", memory_total_bytes=1, memory_free_bytes=1, dtype="float32",
        cache_tokens_free=cache, protocol_version=(1, 0), package_version="0", public_name=peer,
    )  # fmt: skip


def servers(*records: ServerRecord) -> dict[str, ServerRecord]:
    return {r.peer_id: r for r in records}


def test_picks_the_faster_replica() -> None:
    swarm = servers(rec("slow", 0, 6, tps=10.0), rec("fast", 0, 6, tps=1000.0))
    route = plan_inference_route(swarm, 0, 6)
    assert [s.peer_id for s in route] == ["fast"]


def test_fewer_hops_win_when_compute_is_equal() -> None:
    swarm = servers(rec("a", 0, 3), rec("b", 3, 6), rec("whole", 0, 6))
    assert [s.peer_id for s in plan_inference_route(swarm, 0, 6)] == ["whole"]


def test_measured_rtt_steers_the_route() -> None:
    swarm = servers(rec("a", 0, 3), rec("b", 3, 6), rec("whole", 0, 6))
    # the one-hop peer is far away (e.g. another continent); two nearby hops are cheaper
    route = plan_inference_route(swarm, 0, 6, rtt_ms={"a": 1.0, "b": 1.0, "whole": 200.0})
    assert [(s.peer_id, s.start, s.end) for s in route] == [("a", 0, 3), ("b", 3, 6)]


def test_sub_spans_of_a_peer_are_used() -> None:
    swarm = servers(rec("wide", 0, 6, tps=1000.0), rec("mid", 2, 4, tps=1.0))
    route = plan_inference_route(swarm, 2, 5)
    assert [(s.peer_id, s.start, s.end) for s in route] == [("wide", 2, 5)]


def test_avoids_peers_without_cache_for_the_session() -> None:
    swarm = servers(rec("full", 0, 6, tps=1000.0, cache=10), rec("roomy", 0, 6, tps=10.0, cache=5000))
    assert [s.peer_id for s in plan_inference_route(swarm, 0, 6, min_cache_tokens=100)] == ["roomy"]
    with pytest.raises(NoRouteError):
        plan_inference_route(swarm, 0, 6, min_cache_tokens=10_000)


def test_banned_peers_are_skipped_and_gaps_named() -> None:
    swarm = servers(rec("a", 0, 3), rec("b", 3, 6))
    with pytest.raises(NoRouteError) as info:
        plan_inference_route(swarm, 0, 6, banned={"b"})
    assert info.value.missing_blocks == [3, 4, 5]
    assert "3:6" in str(info.value)


def test_load_balanced_routes_follow_throughput() -> None:
    swarm = servers(rec("big", 0, 6, tps=300.0), rec("small", 0, 6, tps=100.0))
    rng = random.Random(0)
    counts = collections.Counter(plan_load_balanced_route(swarm, 0, 6, rng=rng)[0].peer_id for _ in range(4000))
    assert counts["big"] / counts["small"] == pytest.approx(3.0, rel=0.15)


def test_ban_backoff_doubles_and_expires() -> None:
    now = [0.0]
    bans = BanList(base_s=5.0, max_s=40.0, clock=lambda: now[0])
    assert bans.ban("p") == 5.0
    assert bans.banned() == {"p"}
    now[0] = 5.1
    assert bans.banned() == set()
    assert bans.ban("p") == 10.0
    assert bans.ban("p") == 20.0
    assert bans.ban("p") == 40.0
    assert bans.ban("p") == 40.0  # capped
    bans.forgive("p")
    assert bans.banned() == set()


def test_a_success_forgets_strikes_but_not_a_ban_in_force() -> None:
    now = [0.0]
    bans = BanList(base_s=5.0, max_s=40.0, clock=lambda: now[0])
    assert bans.ban("p") == 5.0
    bans.succeeded("p")  # a request in flight when it failed came back fine: the ban stays
    assert bans.banned() == {"p"}
    now[0] = 6.0
    assert bans.ban("p") == 10.0  # a second strike doubles
    now[0] = 20.0
    bans.succeeded("p")  # served well after the ban ran out: strikes forgotten
    assert bans.ban("p") == 5.0  # back to the base ban, not 20 s


def test_a_published_slow_uplink_weighs_in_for_large_answers() -> None:
    """Equal compute; one uplink is 1 MB/s. With 4 KiB answers per token (hidden 1024, float32) the
    slow one's hop takes 3/1000 s compute + 4096/1e6 s transfer per token: 3 / 0.007096 block-tokens/s
    against 1000, so it is drawn 0.4228 as often. Without a size (or an uplink) nothing changes."""
    fast = dataclasses.replace(rec("fast", 0, 3, tps=100.0), uplink_bytes_per_s=1e9)
    slow = dataclasses.replace(rec("slowlink", 0, 3, tps=100.0), uplink_bytes_per_s=1e6)
    assert hop_rate(slow, 3, 4096) == pytest.approx(3 / (3 / 1000 + 4096 / 1e6))
    assert hop_rate(slow, 3, 0) == pytest.approx(1000.0)
    assert hop_rate(rec("unknown", 0, 3, tps=100.0), 3, 4096) == pytest.approx(1000.0)  # unmeasured: compute only
    rng = random.Random(1)
    swarm = servers(fast, slow)
    counts = collections.Counter(
        plan_load_balanced_route(swarm, 0, 3, rng=rng, bytes_per_token=4096)[0].peer_id for _ in range(4000)
    )
    ratio = counts["slowlink"] / counts["fast"]
    assert ratio == pytest.approx(hop_rate(slow, 3, 4096) / hop_rate(fast, 3, 4096), rel=0.15)
    # what the client observed itself wins over any published number
    observed = {"slowlink": 5000.0, "fast": 1000.0}
    counts = collections.Counter(
        plan_load_balanced_route(swarm, 0, 3, rng=rng, bytes_per_token=4096, observed_tps=observed)[0].peer_id
        for _ in range(2000)
    )
    assert counts["slowlink"] > 3 * counts["fast"]


def test_auto_compression_is_per_hop_by_published_uplink() -> None:
    slow = dataclasses.replace(rec("s", 0, 3), uplink_bytes_per_s=AUTO_BELOW_BYTES_PER_S / 2)
    fast = dataclasses.replace(rec("f", 0, 3), uplink_bytes_per_s=AUTO_BELOW_BYTES_PER_S * 2)
    unknown = rec("u", 0, 3)  # not measured (yet): exact values
    assert hop_compression(AUTO, slow) is Compression.BLOCKWISE8
    assert hop_compression(AUTO, fast) is Compression.NONE
    assert hop_compression(AUTO, unknown) is Compression.NONE
    assert hop_compression(Compression.FLOAT16, slow) is Compression.FLOAT16  # a fixed choice is fixed
    assert worst_case(AUTO) is Compression.BLOCKWISE8 and worst_case(Compression.NONE) is Compression.NONE
    assert parse_compression("auto") == AUTO and parse_compression("blockwise8") is Compression.BLOCKWISE8
    with pytest.raises(ValueError, match="choose one of auto, none"):
        parse_compression("zip")


def test_spread_draws_near_equal_routes_by_free_cache_and_never_a_slow_one() -> None:
    """Two near-equal replicas (the faster one 5% faster) and a slow one: with spread 0.25 the plan
    splits between the two, more often onto the one with more room, never onto the slow one. The
    cost of each drawn route is within 1.25x of the fastest."""
    swarm = servers(
        rec("fast", 0, 6, tps=105.0, cache=1_000),
        rec("roomy", 0, 6, tps=100.0, cache=9_000),
        rec("slow", 0, 6, tps=50.0, cache=9_000),
    )
    assert [s.peer_id for s in plan_inference_route(swarm, 0, 6)] == ["fast"]  # no rng: deterministic
    rng = random.Random(5)
    counts = collections.Counter(
        plan_inference_route(swarm, 0, 6, rng=rng, spread=0.25, min_cache_tokens=100)[0].peer_id for _ in range(2000)
    )
    assert counts["slow"] == 0
    assert counts["roomy"] > counts["fast"] > 100


def test_spread_routes_cost_at_most_one_plus_spread_of_the_fastest() -> None:
    rng = random.Random(11)
    for _ in range(40):
        swarm = {}
        for i in range(rng.randint(2, 20)):
            start = rng.randrange(10)
            peer = f"p{i}"
            swarm[peer] = rec(peer, start, rng.randint(start + 1, 10), rng.uniform(5, 500), rng.randint(1, 5000))
        rtt = {p: rng.uniform(1, 80) for p in swarm}

        def cost(route: list[Span], rtt: dict[str, float] = rtt) -> float:
            return sum(rtt[s.peer_id] + (s.end - s.start) * 1e3 / s.record.decode_tokens_per_s for s in route)

        try:
            best = cost(plan_inference_route(swarm, 0, 10, rtt_ms=rtt))
        except NoRouteError:
            continue
        for _ in range(5):
            drawn = plan_inference_route(swarm, 0, 10, rtt_ms=rtt, rng=rng, spread=0.3)
            assert best <= cost(drawn) <= 1.3 * best * (1 + 1e-9)


def test_reserved_cache_counts_against_a_record() -> None:
    swarm = servers(rec("fast", 0, 6, tps=1000.0, cache=1_000), rec("other", 0, 6, tps=10.0, cache=5_000))
    assert [s.peer_id for s in plan_inference_route(swarm, 0, 6, min_cache_tokens=500)] == ["fast"]
    route = plan_inference_route(swarm, 0, 6, min_cache_tokens=500, reserved_tokens={"fast": 600})
    assert [s.peer_id for s in route] == ["other"]


def test_cache_book_holds_reservations_until_the_record_would_show_them() -> None:
    now = [0.0]
    book = CacheBook(hold_s=30.0, clock=lambda: now[0])
    book.take("a", 100)
    now[0] = 10.0
    book.take("a", 50)
    book.take("b", 70)
    assert book.taken() == {"a": 150, "b": 70}
    book.release("b", 70)  # the session closed: the peer freed it, and its old record never counted it
    assert book.taken() == {"a": 150}
    now[0] = 30.5  # a's first reservation is older than an announce period: its record counts it
    assert book.taken() == {"a": 50}
    now[0] = 41.0
    assert book.taken() == {}


def test_a_kept_chain_layout_plans_the_same_routes_as_a_fresh_table() -> None:
    """ChainLayout (laid out once per view, as the simulator's clients keep it) gives exactly the
    routes of plan_over_table without one: whole-model and sub-range plans, with the spread, with
    unusable peers (banned or full), and None where some block has no usable peer."""
    import numpy as np

    from peerd.client.chain_index import ChainLayout
    from peerd.client.routing import RouteTable, plan_over_table

    gen = np.random.default_rng(4)
    for trial in range(400):
        n, blocks = int(gen.integers(1, 60)), int(gen.integers(1, 20))
        start = gen.integers(0, blocks, n)
        end = np.minimum(blocks, start + gen.integers(1, blocks + 1, n))
        table = RouteTable(
            start=start,
            end=end,
            hop_ms=gen.uniform(1, 150, n),
            per_block_ms=gen.uniform(1, 100, n),
            headroom_tokens=gen.uniform(-500, 5000, n),
        )
        layout = ChainLayout(table.start, table.end)
        for _ in range(5):
            first = int(gen.integers(0, blocks))
            last = int(gen.integers(first + 1, blocks + 1)) if trial % 2 else blocks
            first = first if trial % 2 else 0
            usable = gen.random(n) < 0.8 if trial % 3 else None
            uniforms = gen.random(n) if trial % 4 else None
            kwargs = {"uniforms": uniforms, "spread": 0.25, "usable": usable}
            assert plan_over_table(table, first, last, layout=layout, **kwargs) == plan_over_table(
                table, first, last, **kwargs
            )


def test_the_cache_books_running_totals_match_summing_its_live_entries() -> None:
    """Random takes, refusals, releases and clock steps: taken() equals the sum of the entries younger
    than hold_s per peer (what the book meant before it kept running totals), and so do the totals
    its on_change reported."""
    rng = random.Random(9)
    now = [0.0]
    mirrored: dict[str, int] = {}  # what the book's on_change told
    book = CacheBook(hold_s=30.0, clock=lambda: now[0], on_change=mirrored.__setitem__)
    live: list[tuple[float, str, int]] = []  # (taken at, peer, tokens): the reference
    for _ in range(3000):
        op, peer = rng.random(), f"p{rng.randrange(6)}"
        if op < 0.4:
            tokens = rng.choice([256, 512])
            book.take(peer, tokens)
            live.append((now[0], peer, tokens))
        elif op < 0.45:
            book.mark_full(peer)
            live.append((now[0], peer, 1 << 40))
        elif op < 0.7:
            tokens = rng.choice([256, 512])
            book.release(peer, tokens)
            mine = [i for i, (t, p, k) in enumerate(live) if p == peer and k == tokens and t > now[0] - 30.0]
            if mine:
                del live[mine[-1]]
        else:
            now[0] += rng.choice([0.0, 1.0, 5.0, 29.0, 31.0])
        live = [e for e in live if e[0] > now[0] - 30.0]
        expected = collections.Counter()
        for _, p, k in live:
            expected[p] += k
        assert book.taken() == dict(expected)
        assert {peer: tokens for peer, tokens in mirrored.items() if tokens} == dict(expected)


def test_balanced_plans_over_a_layout_draw_the_routes_of_plans_without() -> None:
    """plan_balanced_over_table with a ChainLayout (each block's hosts listed once per view, as the
    simulator keeps them) draws exactly the routes it draws from the same random state without,
    with bans, unmeasured and measured peers, sub-ranges and blocks nobody hosts."""
    from peerd.client.chain_index import ChainLayout
    from peerd.client.routing import BalancedTable, plan_balanced_over_table

    gen = np.random.default_rng(31)
    for trial in range(300):
        n, blocks = int(gen.integers(1, 60)), int(gen.integers(1, 20))
        start = gen.integers(0, blocks, n)
        end = np.minimum(blocks, start + gen.integers(0, blocks + 1, n))  # some host nothing
        table = BalancedTable(
            start=start,
            end=end,
            prefill_tps=np.where(gen.random(n) < 0.9, gen.uniform(10, 500, n), 0.0),
            uplink_bytes_per_s=np.where(gen.random(n) < 0.8, gen.uniform(1e5, 1e7, n), 0.0),
            observed_tps=np.where(gen.random(n) < 0.3, gen.uniform(10, 500, n), np.nan),
        )
        layout = ChainLayout(start, end)
        first = int(gen.integers(0, blocks))
        last = int(gen.integers(first + 1, blocks + 1))
        usable = gen.random(n) < 0.8 if trial % 2 else None
        seed = int(gen.integers(1 << 30))
        kwargs = {"bytes_per_token": 8192, "usable": usable}
        plain = plan_balanced_over_table(table, first, last, rng=random.Random(seed), **kwargs)
        laid_out = plan_balanced_over_table(table, first, last, rng=random.Random(seed), layout=layout, **kwargs)
        assert laid_out == plain, trial
