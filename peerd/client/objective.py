"""What a trainer optimises and reports: the next-token loss of a batch through the blocks (with
the adapter around them), a held-out loss, and the result of a training run. Shared by the
single-trainer loop (peerd/client/training.py) and gradient averaging (peerd/client/collective.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from peerd.client.adapters import ClientAdapter

if TYPE_CHECKING:
    from peerd.client.run_records import RoundReport

__all__ = ["Batches", "Blocks", "FinetuneResult", "heldout_loss", "lm_loss"]

Blocks = Callable[[Tensor], Tensor]  # hidden [batch, n, hidden] -> hidden: RemoteBlocks, or a local Stage


class Batches(Protocol):
    """Where training batches come from (:class:`TokenBatches`, or fixed batches in tests)."""

    def sample(self) -> Tensor: ...  # [batch, seq_len] token ids


def lm_loss(adapter: ClientAdapter, blocks: Blocks, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``input_ids [batch, n]`` with the adapter's soft prompt in front.

    With a soft prompt of length p, the output at position p - 1 (the prompt's last vector)
    predicts the first real token, so every token of the window is a target; without one, the
    first token is context only.
    """
    p = adapter.prefix_length
    hidden = adapter.embed(input_ids)  # [batch, p + n, hidden]
    out = blocks(hidden)  # [batch, p + n, hidden]
    if p:
        logits = adapter.logits(out[:, p - 1 : -1])  # [batch, n, vocab]
        targets = input_ids  # [batch, n]
    else:
        logits = adapter.logits(out[:, :-1])  # [batch, n - 1, vocab]
        targets = input_ids[:, 1:]  # [batch, n - 1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def heldout_loss(adapter: ClientAdapter, blocks: Blocks, windows: Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token loss over every window of ``windows [k, seq_len]`` without gradients (blocking)."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            chunk = windows[start : start + batch_size]  # [<= batch_size, seq_len]
            total += float(lm_loss(adapter, blocks, chunk)) * chunk.shape[0]
    return total / max(1, windows.shape[0])


@dataclass
class FinetuneResult:
    """What a training run produced."""

    adapter: ClientAdapter
    losses: list[float] = field(default_factory=list)  # one per local batch (a step, unless accumulating)
    step_losses: list[float] = field(default_factory=list)  # one per optimizer step: this trainer's mean loss in it
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (steps taken, held-out loss)
    tokens: int = 0  # tokens trained on (soft prompt excluded)
    elapsed_s: float = 0.0
    retries: int = 0  # remote stage calls redone on another peer
    rounds: list[RoundReport] = field(default_factory=list)  # averaging rounds (collaborative runs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
