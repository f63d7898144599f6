"""Next-token choice from logits: penalties, then greedy or temperature with top-k and nucleus (top-p).

The knobs and their meaning follow what OpenAI-compatible servers (vLLM, llama.cpp) accept, so a
request to ``peerd api`` means the same as elsewhere: ``repetition_penalty`` is the multiplicative
CTRL-paper penalty over prompt and output tokens (1 = off), ``presence_penalty`` and
``frequency_penalty`` are OpenAI's additive penalties over the output so far (0 = off). Penalties
apply to greedy decoding too: that is what stops a small model's greedy output from looping.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "apply_penalties", "sample_next", "token_probs"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token, and when to stop early. The defaults are plain greedy decoding."""

    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 1.0  # < 1 keeps the smallest set of tokens whose mass reaches top_p
    top_k: int = 0  # > 0 keeps only the k most likely tokens (0 = off)
    seed: int | None = None  # the same seed, prompt and swarm give the same sampled text
    repetition_penalty: float = 1.0  # > 1 discourages any token already in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the output
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings (not included)
    stop_token_ids: tuple[int, ...] = ()  # generation ends at these tokens (besides the model's EOS)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]
) -> torch.Tensor:
    """``logits`` [batch, vocab] with the repetition, presence and frequency penalties applied (a copy)."""
    if not params.penalised:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in (*prompt, *output) if 0 <= t < vocab}), dtype=torch.long)
        if len(seen):
            picked = logits[:, seen]  # [batch, n_seen]
            # divide positive logits, multiply negative ones: both make the token less likely
            logits[:, seen] = torch.where(
                picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
            )
    counts = Counter(t for t in output if 0 <= t < vocab)
    if counts and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(counts), dtype=torch.long)
        n = torch.tensor(list(counts.values()), dtype=torch.float32)
        logits[:, ids] -= params.frequency_penalty * n + params.presence_penalty
    return logits


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
) -> torch.Tensor:
    """Pick next tokens from ``logits`` [batch, vocab]; returns [batch] int64.

    ``prompt`` and ``output`` are the token ids so far (for the penalties).
    """
    logits = apply_penalties(logits, params, prompt, output)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = token_probs(logits, params)  # [batch, vocab]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [batch]


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample_next`` draws from when ``temperature > 0``: [batch, vocab] -> [batch, vocab].

    ``logits`` must already carry the penalties (:func:`apply_penalties`). Speculative sampling
    needs these probabilities themselves, to accept a draft token with the target's probability.
    """
    if params.temperature <= 0:
        raise ValueError("token_probs needs temperature > 0 (greedy has no distribution)")
    scaled = logits.float() / params.temperature  # [batch, vocab]
    if 0 < params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]  # [batch, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [batch, vocab]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [batch, vocab] each
        cumulative = sorted_probs.cumsum(dim=-1)
        # keep tokens until the mass before them reaches top_p (always keeps the top token)
        sorted_probs[(cumulative - sorted_probs) >= params.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs
