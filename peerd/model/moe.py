"""Mixtral's sparse mixture of experts: a router picks the top-k expert MLPs for each token.

Names equal the checkpoint's below ``model.layers.{i}.block_sparse_moe.`` (``gate.weight``, the
router; ``experts.{e}.w1/w2/w3.weight``, each a SwiGLU MLP), the layout transformers saves.
Routing follows the reference exactly: softmax over all experts in float32, top-k, the k weights
renormalised to sum to 1, and each token's output the weighted sum of its experts' outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerd.model.config import ModelConfig

__all__ = ["Expert", "SparseMoE"]


class Expert(nn.Module):
    """One expert: a SwiGLU MLP ``w2(silu(w1(x)) * w3(x))`` (Mixtral's names)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # type: ignore[no-any-return]


class SparseMoE(nn.Module):
    """``x [batch, n, hidden] -> [batch, n, hidden]`` through the top ``experts_per_token`` experts of each token.

    Only the experts some token chose run, each once on all of its tokens (a gather, the expert's
    MLP, a weighted scatter-add), so the cost per token is k experts whatever their number.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            Expert(config.hidden_size, config.intermediate_size) for _ in range(config.num_experts)
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, n, hidden = x.shape
        tokens = x.reshape(batch * n, hidden)  # [tokens, hidden]
        probs = F.softmax(self.gate(tokens).float(), dim=-1)  # [tokens, experts], float32 as the reference
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [tokens, k] each
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)  # [tokens, hidden]
        for expert_index in torch.unique(chosen).tolist():  # ascending, the reference's order of summation
            token_rows, slot = torch.where(chosen == expert_index)  # tokens that chose it, and in which slot
            expert_out = self.experts[expert_index](tokens[token_rows])  # [m, hidden]
            out.index_add_(0, token_rows, (expert_out * weights[token_rows, slot, None]).to(out.dtype))
        return out.reshape(batch, n, hidden)  # [batch, n, hidden]
