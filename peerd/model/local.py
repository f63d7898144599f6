"""The whole model in one process: the reference that swarm runs are compared against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from peerd.model.config import ModelConfig
from peerd.model.head import ClientHead
from peerd.model.stage import Stage

__all__ = ["LocalModel"]


class LocalModel:
    """A :class:`ClientHead` plus one :class:`Stage` holding every block.

    Load one with ``peerd.model.loading.load_local_model`` or build one from
    parts. :meth:`forward` gives full-sequence logits; :meth:`generate_greedy`
    decodes with the KV cache exactly as a swarm session does (one prefill,
    then one-token steps), so its tokens/s is the local baseline.
    """

    def __init__(self, head: ClientHead, stage: Stage) -> None:
        if stage.start != 0 or stage.end != stage.config.num_layers:
            raise ValueError(f"LocalModel needs all {stage.config.num_layers} blocks, got [{stage.start}, {stage.end})")
        if head.config != stage.config:
            raise ValueError("head and stage were built from different configs")
        self.head = head
        self.stage = stage
        self.config: ModelConfig = stage.config

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``[batch, n, vocab_size]`` for ``input_ids [batch, n]`` (no cache, causal)."""
        return self.head.logits(self.stage(self.head.embed(input_ids)))

    __call__ = forward

    @torch.inference_mode()
    def generate_greedy(
        self, input_ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int] | None = None
    ) -> list[int]:
        """Greedy continuation of the prompt ``input_ids``: returns only the new tokens.

        Stops after ``max_new_tokens`` or right after emitting one of
        ``eos_token_ids`` (default: the config's), which is then the last token
        returned. Ties between equal logits go to the lowest token id.
        """
        if not input_ids:
            raise ValueError("generate_greedy needs a non-empty prompt")
        if max_new_tokens <= 0:
            return []
        stop = set(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        device = self.stage.device
        cache = self.stage.allocate_cache(1, len(input_ids) + max_new_tokens)
        tokens = torch.tensor([list(input_ids)], dtype=torch.int64, device=device)  # [1, prompt]
        position = 0
        new_tokens: list[int] = []
        while True:
            hidden = self.stage(self.head.embed(tokens), cache, position)  # [1, n, hidden_size]
            logits = self.head.logits(hidden[:, -1:])  # [1, 1, vocab_size]
            next_token = int(logits[0, -1].argmax())
            new_tokens.append(next_token)
            if next_token in stop or len(new_tokens) == max_new_tokens:
                return new_tokens
            position += tokens.shape[1]
            tokens = torch.tensor([[next_token]], dtype=torch.int64, device=device)  # [1, 1]
