"""SwarmView shares one DHT read per cache window; RttProbe caches per peer and survives failures."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from peerd.rpc.rtt import RttProbe
from peerd.web.view import SwarmView


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_swarm_view_reads_once_per_window_and_shares_a_read_in_flight() -> None:
    clock = FakeClock()
    release = asyncio.Event()
    calls = 0

    async def read() -> dict[str, object]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"read": calls}

    view = SwarmView(read, max_age_s=2.0, clock=clock)
    assert view.last is None
    waiting = [asyncio.create_task(view.get()) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert [await t for t in waiting] == [{"read": 1}] * 5
    clock.now += 1.9
    assert await view.get() == {"read": 1}
    assert await view.get(max_age_s=1.0) == {"read": 2}  # a caller may ask for fresher data
    clock.now += 2.0
    assert await view.get() == {"read": 3}
    assert view.reads == calls == 3


async def test_swarm_view_keeps_the_last_value_when_a_read_fails() -> None:
    clock = FakeClock()
    fail = False

    async def read() -> dict[str, object]:
        if fail:
            raise TimeoutError("dht")
        return {"ok": True}

    view = SwarmView(read, max_age_s=1.0, clock=clock)
    assert await view.get() == {"ok": True}
    fail, clock.now = True, clock.now + 5
    with pytest.raises(TimeoutError):
        await view.get()
    assert view.last == {"ok": True}
    fail = False
    assert await view.get() == {"ok": True}


async def test_rtt_probe_caches_per_peer_and_reports_failures_as_unknown() -> None:
    clock = FakeClock()
    pinged: list[str] = []

    async def ping(peer_id: str) -> None:
        pinged.append(peer_id)
        if peer_id == "down":
            raise ConnectionError("refused")
        if peer_id == "slow":
            await asyncio.sleep(10)

    probe = RttProbe(ping, ttl_s=30.0, timeout_s=0.05, clock=clock)
    rtts = await probe.rtts_ms(["a", "down", "slow"])
    assert rtts["down"] is None and rtts["slow"] is None
    assert rtts["a"] is not None and rtts["a"] >= 0
    assert await probe.rtts_ms(["a", "b"]) == {"a": rtts["a"], "b": pytest.approx(0, abs=50)}
    # two round trips per probe ("down" failed its first); "a" came from the cache the second time
    assert Counter(pinged) == Counter({"a": 2, "down": 1, "slow": 1, "b": 2})
    clock.now += 30  # gone peers were forgotten, and "a" is stale
    await probe.rtts_ms(["a"])
    assert pinged[-2:] == ["a", "a"]


async def test_rtt_probe_keeps_the_faster_of_two_round_trips_leaving_out_the_dial() -> None:
    """The first round trip to a peer not connected yet also dials it: not the link's RTT."""
    answers = {"new": [0.2, 0.01], "flaky": [0.01, None]}  # seconds per ping; None: it fails

    async def ping(peer_id: str) -> None:
        took = answers[peer_id].pop(0)
        if took is None:
            raise ConnectionError("reset")
        await asyncio.sleep(took)

    probe = RttProbe(ping, timeout_s=5.0, clock=FakeClock())
    rtts = await probe.rtts_ms(["new", "flaky"])
    assert rtts["new"] is not None and 9 <= rtts["new"] < 150  # the second, not the 200 ms dial
    assert rtts["flaky"] is not None and rtts["flaky"] >= 9  # answered once: that is its RTT


async def test_rtt_probe_opens_at_most_max_probes_streams_per_call() -> None:
    clock = FakeClock()
    pinged: list[str] = []

    async def ping(peer_id: str) -> None:
        pinged.append(peer_id)

    probe = RttProbe(ping, max_probes=3, clock=clock)
    peers = [f"p{i}" for i in range(7)]
    first = await probe.rtts_ms(peers)
    assert sorted(pinged) == ["p0", "p0", "p1", "p1", "p2", "p2"]  # two round trips each
    assert [first[p] is None for p in peers] == [False] * 3 + [True] * 4
    await probe.rtts_ms(peers)
    last = await probe.rtts_ms(peers)
    assert sorted(set(pinged)) == peers and all(rtt is not None for rtt in last.values())  # the rest later
    clock.now += 30
    await probe.rtts_ms(peers)
    assert sorted(set(pinged[14:])) == ["p0", "p1", "p2"]  # all stale again: still at most 3 peers
