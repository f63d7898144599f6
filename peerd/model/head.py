"""The client's side of the model: token embeddings in, final norm and LM head out.

Kept apart from the blocks because the client runs these locally while
servers run the blocks. Parameter names are the checkpoint's with ``model.``
dropped from the first two: ``embed_tokens.weight`` (``model.embed_tokens.weight``),
``norm.weight`` (``model.norm.weight``) and ``lm_head.weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from peerd.model.config import ModelConfig
from peerd.model.linear import Linear
from peerd.model.llama import RMSNorm

__all__ = ["ClientHead"]


class ClientHead(nn.Module):
    """Embedding, final RMSNorm and LM head of a model; ``lm_head`` shares the embedding when tied.

    :meth:`embed` maps ``input_ids [batch, n]`` to ``hidden [batch, n,
    hidden_size]``; :meth:`logits` maps final hidden states to ``[batch, n,
    vocab_size]``. Weights are frozen, but both stay differentiable with respect
    to hidden states (prompt tuning trains the inputs, not the weights).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma=config.gemma_norms)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.requires_grad_(False)

    def tie_weights(self) -> None:
        """Make ``lm_head`` use the embedding matrix when the config ties them (again after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights and of the hidden states :meth:`embed` returns."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.embed_tokens.weight.device

    def embed(self, input_ids: Tensor) -> Tensor:
        """Hidden states ``[batch, n, hidden_size]`` for token ids ``[batch, n]``; ValueError on bad ids."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, n], got {input_ids.dtype} {input_ids.shape}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        hidden = self.embed_tokens(input_ids)  # [batch, n, hidden_size]
        if self.config.gemma_norms:  # Gemma scales embeddings by sqrt(hidden_size), rounded to their dtype
            hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        return hidden  # type: ignore[no-any-return]

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits ``[batch, n, vocab_size]`` from the last block's output (final norm, LM head)."""
        if hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden states must end in {self.config.hidden_size}, got {tuple(hidden.shape)}")
        logits = self.lm_head(self.norm(hidden))  # [batch, n, vocab_size]
        cap = self.config.final_logit_softcap
        if cap is not None:  # Gemma: squash logits smoothly into (-cap, cap)
            logits = torch.tanh(logits / cap) * cap
        return logits  # type: ignore[no-any-return]
