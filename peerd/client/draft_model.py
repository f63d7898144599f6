"""Speculative guesses from a small local draft model, for text that prompt lookup cannot guess.

Prompt lookup (client/lookup.py) guesses only where the context repeats itself. A small model that
shares the swarm model's tokenizer (SmolLM2-135M for a larger SmolLM2 or Llama-family model with
the same vocabulary) guesses anywhere: it runs on the client, greedily, ``k`` tokens ahead, and the
swarm checks all of them in one step, exactly as it checks looked-up guesses (speculative.py). Its
guesses are point masses too (the draft model's argmax), so verification keeps greedy output
identical and sampled output distributed as the swarm model's.

The draft model keeps its own KV cache for the generation. Rejected guesses are not erased: the
next call finds where its cached tokens and the context part ways and overwrites from there
(attention reads only the positions before the current one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peerd.client.speculative import DraftLength, Speculation
from peerd.model.local import LocalModel
from peerd.model.stage import KVCache

__all__ = ["ModelDrafter", "check_draft_model"]


def check_draft_model(draft: LocalModel, vocab_size: int) -> None:
    """ValueError unless ``draft`` can guess tokens of a model with ``vocab_size`` tokens."""
    if draft.config.vocab_size != vocab_size:
        raise ValueError(
            f"the draft model has a vocabulary of {draft.config.vocab_size} tokens and the swarm's model "
            f"{vocab_size}: a draft model must share the swarm model's tokenizer"
        )


class ModelDrafter:
    """Speculation state of one generation whose guesses come from ``model`` (same interface as
    ``lookup.Drafter``): ``drafts`` for the next step, ``observe`` what the swarm confirmed."""

    def __init__(self, model: LocalModel, config: Speculation, max_length: int) -> None:
        self.model = model
        self.length = DraftLength(config.initial_draft_tokens, config.max_draft_tokens)
        self.max_length = max_length  # context plus guesses: the cache is allocated at the first guess
        self.proposed = 0
        self.accepted = 0
        self._cache: KVCache | None = None
        self._cached: list[int] = []  # the tokens whose keys and values are in the cache, in order

    @torch.inference_mode()
    def drafts(self, context: Sequence[int], room: int) -> list[int]:
        """Up to ``k`` greedy guesses of the draft model after ``context`` (fewer if ``room`` is smaller)."""
        k = min(self.length.next_k, room, self.max_length - len(context))
        if k <= 0 or not context:
            self.length.skipped()
            return []
        if self._cache is None:
            self._cache = self.model.stage.allocate_cache(1, self.max_length)
        # reuse the cache up to where it and the context part ways; always feed the last token
        same = 0
        for have, want in zip(self._cached, context, strict=False):
            if have != want:
                break
            same += 1
        same = min(same, len(context) - 1)
        guesses = [self._next(list(context[same:]), same)]
        self._cached = list(context)
        while len(guesses) < k:
            self._cached.append(guesses[-1])
            guesses.append(self._next(guesses[-1:], len(self._cached) - 1))
        return guesses

    def _next(self, tokens: list[int], position: int) -> int:
        """The draft model's greedy token after feeding ``tokens`` at ``position`` of its cache."""
        head, stage = self.model.head, self.model.stage
        ids = torch.tensor([tokens], dtype=torch.int64, device=stage.device)  # [1, n]
        hidden = stage(head.embed(ids), self._cache, position)  # [1, n, hidden_size]
        return int(head.logits(hidden[:, -1:])[0, -1].argmax())

    def observe(self, proposed: int, accepted: int) -> None:
        """The step sent ``proposed`` guesses and the model confirmed the first ``accepted``."""
        self.proposed += proposed
        self.accepted += accepted
        self.length.update(proposed, accepted)
