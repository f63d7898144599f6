"""Training through a swarm (the library behind `peerd finetune`): prompt tuning and client-side
LoRA through a swarm whose blocks stay frozen.

The client embeds a batch of text windows (with a trainable soft prompt in front), sends the hidden
states through the swarm in micro-batches (:class:`peerd.client.autograd.RemoteBlocks`), computes
the next-token loss locally with the (LoRA-adapted) LM head, and calls ``loss.backward()``: the
gradient returns through the same peers to the soft prompt and embedding adapter. Only the
client's :class:`~peerd.client.adapters.ClientAdapter` changes; it is saved as safetensors, with
a loss-curve PNG beside it. ``SwarmClient.generate(..., adapter=...)`` uses it afterwards.

Each optimizer step runs in a worker thread (``asyncio.to_thread``), see peerd/client/autograd.py
for why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from peerd.client.adapters import ClientAdapter
from peerd.client.objective import Batches, Blocks, FinetuneResult, heldout_loss, lm_loss
from peerd.client.training_options import DEFAULT_DATA

if TYPE_CHECKING:
    from peerd.client.averaging import Averager
    from peerd.client.swarm import SwarmClient

__all__ = [
    "DEFAULT_DATA",
    "Batches",
    "FinetuneResult",
    "TokenBatches",
    "finetune",
    "heldout_loss",
    "lm_loss",
    "train_step",
]


class TokenBatches:
    """Random batches of ``seq_len``-token windows from one long token sequence (reproducible by seed).

    Windows start every ``seq_len // 2`` tokens, so every token is seen in two contexts; a
    sequence shorter than one window raises ValueError.
    """

    def __init__(self, ids: Sequence[int], *, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if seq_len < 2 or batch_size < 1:
            raise ValueError("seq_len must be >= 2 and batch_size >= 1")
        if len(ids) < seq_len:
            raise ValueError(f"the training text has {len(ids)} tokens, fewer than one window of {seq_len}")
        stride = max(1, seq_len // 2)
        tokens = torch.tensor(list(ids), dtype=torch.int64)
        self.windows = tokens.unfold(0, seq_len, stride)  # [num_windows, seq_len]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def sample(self) -> Tensor:
        """A batch ``[batch_size, seq_len]`` of windows drawn without replacement (with it if too few)."""
        n = len(self)
        if n >= self.batch_size:
            rows = torch.randperm(n, generator=self.generator)[: self.batch_size]
        else:
            rows = torch.randint(0, n, (self.batch_size,), generator=self.generator)
        return self.windows[rows]


def train_step(adapter: ClientAdapter, blocks: Blocks, optimizer: torch.optim.Optimizer, input_ids: Tensor) -> float:
    """One optimizer step on one batch (blocking: run it in a worker thread when ``blocks`` is remote)."""
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(adapter, blocks, input_ids)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(loss.detach())


async def finetune(
    client: SwarmClient,
    batches: Batches,
    *,
    steps: int,
    adapter: ClientAdapter | None = None,
    lr: float = 5e-3,
    micro_batches: int = 4,
    rng_seed: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    averager: Averager | None = None,
    average_every: int = 1,
    eval_windows: Tensor | None = None,
    eval_every: int = 1,
    blocks: Blocks | None = None,
) -> FinetuneResult:
    """Train ``adapter`` (default: a 16-token soft prompt) for ``steps`` optimizer steps through the swarm.

    Must be awaited on the client's event loop; each step runs in a worker thread. ``on_step``
    gets (step, loss) after every step (progress bars). With an ``averager`` (a collaborative run,
    peerd/client/averaging.py) the adapter starts from the run's state; by its config's
    ``averaged``, each step averages the trainers' gradients (peerd/client/collective.py), or the
    adapters are averaged every ``average_every`` local steps (local SGD, own AdamW moments).
    ``eval_windows [k, seq_len]``: a held-out loss before training and every ``eval_every`` steps
    (``result.eval_losses``). ``blocks`` replaces the swarm's :class:`RemoteBlocks` (tests).
    """
    import random

    from peerd.client.autograd import RemoteBlocks
    from peerd.client.collective import train_by_gradients
    from peerd.client.run_records import Averaged

    adapter = adapter or ClientAdapter(client.head, prompt_tokens=16)
    params = list(adapter.trainable_parameters().values())
    if not params:
        raise ValueError("the adapter has nothing to train: give it prompt_tokens or a LoRA rank")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(rng_seed) if rng_seed is not None else None
    remote = RemoteBlocks(client, micro_batches=micro_batches, rng=rng)
    run_blocks: Blocks = blocks or remote
    result = FinetuneResult(adapter=adapter)

    async def evaluate(done: int) -> None:
        if eval_windows is not None and done % max(1, eval_every) == 0:
            loss = await asyncio.to_thread(heldout_loss, adapter, run_blocks, eval_windows)
            result.eval_losses.append((done, loss))

    await evaluate(0)
    started = time.perf_counter()
    if averager is not None and averager.config.averaged is Averaged.GRADIENTS:
        await train_by_gradients(
            adapter,
            run_blocks,
            optimizer,
            batches,
            averager,
            result,
            steps=steps,
            average_every=average_every,
            on_step=on_step,
            evaluate=evaluate,
        )
    else:
        await _train_locally(
            adapter, run_blocks, optimizer, batches, averager, result, steps, average_every, on_step, evaluate
        )
    if remote.last_trace is not None:
        result.retries += remote.last_trace.retries
    result.elapsed_s = time.perf_counter() - started
    return result


async def _train_locally(
    adapter: ClientAdapter,
    blocks: Blocks,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    averager: Averager | None,
    result: FinetuneResult,
    steps: int,
    average_every: int,
    on_step: Callable[[int, float], None] | None,
    evaluate: Callable[[int], Awaitable[None]],
) -> None:
    """One trainer's own AdamW steps; with an ``averager``, adapters averaged every ``average_every`` steps."""
    params = list(adapter.trainable_parameters().values())
    if averager is not None:
        _set_flat(params, averager.base)  # a late joiner continues from the run's state
    samples_since_round = 0
    for step in range(steps):
        ids = batches.sample()
        loss = await asyncio.to_thread(train_step, adapter, blocks, optimizer, ids)
        result.losses.append(loss)
        result.step_losses.append(loss)
        result.tokens += ids.numel()
        samples_since_round += ids.shape[0]
        if averager is not None and (step + 1) % max(1, average_every) == 0:
            averaged, report = await averager.average(_flat(params), weight=samples_since_round)
            _set_flat(params, averaged)
            result.rounds.append(report)
            samples_since_round = 0
        if on_step is not None:
            on_step(step, loss)
        await evaluate(step + 1)


def _flat(params: Sequence[torch.nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in params])  # [total]


def _set_flat(params: Sequence[torch.nn.Parameter], flat: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
