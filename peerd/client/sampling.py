"""Next-token choice from logits: greedy, temperature, nucleus (top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "sample_next"]


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (deterministic); top_p < 1 keeps the smallest likely set."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick next tokens from ``logits`` [batch, vocab]; returns [batch] int64."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [batch, vocab]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [batch, vocab] each
        cumulative = sorted_probs.cumsum(dim=-1)
        # keep tokens until the mass before them reaches top_p (always keeps the top token)
        sorted_probs[(cumulative - sorted_probs) >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [batch]
