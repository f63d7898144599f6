"""Router on an in-memory swarm: the view, bans, vetting, RTTs and planning (no sockets)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest

from peerd.client.router import UNREACHABLE_RTT_MS, Router
from peerd.client.routing import Span
from peerd.rpc.errors import NoRouteError, PeerUnavailable
from peerd.swarm.records import PeerState
from protocols import PROTOCOL_VERSION
from tests.helpers.fake_swarm import MODEL_ID, FakeDHT, FakePeer, FakeTransport, record


def make_router(peers: list[FakePeer], num_blocks: int = 4, **kwargs) -> tuple[Router, FakeTransport, FakeDHT]:
    transport, dht = FakeTransport(peers, num_blocks), FakeDHT(peers, num_blocks)
    return Router(dht, transport, model_id=MODEL_ID, num_blocks=num_blocks, **kwargs), transport, dht  # type: ignore[arg-type]


async def test_the_view_keeps_online_peers_and_is_cached() -> None:
    peers = [FakePeer(record("a", 0, 4)), FakePeer(record("gone", 0, 4, state=PeerState.OFFLINE))]
    router, _, dht = make_router(peers)
    assert set(await router.servers()) == {"a"}
    await router.servers()
    assert dht.reads == 1  # within view_ttl_s: no second DHT read
    await router.servers(refresh=True)
    assert dht.reads == 2


async def test_an_old_view_is_used_at_once_and_read_again_in_the_background() -> None:
    """A session open must not wait for a DHT read (several round trips over long links) to learn
    what it knew seconds ago: after ``view_refresh_s`` the view is read again behind its back."""
    peers = [FakePeer(record("a", 0, 4))]
    router, _, dht = make_router(peers, view_refresh_s=0.02)
    assert set(await router.servers()) == {"a"}
    peers.append(FakePeer(record("joined", 0, 4)))
    dht.delay_s = 0.05
    await asyncio.sleep(0.03)
    started = time.monotonic()
    assert set(await router.servers()) == {"a"}  # the old view, at once
    assert time.monotonic() - started < 0.04
    await asyncio.sleep(0)
    assert dht.reads == 2  # ... while the new one is read
    await router.servers()  # one background read at a time
    assert dht.reads == 2
    await asyncio.sleep(0.1)
    assert set(await router.servers()) == {"a", "joined"}
    await router.close()


async def test_a_view_older_than_its_ttl_is_read_before_it_is_used() -> None:
    peers = [FakePeer(record("a", 0, 4))]
    router, _, dht = make_router(peers, view_refresh_s=0.0, view_ttl_s=0.02)
    await router.servers()
    peers.append(FakePeer(record("joined", 0, 4)))
    await asyncio.sleep(0.03)
    assert set(await router.servers()) == {"a", "joined"} and dht.reads == 2


async def test_a_failed_background_read_keeps_the_view_and_the_next_call_tries_again() -> None:
    router, _, dht = make_router([FakePeer(record("a", 0, 4))], view_refresh_s=0.0)
    await router.servers()
    dht.error = TimeoutError("DHT read timed out")
    assert set(await router.servers()) == {"a"}
    await asyncio.sleep(0.01)  # the background read fails
    dht.error = None
    assert set(await router.servers()) == {"a"}
    await asyncio.sleep(0)
    assert dht.reads == 3
    await router.close()


async def test_a_slow_background_read_does_not_replace_a_newer_view() -> None:
    peers = [FakePeer(record("a", 0, 4))]
    router, _, dht = make_router(peers, view_refresh_s=0.0)
    await router.servers()
    dht.delay_s = 0.05
    await router.servers()  # a background read of {a} begins, and takes 50 ms
    await asyncio.sleep(0)
    peers.append(FakePeer(record("b", 0, 4)))
    dht.delay_s = 0.0
    assert set(await router.servers(refresh=True)) == {"a", "b"}  # begun later, done first
    await asyncio.sleep(0.08)
    assert set(router.known_records()) == {"a", "b"}
    await router.close()


async def test_changing_the_allowed_peers_filters_the_next_view_before_it_is_used() -> None:
    router, _, _ = make_router([FakePeer(record("a", 0, 4)), FakePeer(record("b", 0, 4))])
    assert set(await router.servers()) == {"a", "b"}
    router.allowed_peers = frozenset({"b"})
    assert set(await router.servers()) == {"b"}


async def test_peers_of_another_protocol_major_are_left_out_of_the_view() -> None:
    major, minor = PROTOCOL_VERSION
    peers = [
        FakePeer(record("same", 0, 4)),
        FakePeer(replace(record("newer_minor", 0, 4), protocol_version=(major, minor + 1))),
        FakePeer(replace(record("old", 0, 4), protocol_version=(major - 1, 0))),
        FakePeer(replace(record("next", 0, 4), protocol_version=(major + 1, 0))),
    ]
    router, _, _ = make_router(peers)
    assert set(await router.servers()) == {"same", "newer_minor"}


async def test_allowed_peers_restrict_the_view() -> None:
    router, _, _ = make_router([FakePeer(record("a", 0, 4)), FakePeer(record("b", 0, 4))], allowed_peers={"b"})
    assert set(await router.servers()) == {"b"}


async def test_min_precision_keeps_only_peers_storing_weights_in_at_least_that_many_bits() -> None:
    peers = [
        FakePeer(replace(record("f32", 0, 4), dtype="float32")),
        FakePeer(replace(record("bf16", 0, 4), dtype="bfloat16")),
        FakePeer(replace(record("int8", 0, 4), dtype="bfloat16", quant="int8")),
        FakePeer(replace(record("nf4", 0, 4), dtype="bfloat16", quant="nf4")),
        FakePeer(replace(record("int4", 0, 4), dtype="bfloat16", quant="int4")),
        FakePeer(replace(record("future", 0, 4), dtype="bfloat16", quant="fp3")),  # unknown: never "enough"
    ]
    router, _, _ = make_router(peers)
    assert set(await router.servers()) == {"f32", "bf16", "int8", "nf4", "int4", "future"}
    four_bits = {"f32", "bf16", "int8", "nf4", "int4"}
    expected = {"nf4": four_bits, "int4": four_bits, "int8": {"f32", "bf16", "int8"}, "bfloat16": {"f32", "bf16"}}
    for precision, kept in [*expected.items(), ("float32", {"f32"})]:
        router.min_precision = precision
        assert set(await router.servers()) == kept, precision
    with pytest.raises(ValueError, match="min_precision must be one of"):
        router.min_precision = "int3"


async def test_vetting_bans_a_peer_that_hides_its_quantization() -> None:
    hiding = FakePeer(replace(record("hiding", 0, 4), quant="none"), quant="nf4")
    router, _, _ = make_router([hiding])
    with pytest.raises(PeerUnavailable, match="stores weights as 'nf4', announced 'none'"):
        await router.check_peer(Span("hiding", 0, 4, hiding.record))
    assert router.banned() == {"hiding"}


async def test_plans_skip_banned_peers_until_none_is_left() -> None:
    router, _, _ = make_router([FakePeer(record("fast", 0, 4, tps=1000.0)), FakePeer(record("slow", 0, 4))])
    assert [s.peer_id for s in await router.plan_inference(0, 4, 1)] == ["fast"]
    router.ban("fast", reason="test")
    assert [s.peer_id for s in await router.plan_inference(0, 4, 1)] == ["slow"]
    route = await router.plan_load_balanced(0, 4, rng=random.Random(0))
    assert [s.peer_id for s in route] == ["slow"]
    with pytest.raises(NoRouteError):
        await router.plan_load_balanced(0, 4, rng=random.Random(0), exclude={"slow"})


async def test_an_unreachable_peer_gets_a_prohibitive_rtt() -> None:
    router, transport, _ = make_router([FakePeer(record("a", 0, 4)), FakePeer(record("ghost", 0, 4))])
    del transport.peers["ghost"]  # in the DHT, but does not answer
    await router.measure_rtts(["a", "ghost"])
    assert router.rtts_ms["ghost"] == UNREACHABLE_RTT_MS
    assert router.rtts_ms["a"] < UNREACHABLE_RTT_MS


async def test_vetting_bans_a_peer_whose_info_disagrees_with_its_record() -> None:
    honest, other_model = FakePeer(record("honest", 0, 4)), FakePeer(record("other", 0, 4), model_id="another")
    router, _, _ = make_router([honest, other_model])
    await router.check_peer(Span("honest", 0, 4, honest.record))  # agrees: vetted (and cached)
    with pytest.raises(PeerUnavailable, match="disagrees with its DHT record"):
        await router.check_peer(Span("other", 0, 4, other_model.record))
    assert router.banned() == {"other"}
    assert router.bans.ban("other") > 3600  # another model is a long ban, not a doubling one


async def test_a_success_resets_the_failure_ban_doubling() -> None:
    router, _, _ = make_router([FakePeer(record("a", 0, 4))])
    now = [0.0]
    router.bans.clock = lambda: now[0]
    router.ban("a")
    now[0] = 100.0
    router.succeeded("a")
    assert router.bans.ban("a") == router.bans.base_s


async def test_a_new_clients_rtt_probe_answer_also_vets_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe and vetting are both an `info` round trip: a first route asks each peer once, not twice."""
    router, transport, _ = make_router([FakePeer(record("a", 0, 4))])
    [span] = await router.plan_inference(0, 4, 1)
    probes = len(transport.info_calls)
    assert probes >= 1
    await router.check_peer(span)
    assert len(transport.info_calls) == probes  # the probe's answer, a moment old
    router._vetted.clear()
    await router.check_peer(span)  # used once: vetting again asks again
    assert len(transport.info_calls) == probes + 1
    monkeypatch.setattr("peerd.client.router.INFO_REUSE_S", 0.0)
    router._vetted.clear()
    router.rtt._cache.clear()  # the next plan probes again
    await router.plan_inference(0, 4, 1)
    calls = len(transport.info_calls)
    await router.check_peer(span)  # an answer older than INFO_REUSE_S: asked again
    assert len(transport.info_calls) == calls + 1


async def test_planning_rtts_change_only_with_a_new_probe() -> None:
    router, _, _ = make_router([FakePeer(record("a", 0, 4)), FakePeer(record("b", 0, 4))])
    await router.measure_rtts(["a", "b"])
    router.rtts_ms["a"] = 1.0  # set by hand (tests force equal RTTs this way)
    await router.measure_rtts(["a", "b"])  # both still fresh: nothing re-probed, nothing overwritten
    assert router.rtts_ms["a"] == 1.0


async def test_load_balanced_routes_follow_observed_speed_not_claims() -> None:
    """Two replicas claim the same throughput; the client measured one at 50x the other (its uplink
    is slow): forward batches go to the fast one, and an unmeasured peer keeps its claim."""
    peers = [FakePeer(record("fast", 0, 4, tps=100.0)), FakePeer(record("slow-link", 0, 4, tps=100.0))]
    router, transport, _ = make_router(peers)
    assert transport.observer == router.observe  # the transport reports every forward/backward
    router.observe("fast", 1000, 1.0)
    router.observe("slow-link", 1000, 50.0)
    rng = random.Random(7)
    picks = [(await router.plan_load_balanced(0, 4, rng=rng))[0].peer_id for _ in range(400)]
    assert picks.count("fast") > 0.95 * len(picks)
    router.observe("fast", 3000, 1.0)  # a running average: half old, half new
    assert router.observed_tps["fast"] == 2000.0
    router.observe("fast", 0, 1.0)  # nothing measured: ignored
    assert router.observed_tps["fast"] == 2000.0
