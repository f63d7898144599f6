"""Gradient averaging across trainers (peerd/client/collective.py) on a real local swarm.

n trainers averaging gradients must take the optimizer steps of one trainer holding all their
batches; a global target batch size must make the run step once the trainers together hold that
many samples, with a slower trainer contributing fewer of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from peerd.client.adapters import ClientAdapter
from peerd.client.autograd import RemoteBlocks
from peerd.client.averaging import Averager, AveragingConfig
from peerd.client.collective import optimizer_state
from peerd.client.run_records import Averaged
from peerd.client.training import FinetuneResult, TokenBatches, finetune

STEPS = 3
SEQ_LEN = 12


class FixedBatches:
    """The given batches, in order (what each trainer sees at each step is then known exactly)."""

    def __init__(self, batches: Sequence[Tensor]) -> None:
        self.batches = list(batches)

    def sample(self) -> Tensor:
        return self.batches.pop(0)


def flat(adapter: ClientAdapter) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in adapter.trainable_parameters().values()])


async def train_together(swarm, shards: list[list[Tensor]], averaged: Averaged, run: str) -> list[FinetuneResult]:  # type: ignore[no-untyped-def]
    clients = [await swarm.client() for _ in shards]
    averagers: list[Averager] = []
    try:
        jobs = []
        for client, batches in zip(clients, shards, strict=True):
            adapter = ClientAdapter(client.head, prompt_tokens=4, head_rank=2, seed=0)
            params = list(adapter.trainable_parameters().values())
            config = AveragingConfig(run=run, averaged=averaged, group_window_s=1.0, round_timeout_s=20.0)
            extra = optimizer_state(torch.optim.AdamW(params), params) if averaged is Averaged.GRADIENTS else None
            averager = await Averager.create(client.p2p, client.dht, config, flat(adapter), extra)
            averagers.append(averager)
            jobs.append(finetune(client, FixedBatches(batches), steps=STEPS, adapter=adapter, averager=averager))
        return list(await asyncio.gather(*jobs))
    finally:
        for averager in averagers:
            await averager.close()
        for client in clients:
            await client.close()


async def test_two_trainers_averaging_gradients_take_the_steps_of_one_trainer_holding_both_batches(
    make_swarm,
) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        ids = client.encode("the cat sat on the mat and the dog ran in the park. " * 20)
        windows = TokenBatches(ids, seq_len=SEQ_LEN, batch_size=1).windows  # [k, SEQ_LEN]
        union = [windows[4 * s : 4 * s + 4] for s in range(STEPS)]  # [4, SEQ_LEN] per step
        alone = await finetune(
            client, FixedBatches(union), steps=STEPS, adapter=ClientAdapter(client.head, prompt_tokens=4, head_rank=2)
        )
    finally:
        await client.close()
    halves = [[b[:2] for b in union], [b[2:] for b in union]]  # disjoint: each trainer half of every batch
    by_gradients = await train_together(swarm, halves, Averaged.GRADIENTS, "by-gradients")
    by_parameters = await train_together(swarm, halves, Averaged.PARAMETERS, "by-parameters")

    single = flat(alone.adapter)
    grads = [flat(r.adapter) for r in by_gradients]
    assert torch.equal(grads[0], grads[1])  # the members agree bit for bit
    assert [len(r.rounds) for r in by_gradients] == [STEPS, STEPS]
    assert all(len(rep.used) == 2 and rep.samples == 4 for r in by_gradients for rep in r.rounds)
    gradient_gap = float((grads[0] - single).abs().max())
    parameter_gap = float((flat(by_parameters[0].adapter) - single).abs().max())
    # float rounding of a 4-row mean vs two 2-row means, through AdamW: far below one step (lr 5e-3)
    assert gradient_gap < 2e-4, gradient_gap
    # the control: averaging adapters after per-trainer AdamW steps is not the large-batch step
    assert parameter_gap > 10 * gradient_gap and parameter_gap > 1e-3, (parameter_gap, gradient_gap)
    # each trainer's step loss is its own half's; their mean is the single trainer's batch loss
    for step in range(STEPS):
        mean = (by_gradients[0].step_losses[step] + by_gradients[1].step_losses[step]) / 2
        assert abs(mean - alone.step_losses[step]) < 1e-4


class SlowBlocks:
    """The swarm's blocks with ``delay_s`` more per forward: a trainer on a slower machine."""

    def __init__(self, blocks: RemoteBlocks, delay_s: float) -> None:
        self.blocks, self.delay_s = blocks, delay_s

    def __call__(self, hidden: Tensor) -> Tensor:
        time.sleep(self.delay_s)  # runs in the step's worker thread, not on the event loop
        return self.blocks(hidden)


async def test_a_target_batch_size_steps_on_the_samples_of_all_trainers_and_a_slow_one_adds_fewer(
    make_swarm,
) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    clients = [await swarm.client() for _ in range(2)]
    target = 12
    averagers: list[Averager] = []
    try:
        ids = clients[0].encode("one two three four five six seven eight nine ten. " * 20)
        jobs = []
        for i, client in enumerate(clients):
            adapter = ClientAdapter(client.head, prompt_tokens=4, head_rank=2, seed=0)
            params = list(adapter.trainable_parameters().values())
            config = AveragingConfig(run="target", target_batch_size=target, group_window_s=2.0, round_timeout_s=20.0)
            extra = optimizer_state(torch.optim.AdamW(params), params)
            averager = await Averager.create(client.p2p, client.dht, config, flat(adapter), extra)
            averagers.append(averager)
            batches = TokenBatches(ids, seq_len=SEQ_LEN, batch_size=2, seed=i)
            blocks = SlowBlocks(RemoteBlocks(client), delay_s=1.5) if i == 1 else None
            jobs.append(finetune(client, batches, steps=2, adapter=adapter, averager=averager, blocks=blocks))
        fast, slow = await asyncio.gather(*jobs)
        assert torch.equal(flat(fast.adapter), flat(slow.adapter))
        assert len(fast.step_losses) == len(slow.step_losses) == 2
        for mine, theirs in zip(fast.rounds, slow.rounds, strict=True):
            assert mine.digest == theirs.digest and not mine.late
            assert len(mine.used) == 2 and mine.samples >= target, mine
        # every local batch is 2 samples; the fast trainer ran more of them into the same steps
        assert len(fast.losses) > len(slow.losses) >= 2, (len(fast.losses), len(slow.losses))
        assert sum(r.samples for r in fast.rounds) == 2 * (len(fast.losses) + len(slow.losses))
    finally:
        for averager in averagers:
            await averager.close()
        for client in clients:
            await client.close()


async def test_a_trainer_joining_a_gradient_run_late_gets_the_optimizer_state_and_steps_in_lockstep(
    make_swarm,
) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    clients = [await swarm.client() for _ in range(3)]
    averagers: list[Averager] = []
    try:
        ids = clients[0].encode("late joiners must step like the others. " * 20)
        adapters = [ClientAdapter(c.head, prompt_tokens=4, head_rank=2, seed=i) for i, c in enumerate(clients)]

        async def join(i: int) -> Averager:
            params = list(adapters[i].trainable_parameters().values())
            config = AveragingConfig(run="late", group_window_s=1.0, round_timeout_s=20.0)
            extra = optimizer_state(torch.optim.AdamW(params), params)
            averager = await Averager.create(clients[i].p2p, clients[i].dht, config, flat(adapters[i]), extra)
            averagers.append(averager)
            return averager

        def train(i: int, steps: int):  # type: ignore[no-untyped-def]
            batches = TokenBatches(ids, seq_len=SEQ_LEN, batch_size=2, seed=i)
            return finetune(clients[i], batches, steps=steps, adapter=adapters[i], averager=averagers[i])

        a, b = await join(0), await join(1)  # different initial adapters (seeds): the group agrees on one
        await asyncio.gather(train(0, 2), train(1, 2))
        assert a.round == b.round == 2 and float(a.extra[-1]) == 2.0  # AdamW's step count is in the state
        late = await join(2)  # downloads the adapter and the AdamW moments
        assert late.round == 2 and torch.equal(late.base, a.base) and torch.equal(late.extra, a.extra)
        results = await asyncio.gather(train(0, 1), train(1, 1), train(2, 1))
        assert all(r.rounds[-1].used == sorted(x.peer_id for x in averagers) for r in results)
        assert torch.equal(flat(adapters[0]), flat(adapters[2])) and torch.equal(flat(adapters[1]), flat(adapters[2]))
        assert torch.equal(late.extra, a.extra) and float(late.extra[-1]) == 3.0
    finally:
        for averager in averagers:
            await averager.close()
        for client in clients:
            await client.close()
