"""Client failover with in-process peers: a peer that vanishes mid-generation changes no token."""

from __future__ import annotations

import pytest
import torch

from peerd.client import NoRouteError
from peerd.model.local import LocalModel
from tests.helpers.swarm import crash, generate_through_a_crash

PROMPT = [7, 1, 8, 2, 8, 1, 8]


async def test_vanished_peer_mid_generation_changes_no_token(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm([(0, 3), (0, 3), (3, 6)])
    client = await swarm.client()
    try:
        result, _ = await generate_through_a_crash(swarm, client, PROMPT, max_new_tokens=64, crash_after=25)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 64, eos_token_ids=[])
        assert len(result.stalls_s) == 1
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
