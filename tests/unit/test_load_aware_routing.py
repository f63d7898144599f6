"""Planning under load: full peers, the busy wait, sub-range plans, and the simulator's speed book."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from peerd.client.claims import SpeedBook
from peerd.client.reservations import BUSY_BACKOFF_S, CacheBook, busy_backoff_s
from peerd.client.router import Router
from peerd.client.routing import plan_inference_route
from peerd.client.session import InferenceSession
from peerd.rpc.errors import NoRouteError, SwarmBusyError
from peerd.sim.clients import ObservedSpeeds
from peerd.swarm.records import ServerRecord
from peerd.swarm.views import BlockView
from tests.helpers.fake_swarm import HIDDEN, MODEL_ID, FakeDHT, FakePeer, FakeTransport, record, reference


def _full(r: ServerRecord) -> ServerRecord:
    return dataclasses.replace(r, cache_tokens_free=0)


def test_blocks_served_only_by_full_peers_raise_swarm_busy_and_unserved_blocks_do_not() -> None:
    servers = {"a": record("a", 0, 4), "b": _full(record("b", 4, 8)), "c": _full(record("c", 6, 8))}
    with pytest.raises(SwarmBusyError) as busy:
        plan_inference_route(servers, 0, 8, min_cache_tokens=64)
    assert busy.value.missing_blocks == [4, 5, 6, 7]
    with pytest.raises(NoRouteError) as gap:
        plan_inference_route(servers, 0, 8, min_cache_tokens=64, banned={"b"})
    assert not isinstance(gap.value, SwarmBusyError) and gap.value.missing_blocks == [4, 5]
    # the cache book's reservations count as well: a peer this client filled is busy, not missing
    with pytest.raises(SwarmBusyError):
        plan_inference_route({"a": record("a", 0, 8)}, 0, 8, min_cache_tokens=64, reserved_tokens={"a": 9_990})


def test_a_sub_range_plan_uses_only_peers_hosting_those_blocks() -> None:
    """A failover re-plans one hop's blocks; peers outside them must neither appear nor shift the
    route onto another peer's record (the Dijkstra this replaced indexed a filtered list wrongly)."""
    rng = random.Random(2)
    for _ in range(200):
        servers = {}
        for i in range(rng.randint(2, 30)):
            start = rng.randrange(16)
            servers[f"p{i}"] = record(f"p{i}", start, rng.randint(start + 1, 16), tps=rng.uniform(5, 500))
        a = rng.randrange(16)
        b = rng.randint(a + 1, 16)
        try:
            route = plan_inference_route(servers, a, b, rng=random.Random(1), spread=0.25)
        except NoRouteError:
            continue
        assert route[0].start == a and route[-1].end == b
        for span in route:
            assert servers[span.peer_id].start <= span.start < span.end <= servers[span.peer_id].end
            assert span.record is servers[span.peer_id]


def test_a_refusal_counts_the_peer_full_for_one_announce_period_without_a_ban() -> None:
    now = [0.0]
    book = CacheBook(hold_s=30.0, clock=lambda: now[0])
    book.mark_full("a")
    with pytest.raises(SwarmBusyError):
        plan_inference_route({"a": record("a", 0, 4)}, 0, 4, min_cache_tokens=16, reserved_tokens=book.taken())
    now[0] = 31.0
    assert plan_inference_route({"a": record("a", 0, 4)}, 0, 4, min_cache_tokens=16, reserved_tokens=book.taken())


def test_busy_backoff_doubles_to_its_cap_with_jitter() -> None:
    rng = random.Random(0)
    for attempt in range(8):
        nominal = BUSY_BACKOFF_S[min(attempt, len(BUSY_BACKOFF_S) - 1)]
        waits = [busy_backoff_s(attempt, rng) for _ in range(50)]
        assert all(0.5 * nominal <= w < 1.5 * nominal for w in waits) and len(set(waits)) > 1


class _FreedDHT(FakeDHT):
    """Every peer is full at the first read; the second read shows room (sessions closed)."""

    async def read_blocks(self, start: int = 0, end: int | None = None, *, timeout_s: float = 5.0) -> list[BlockView]:
        if self.reads == 1:
            for peer in self.peers:
                peer.record = dataclasses.replace(peer.record, cache_tokens_free=10_000)
        return await super().read_blocks(start, end, timeout_s=timeout_s)


async def test_a_session_opening_on_a_full_swarm_waits_for_room_past_the_failover_timeout() -> None:
    peers = [FakePeer(_full(record("only", 0, 4)))]
    transport, dht = FakeTransport(peers, 4), _FreedDHT(peers, 4)
    router = Router(dht, transport, model_id=MODEL_ID, num_blocks=4, view_ttl_s=0.0, rng=random.Random(0))  # type: ignore[arg-type]
    x = torch.randn(1, 2, HIDDEN, generator=torch.Generator().manual_seed(0))
    # failover_timeout_s=0: a NoRouteError would be raised at once; a busy swarm is waited for
    async with InferenceSession(router, transport, max_length=8, failover_timeout_s=0.0) as s:  # type: ignore[arg-type]
        torch.testing.assert_close(await s.step(x), reference(x, 0, 4))
    assert dht.reads >= 2 and [span.peer_id for span in s.route] == ["only"]


def test_the_simulators_speed_book_plans_with_the_sdks_speeds() -> None:
    """ObservedSpeeds is SpeedBook over arrays: fed the same timed steps, it plans with the same speeds."""
    rng = np.random.default_rng(4)
    claims = rng.lognormal(np.log(100), 1.0, size=12)
    records = {f"p{i:07d}": record(f"p{i:07d}", 0, 4, tps=float(c)) for i, c in enumerate(claims)}
    book, arrays = SpeedBook(), ObservedSpeeds()
    for _ in range(6):
        peers = rng.choice(12, size=rng.integers(1, 12), replace=False)
        rates = rng.uniform(1, 300, size=peers.size)
        for p, r in zip(peers, rates, strict=True):
            book.observe(f"p{p:07d}", 1, 1, 1.0 / r)
        arrays.observe(peers, rates)
        expected = book.planning_speeds(records)
        got = arrays.planning_speeds(claims, np.ones(12, dtype=bool))
        np.testing.assert_allclose(got, [expected[f"p{i:07d}"] for i in range(12)], rtol=1e-9)
