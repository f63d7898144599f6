"""Coordinator-free scheduling with real peers: self-placement, healing a gap, latency-aware routing.

Periods and delays are shortened through the daemon's own options (placement_jitter_s,
placement_settle_s, rebalance_period_s, announce_period_s, step_delay_s), not special code paths.
"""

from __future__ import annotations

import asyncio
import time

from peerd.model.local import LocalModel

PROMPT = [9, 8, 7, 6, 5]
FAST = {"placement_jitter_s": 1.0, "placement_settle_s": 0.3, "announce_period_s": 2.0}


async def test_four_peers_without_blocks_cover_the_model(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm([])
    await swarm.add_peer("anchor", None, max_blocks=6, **FAST)  # alone, it takes all six blocks
    # three more start at the same moment, each with room for three blocks
    await asyncio.gather(*(swarm.add_peer(f"auto{i}", None, max_blocks=3, **FAST) for i in range(3)))
    placed = [p.blocks for p in swarm.peers[1:]]
    # three peers of 3 blocks each over a 6-block model: both halves get at least one of them
    assert any(s < 3 for s, _ in placed) and any(e > 3 for _, e in placed), placed
    client = await swarm.client()
    try:
        result = await client.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 12, eos_token_ids=[])
    finally:
        await client.close()


async def test_remaining_peer_moves_to_cover_a_gap(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm([(0, 3), (3, 6)])
    mover = await swarm.add_peer("mover", None, max_blocks=3, rebalance_period_s=1.0, **FAST)
    # stop the explicit peer whose span the mover does not host: that span becomes a gap
    victim = next(p for p in swarm.peers[:2] if p.blocks != mover.blocks)
    await victim.shutdown()
    deadline = time.monotonic() + 30  # a handful of 1-second rebalance periods
    while mover.blocks != victim.blocks:
        assert time.monotonic() < deadline, f"mover stayed at {mover.blocks}"
        await asyncio.sleep(0.2)
    assert mover.metrics.moves._value.get() == 1
    swarm.initial_peers = tuple(await mover.visible_maddrs())  # the victim may have been the bootstrap
    client = await swarm.client()
    try:
        result = await client.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 12, eos_token_ids=[])
        assert mover.peer_id in {s.peer_id for s in result.route}
    finally:
        await client.close()


async def test_inference_routes_avoid_the_slowed_peer(make_swarm, local_model: LocalModel) -> None:
    # The route weighs RTT (measured, noisy on a busy machine) against advertised compute: 0.5 s per
    # step puts the slowed peer 500 ms behind, far beyond RTT noise. It is never on the route when
    # the test passes, so the delay costs no time.
    swarm = await make_swarm([(0, 6)], step_delay_s=0.5)
    fast = await swarm.add_peer("fast", (0, 6))
    slow = swarm.peers[0]
    client = await swarm.client()
    try:
        for _ in range(3):
            result = await client.generate(PROMPT, max_new_tokens=6, stop_on_eos=False)
            assert [s.peer_id for s in result.route] == [fast.peer_id]
            assert result.token_ids == local_model.generate_greedy(PROMPT, 6, eos_token_ids=[])
        servers = await client.servers(refresh=True)
        assert servers[slow.peer_id].decode_tokens_per_s < servers[fast.peer_id].decode_tokens_per_s
    finally:
        await client.close()
