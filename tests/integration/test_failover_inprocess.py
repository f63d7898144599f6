"""Client failover with in-process peers: a peer that vanishes mid-generation changes no token."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from peerd.client import NoRouteError
from peerd.model.local import LocalModel
from tests.helpers.swarm import crash

PROMPT = [7, 1, 8, 2, 8, 1, 8]


async def test_vanished_peer_mid_generation_changes_no_token(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm([(0, 3), (0, 3), (3, 6)])
    client = await swarm.client()
    try:
        route = await client.wait_for_route()
        victim = next(p for p in swarm.peers if p.peer_id == route[0].peer_id)
        tail = swarm.peers[2]  # 3:6, on every route
        assert tail.runtime is not None
        gate = threading.Event()
        tasks: list[asyncio.Task[None]] = []
        seen: list[int] = []

        async def crash_then_release() -> None:
            try:
                await crash(victim)
            finally:
                gate.set()

        def on_token(token: int) -> None:
            seen.append(token)
            if len(seen) == 25:
                # the next step waits at the tail until the victim is gone: on a fast machine the
                # remaining 39 tokens could otherwise finish before its p2pd has shut down
                tail.runtime.submit(gate.wait, "test-gate")
                tasks.append(asyncio.create_task(crash_then_release()))

        result = await client.generate(PROMPT, max_new_tokens=64, stop_on_eos=False, on_token=on_token)
        await asyncio.gather(*tasks)
        assert tasks, "the crash never happened"
        assert result.token_ids == local_model.generate_greedy(PROMPT, 64, eos_token_ids=[])
        assert len(result.stalls_s) == 1
        assert victim.peer_id not in {s.peer_id for s in result.route}
    finally:
        await client.close()


async def test_no_replacement_raises_no_route_error_naming_blocks(make_swarm) -> None:
    swarm = await make_swarm([(0, 4), (4, 6)])
    client = await swarm.client(failover_timeout_s=1.0)
    try:
        async with client.inference_session(max_length=16) as session:
            await session.step(client.head.embed(torch.tensor([PROMPT])))
            await crash(swarm.peers[1])
            with pytest.raises(NoRouteError) as info:
                await session.step(client.head.embed(torch.tensor([[5]])))
        assert info.value.missing_blocks == [4, 5]
    finally:
        await client.close()
