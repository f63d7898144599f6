"""RttProbe: cached round trips, probed concurrently, and stale ones measured again in the background."""

from __future__ import annotations

import asyncio

from peerd.rpc.rtt import PINGS_PER_PROBE, RttProbe


class Pinger:
    """A ping that takes ``delay_s`` (the RTT a probe measures) and counts the pings per peer."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.pings: dict[str, int] = {}

    async def __call__(self, peer_id: str) -> None:
        self.pings[peer_id] = self.pings.get(peer_id, 0) + 1
        await asyncio.sleep(self.delay_s)


async def test_a_stale_rtt_is_returned_at_once_and_measured_again_in_the_background() -> None:
    now = [0.0]
    ping = Pinger(0.01)
    probe = RttProbe(ping, ttl_s=30.0, clock=lambda: now[0])
    first = await probe.rtts_ms(["a"], stale_in_background=True)  # never measured: probed before returning
    assert first["a"] is not None and 10.0 <= first["a"] < 1000.0 and ping.pings == {"a": PINGS_PER_PROBE}
    now[0] = 31.0
    ping.delay_s = 0.05
    again = await probe.rtts_ms(["a", "new"], stale_in_background=True)
    assert again["a"] == first["a"]  # the old value, without waiting for the probe...
    assert again["new"] is not None and again["new"] >= 50.0  # ... while a new peer is measured now
    assert probe.background is not None
    await probe.background
    assert ping.pings["a"] == 2 * PINGS_PER_PROBE
    later = await probe.rtts_ms(["a", "new"], stale_in_background=True)
    assert later["a"] is not None and later["a"] >= 50.0 and probe.measured_at("a") == 31.0


async def test_without_background_a_stale_rtt_is_measured_before_returning() -> None:
    now = [0.0]
    ping = Pinger(0.01)
    probe = RttProbe(ping, ttl_s=30.0, clock=lambda: now[0])
    await probe.rtts_ms(["a"])
    now[0], ping.delay_s = 31.0, 0.05
    assert (await probe.rtts_ms(["a"]))["a"] >= 50.0  # type: ignore[operator]
    assert probe.background is None
