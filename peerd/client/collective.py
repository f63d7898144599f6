"""Gradient averaging across a run's trainers: n trainers take the optimizer steps that one trainer
with their summed batch would take.

One optimizer step of a run (``Averaged.GRADIENTS``, the default of ``--collaborate``):

1. Each trainer accumulates gradients over its local batches (summed over samples) until the step
   is due: after ``average_every`` local batches, or, with a global ``target_batch_size``, once
   the samples that all trainers report for this step reach it (each trainer writes its count
   after every local batch to ``<run key>.<round>.samples``, in its own signed subkey). A slower
   trainer simply has fewer samples in the step when the target is reached.
2. The averager's round combines the trainers' *mean* gradients weighted by their samples: the
   mean gradient over the union of their batches, what one trainer with that batch computes.
3. Every member takes the run's state (adapter and AdamW moments, the same on every member),
   applies the combined gradient, steps, and commits the result: identical inputs, identical
   outputs, bit for bit. A member that missed the round downloads that result and keeps its
   gradients for the next step (they count one step late).

Why not average the adapters after local AdamW steps (``Averaged.PARAMETERS``): each trainer's
Adam divides its own gradient by its own second-moment estimate, so the average of n such steps
on half-batches is not the step on the whole batch (roughly lr * mean(sign(g_i)) instead of
lr * sign(mean(g_i)) early on); docs/finetuning.md shows the curves drifting apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peerd.client.adapters import ClientAdapter
from peerd.client.objective import Batches, Blocks, FinetuneResult, lm_loss

if TYPE_CHECKING:
    from peerd.client.averaging import Averager

__all__ = ["SampleCounter", "load_optimizer_state", "optimizer_state", "train_by_gradients"]

MAX_REPORTED_SAMPLES = 1 << 30  # a count above this from another trainer is nonsense: read as 0


def optimizer_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> Tensor:
    """AdamW's moments and step count as one flat vector ``[2 n + 1]`` (zeros before the first step)."""
    n = sum(p.numel() for p in params)
    if not all(p in optimizer.state and optimizer.state[p] for p in params):
        return torch.zeros(2 * n + 1)
    first = torch.cat([optimizer.state[p]["exp_avg"].reshape(-1) for p in params])  # [n]
    second = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for p in params])  # [n]
    step = torch.as_tensor(optimizer.state[params[0]]["step"], dtype=torch.float32).reshape(1)  # [1]
    return torch.cat([first.float(), second.float(), step])


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], flat: Tensor) -> None:
    """Inverse of :func:`optimizer_state` (a zero step count means: no state yet)."""
    n = sum(p.numel() for p in params)
    if flat.numel() != 2 * n + 1:
        raise ValueError(f"optimizer state of {flat.numel()} values, expected {2 * n + 1}")
    step = float(flat[-1])
    for p in params:
        optimizer.state.pop(p, None)
    if step <= 0:
        return
    offset = 0
    for p in params:
        size = p.numel()
        optimizer.state[p] = {
            "step": torch.tensor(step),
            "exp_avg": flat[offset : offset + size].view_as(p).clone(),
            "exp_avg_sq": flat[n + offset : n + offset + size].view_as(p).clone(),
        }
        offset += size


class SampleCounter:
    """The samples all trainers of a run have accumulated for one step, counted over the DHT.

    Counts are per authenticated peer (signed subkeys), so one trainer cannot report for another;
    a trainer can over-report its own count, which makes steps come early (smaller batches), not
    wrong: the round itself weights each gradient by the samples its sender claims.
    """

    def __init__(self, averager: Averager) -> None:
        self.averager = averager
        # last batch time each trainer reported, kept across steps: in a new step the slow trainer
        # has not reported yet when a fast one reaches the target, but its batch time is known
        self.batch_s: dict[str, float] = {}
        self._round = 0

    async def report(self, round_: int, samples: int, batch_s: float) -> tuple[float, float, bool]:
        """Say we hold ``samples`` for step ``round_`` (a local batch takes us ``batch_s``); then
        (samples of all trainers, the slowest trainer's batch time, whether the step's round has begun)."""
        avg = self.averager
        cfg = avg.config
        key = f"{avg.round_key(round_)}.samples"
        with contextlib.suppress(TimeoutError, OSError):
            value = {"peer": avg.peer_id, "samples": samples, "batch_s": batch_s}
            await avg.dht.store_owned(key, value, expiration_s=cfg.record_ttl_s, timeout_s=cfg.dht_timeout_s)
        counts = await avg.dht.read_owned(key, timeout_s=cfg.dht_timeout_s)
        if round_ != self._round and round_ > 0:  # first look at this step: the last step's reports
            self._round = round_  # hold batch times of trainers that have not reported in this one yet
            previous = f"{avg.round_key(round_ - 1)}.samples"
            self._note_batch_times(await avg.dht.read_owned(previous, timeout_s=cfg.dht_timeout_s))
        started = bool(await avg.dht.read_owned(avg.round_key(round_), timeout_s=cfg.dht_timeout_s))
        total: float = samples
        self.batch_s[avg.peer_id] = batch_s
        for value in self._note_batch_times(counts).values():  # by signing key: one per trainer's DHT identity
            total += _bounded(value.get("samples"), MAX_REPORTED_SAMPLES)
        return total, max(self.batch_s.values()), started

    def _note_batch_times(self, counts: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Remember the others' batch times in ``counts``; their entries (ours left out: it may be stale)."""
        others = {s: v for s, v in counts.items() if isinstance(v, dict) and v.get("peer") != self.averager.peer_id}
        for signer, value in others.items():
            self.batch_s[signer] = _bounded(value.get("batch_s"), self.averager.config.round_timeout_s)
        return others


def _bounded(value: Any, high: float) -> float:
    """A non-negative number from remote input (anything else, or over ``high``: 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value) if 0 <= value <= high else 0.0


def accumulate(adapter: ClientAdapter, blocks: Blocks, input_ids: Tensor) -> float:
    """Add the gradient of this batch's *summed* loss to the parameters' ``.grad`` (blocking); the mean loss."""
    loss = lm_loss(adapter, blocks, input_ids)
    (loss * input_ids.shape[0]).backward()  # type: ignore[no-untyped-call]
    return float(loss.detach())


async def train_by_gradients(
    adapter: ClientAdapter,
    blocks: Blocks,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    averager: Averager,
    result: FinetuneResult,
    *,
    steps: int,
    average_every: int = 1,
    on_step: Callable[[int, float], None] | None = None,
    evaluate: Callable[[int], Awaitable[None]] | None = None,
) -> None:
    """Take ``steps`` optimizer steps of the run (see the module doc), appending to ``result``.

    ``on_step(step, loss)`` after each step with this trainer's mean loss over its batches in it;
    ``evaluate(steps)`` after each step of the run, ours or one we were late for (every member
    holds the same adapter then).
    """
    params = list(adapter.trainable_parameters().values())
    if averager.extra.numel() != 2 * sum(p.numel() for p in params) + 1:
        raise ValueError("gradient averaging needs the averager created with extra=optimizer_state(optimizer, params)")
    target = averager.config.target_batch_size
    counter = SampleCounter(averager) if target > 0 else None
    _load_run_state(params, optimizer, averager)
    optimizer.zero_grad(set_to_none=True)
    first_round = averager.round
    samples, batches_done, loss_sum, batch_s = 0, 0, 0.0, 0.0
    while averager.round - first_round < steps:
        ids = batches.sample()
        started = time.perf_counter()
        loss = await asyncio.to_thread(accumulate, adapter, blocks, ids)
        batch_s = time.perf_counter() - started
        result.losses.append(loss)
        result.tokens += ids.numel()
        samples, batches_done, loss_sum = samples + ids.shape[0], batches_done + 1, loss_sum + loss * ids.shape[0]
        window_s: float | None = None
        if counter is not None:
            total, slowest_s, begun = await counter.report(averager.round, samples, batch_s)
            if total < target and not begun:
                continue
            # room for the slowest trainer to finish the batch it is in: its samples count too
            window_s = averager.config.group_window_s + 1.5 * slowest_s
        elif batches_done < average_every:
            continue
        grads = torch.cat([_grad(p).reshape(-1) for p in params]) / samples  # [n]: our mean gradient
        combined, report = await averager.exchange(grads, weight=samples, window_s=window_s)
        result.rounds.append(report)
        _load_run_state(params, optimizer, averager)  # the group's (or, late, the run's) state
        if combined is None:  # late: our gradients stay accumulated and count in the next step
            if evaluate is not None:
                await evaluate(averager.round - first_round)
            continue
        offset = 0
        for p in params:  # the combined gradient: the mean over every used member's samples
            p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flat = torch.cat([p.detach().float().reshape(-1) for p in params])  # [n]
        report.digest = await averager.commit(flat, optimizer_state(optimizer, params))
        result.step_losses.append(loss_sum / samples)
        if on_step is not None:
            on_step(len(result.step_losses) - 1, loss_sum / samples)
        if evaluate is not None:
            await evaluate(averager.round - first_round)
        samples, batches_done, loss_sum = 0, 0, 0.0


def _grad(p: torch.nn.Parameter) -> Tensor:
    return p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)


def _load_run_state(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, averager: Averager) -> None:
    """Make our adapter and AdamW state the averager's (a no-op when they are already equal)."""
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(averager.base[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    load_optimizer_state(optimizer, params, averager.extra)
