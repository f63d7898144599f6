"""Generation and forward passes through a real 3-peer swarm equal the same model run locally."""

from __future__ import annotations

import asyncio

import torch

from peerd.model.local import LocalModel

PROMPT = [1, 5, 9, 23, 42, 7]


async def test_greedy_generation_is_token_identical_to_local(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        result = await client.generate(PROMPT, max_new_tokens=24, stop_on_eos=False)
        expected = local_model.generate_greedy(PROMPT, 24, eos_token_ids=[])
        assert result.token_ids == expected
        assert [s.end - s.start for s in result.route] == [2, 2, 2]
        assert result.time_to_first_token_s > 0
    finally:
        await client.close()


async def test_forward_and_session_logits_match_local_within_1e_4(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        ids = torch.tensor([PROMPT, [3, 1, 4, 1, 5, 9]])
        logits = await client.forward(ids)
        ref = local_model.forward(ids)
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)

        # the stateful path: prefill then one-token steps, compared position by position
        async with client.inference_session(max_length=16) as session:
            out = await session.step(client.head.embed(torch.tensor([PROMPT[:4]])))
            for i, token in enumerate(PROMPT[4:]):
                out = torch.cat([out, await session.step(client.head.embed(torch.tensor([[token]])))], dim=1)
                assert session.length == 5 + i
        torch.testing.assert_close(client.head.logits(out), ref[:1], atol=1e-4, rtol=0)
    finally:
        await client.close()


async def test_four_concurrent_clients_all_get_correct_results(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()
    clients = [await swarm.client() for _ in range(4)]
    prompts = [[1 + i, 17, 33 + i, 2, 250 - i] for i in range(4)]
    try:
        results = await asyncio.gather(
            *(c.generate(p, max_new_tokens=16, stop_on_eos=False) for c, p in zip(clients, prompts, strict=True))
        )
        for prompt, result in zip(prompts, results, strict=True):
            assert result.token_ids == local_model.generate_greedy(prompt, 16, eos_token_ids=[])
    finally:
        for c in clients:
            await c.close()


async def test_forward_reports_the_speed_the_client_observed(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        await client.forward(torch.tensor([[5, 6, 7, 8]]))
        observed = client.router.observed_tps
        assert set(observed) == {p.peer_id for p in swarm.peers}  # one hop per peer of the 3-span swarm
        assert all(rate > 0 for rate in observed.values())
    finally:
        await client.close()
