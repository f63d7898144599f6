"""Sparse mixture of experts (Mixtral, Qwen3-MoE): a router picks the top-k expert MLPs for each token.

Names equal the checkpoint's, the layout transformers saves: Mixtral below
``model.layers.{i}.block_sparse_moe.`` (``gate.weight``, the router; ``experts.{e}.w1/w3/w2``, the
gate/up/down projections of a SwiGLU MLP), Qwen3-MoE below ``model.layers.{i}.mlp.``
(``gate.weight``; ``experts.{e}.gate_proj/up_proj/down_proj``). Routing follows the references:
softmax over all experts in float32, top-k, the k weights renormalised to sum to 1 (always for
Mixtral, with ``norm_topk_prob`` for Qwen3-MoE, which also rounds them to the hidden dtype), and each
token's output the weighted sum of its experts' outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerd.model.config import ModelConfig
from peerd.model.linear import Linear

__all__ = ["MIXTRAL_NAMES", "QWEN_NAMES", "Expert", "SparseMoE"]


MIXTRAL_NAMES = ("w1", "w3", "w2")  # an expert's gate, up and down projections, as checkpoints name them
QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")


class Expert(nn.Module):
    """One expert: a SwiGLU MLP ``down(silu(gate(x)) * up(x))``, its projections named as the family does."""

    def __init__(self, hidden: int, inner: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, Linear(hidden, inner, bias=False))
        self.add_module(up, Linear(hidden, inner, bias=False))
        self.add_module(down, Linear(inner, hidden, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(F.silu(gate(x)) * up(x))  # type: ignore[no-any-return]


class SparseMoE(nn.Module):
    """``x [batch, n, hidden] -> [batch, n, hidden]`` through the top ``experts_per_token`` experts of each token.

    Only the experts some token chose run, each once on all of its tokens (a gather, the expert's
    MLP, a weighted scatter-add), so the cost per token is k experts whatever their number.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.experts_per_token
        self.renormalize = config.moe_renormalize
        self.mixtral = config.model_type == "mixtral"
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        inner = config.moe_intermediate_size or config.intermediate_size
        names = MIXTRAL_NAMES if self.mixtral else QWEN_NAMES
        self.experts = nn.ModuleList(Expert(config.hidden_size, inner, names) for _ in range(config.num_experts))

    def forward(self, x: Tensor) -> Tensor:
        batch, n, hidden = x.shape
        tokens = x.reshape(batch * n, hidden)  # [tokens, hidden]
        probs = F.softmax(self.gate(tokens).float(), dim=-1)  # [tokens, experts], float32 as the reference
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [tokens, k] each
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.mixtral:  # Qwen3-MoE rounds the routing weights to the hidden dtype first
            weights = weights.to(x.dtype)
        out = torch.zeros_like(tokens)  # [tokens, hidden]
        for expert_index in torch.unique(chosen).tolist():  # ascending, the reference's order of summation
            token_rows, slot = torch.where(chosen == expert_index)  # tokens that chose it, and in which slot
            expert_out = self.experts[expert_index](tokens[token_rows])  # [m, hidden]
            out.index_add_(0, token_rows, (expert_out * weights[token_rows, slot, None]).to(out.dtype))
        return out.reshape(batch, n, hidden)  # [batch, n, hidden]
