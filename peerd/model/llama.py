"""One decoder block, written out: RMSNorm, RoPE, grouped-query attention, a gated MLP (or experts).

Llama is the base; config flags add what the other families change: q/k norms (Qwen3, Gemma 3),
Gemma's (1 + w) sandwich norms, GeGLU and attention scale, sliding-window blocks, and a
mixture-of-experts MLP (Mixtral, Qwen3-MoE: ``moe.py``).

Module and parameter names equal the Hugging Face checkpoint names below
``model.layers.{i}.`` so that loading is a plain state-dict mapping. Attention
reads and writes an explicit key/value cache that the caller owns (see
``stage.KVCache``); nothing here keeps state between calls, except the
cos/sin tables of :class:`RotaryEmbedding`, which are pure functions of the
config and are grown once, never per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerd.model.config import ModelConfig
from peerd.model.linear import Linear
from peerd.model.moe import SparseMoE

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "attention_mask",
    "inverse_frequencies",
]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain and no bias (parameter ``weight``).

    Statistics are taken in float32 whatever the input dtype. Llama casts back before the gain is
    applied; Gemma (``gemma=True``) scales by ``1 + weight`` in float32 and casts after. Each is
    what its reference does, which keeps bfloat16 outputs bit-compatible with it.
    """

    def __init__(self, dim: int, eps: float, *, gemma: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def inverse_frequencies(config: ModelConfig, *, local: bool = False) -> Tensor:
    """RoPE angular frequencies, float32 ``[head_dim // 2]``, after the config's scaling rule.

    ``local=True``: the frequencies of sliding-window blocks where the config gives them their own
    base (Gemma 3's ``local_rope_theta``, plain RoPE).
    """
    dim = config.head_dim
    # An explicit CPU device: stages are often built under `with torch.device("meta")`.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim  # [head_dim // 2]
    if local and config.local_rope_theta is not None:
        return 1.0 / (config.local_rope_theta**exponents)  # type: ignore[no-any-return]
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3 (the rule Meta released with Llama 3.1): wavelengths longer than the
    # original context / low_freq_factor are slowed by `factor`, those shorter than
    # original / high_freq_factor are kept, and the band between is interpolated linearly
    # in original_context / wavelength, so nearby tokens keep their fine resolution.
    wavelength = 2 * math.pi / inv_freq
    original = scaling.original_max_position_embeddings
    low_freq_wavelength = original / scaling.low_freq_factor
    high_freq_wavelength = original / scaling.high_freq_factor
    smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables of rotary position embeddings for integer positions, shared by all blocks of a stage.

    :meth:`compute` is the pure function (any positions). :meth:`cos_sin`
    returns slices of a table kept per (device, dtype) and grown by doubling,
    so a decode step costs a view, not a trigonometric evaluation. Tables are
    built outside inference mode: an inference tensor saved for backward in a
    later differentiable forward would raise.
    """

    def __init__(self, config: ModelConfig, *, local: bool = False) -> None:
        self.head_dim = config.head_dim
        self.inv_freq = inverse_frequencies(config, local=local)  # [head_dim // 2], float32 on CPU
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def compute(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin, float32 ``[*positions.shape, head_dim]``, for integer ``positions``."""
        inv_freq = self.inv_freq.to(positions.device)
        # float32 angles, like the reference: positions times frequencies, then both halves
        # of the head share a frequency (the rotate-half pairing used by HF checkpoints).
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., head_dim // 2]
        angles = torch.cat((angles, angles), dim=-1)  # [..., head_dim]
        return angles.cos(), angles.sin()

    def cos_sin(self, position: int, n: int, *, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin ``[n, head_dim]`` in ``dtype`` for positions ``position .. position + n - 1``."""
        needed = position + n
        key = (device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < needed:
            length = max(256, 1 << (needed - 1).bit_length())
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self.compute(torch.arange(length, device=device))
                table = (cos.to(dtype), sin.to(dtype))
            self._tables[key] = table
        cos, sin = table
        return cos[position:needed], sin[position:needed]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [batch, heads, n, head_dim]`` by per-position angles ``cos``/``sin [n, head_dim]``.

    Uses the rotate-half pairing (dimension i with i + head_dim/2), the layout
    in which Hugging Face stores Llama q/k weights.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [batch, heads, n, head_dim]
    return x * cos + rotated * sin


def attention_mask(
    n: int, key_length: int, groups: int, device: torch.device, window: int | None = None
) -> Tensor | None:
    """Boolean mask ``[groups * n, key_length]`` (True = may attend) for n new tokens at the end of the keys.

    Query t (absolute position key_length - n + t) sees keys 0 .. key_length - n + t, and with a
    sliding ``window`` only the last ``window`` of those (itself included), as transformers masks
    sliding blocks. Rows repeat per query head of a group, matching :class:`Attention`'s grouped
    layout. One new token that sees every key needs no mask (None).
    """
    if n == 1 and (window is None or key_length <= window):
        return None
    query_positions = torch.arange(key_length - n, key_length, device=device)  # [n]
    key_positions = torch.arange(key_length, device=device)[None, :]  # [1, key_length]
    allowed = key_positions <= query_positions[:, None]  # [n, key_length]
    if window is not None:
        allowed &= key_positions > query_positions[:, None] - window
    return allowed.repeat(groups, 1)  # [groups * n, key_length]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE that writes to and reads from a caller-owned KV cache.

    ``forward(x, cos, sin, mask, cache_keys, cache_values, position)``: without
    cache views, keys are the n new tokens; with them, the new keys/values are
    written at ``[position, position + n)`` and attention covers
    ``[0, position + n)``. Query heads are grouped by the key/value head they
    share, so grouped-query attention never copies or repeats the cache.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = Linear(hidden, q_width, bias=config.qkv_bias)
        self.k_proj = Linear(hidden, kv_width, bias=config.qkv_bias)
        self.v_proj = Linear(hidden, kv_width, bias=config.qkv_bias)
        self.o_proj = Linear(q_width, hidden, bias=config.o_bias)
        self.scale = config.attention_scale  # None: SDPA's default, head_dim ** -0.5
        # set for blocks whose every product is row-invariant (quant.py): see ROW_WISE_MAX_TOKENS
        self.one_token_at_a_time = False
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, gemma=config.gemma_norms)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, gemma=config.gemma_norms)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        position: int = 0,
    ) -> Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, cos, sin, mask, cache_keys, cache_values, position))  # type: ignore[no-any-return]

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        position: int = 0,
    ) -> Tensor:
        """Attention of projected ``q [batch, n, heads * dim]``, ``k``/``v [batch, n, kv_heads * dim]``,
        before the output projection: ``[batch, n, heads * dim]``. Batched steps of several sessions
        project all their tokens together and call this once per session, each with its own cache."""
        batch, n, _ = q.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = q.view(batch, n, heads, dim).transpose(1, 2)  # [batch, heads, n, dim]
        k = k.view(batch, n, kv_heads, dim).transpose(1, 2)  # [batch, kv_heads, n, dim]
        v = v.view(batch, n, kv_heads, dim).transpose(1, 2)  # [batch, kv_heads, n, dim]
        if hasattr(self, "q_norm"):  # per head, before RoPE (Qwen3, Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        return self.attend_rotated(q, k, v, mask, cache_keys, cache_values, position)

    def attend_rotated(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        position: int = 0,
    ) -> Tensor:
        """:meth:`attend` after its per-head norms and RoPE: ``q [batch, heads, n, dim]``, ``k``/``v
        [batch, kv_heads, n, dim]`` in, ``[batch, n, heads * dim]`` out (batched steps rotate all
        their rows at once, then attend per session)."""
        batch, heads, n, dim = q.shape
        kv_heads = self.num_kv_heads
        groups = heads // kv_heads
        if cache_keys is not None and cache_values is not None and self.one_token_at_a_time and _row_wise(q):
            return self._attend_rows(q, k, v, mask, cache_keys, cache_values, position)
        if cache_keys is not None and cache_values is not None:
            cache_keys[:, :, position : position + n] = k
            cache_values[:, :, position : position + n] = v
            k = cache_keys[:, :, : position + n]  # [batch, kv_heads, position + n, dim], a view
            v = cache_values[:, :, : position + n]  # [batch, kv_heads, position + n, dim], a view
        # Query head h uses kv head h // groups: put a kv head's queries side by side so
        # SDPA sees ordinary multi-head attention over kv_heads heads.
        q = q.reshape(batch, kv_heads, groups * n, dim)  # [batch, kv_heads, groups * n, dim]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale
        )  # [batch, kv_heads, groups * n, dim]
        # reshape, not view: CUDA kernels may return another memory layout than the CPU one.
        out = out.reshape(batch, heads, n, dim).transpose(1, 2)  # [batch, n, heads, dim]
        return out.reshape(batch, n, heads * dim)  # [batch, n, heads * dim]

    def _attend_rows(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        cache_keys: Tensor,
        cache_values: Tensor,
        position: int,
    ) -> Tensor:
        """:meth:`attend_rotated` of ``n`` new tokens computed as ``n`` one-token steps would (see
        :func:`_row_wise`): :meth:`attend_one` per token, on the same cache prefix."""
        n = q.shape[2]
        cache_keys[:, :, position : position + n] = k
        cache_values[:, :, position : position + n] = v
        rows = []
        for t in range(n):
            keys = position + t + 1
            row_mask = None
            if mask is not None:  # rows t, n + t, 2n + t ...: token t's, one per query head of a group
                row_mask = mask[t::n, :keys]  # [groups, keys]
                row_mask = None if bool(row_mask.all()) else row_mask  # as a one-token step builds it
            rows.append(self.attend_one(q[:, :, t], cache_keys, cache_values, keys, row_mask))
        return torch.stack(rows, dim=1)  # [batch, n, heads * dim]

    def attend_one(
        self, q: Tensor, cache_keys: Tensor, cache_values: Tensor, keys: int, mask: Tensor | None = None
    ) -> Tensor:
        """Attention of one new token per sequence, rotated queries ``q [batch, heads, dim]``, over the
        first ``keys`` positions of the cache (its own key and value written there already):
        ``[batch, heads * dim]``. With one token the query heads of a group are already side by side,
        so no transposes; a batched decode step (batching.py) and a step attended one token at a
        time make this same call."""
        batch = q.shape[0]
        out = F.scaled_dot_product_attention(
            q.reshape(batch, self.num_kv_heads, -1, self.head_dim),  # [batch, kv_heads, groups, dim]
            cache_keys[:, :, :keys],
            cache_values[:, :, :keys],
            attn_mask=mask,
            scale=self.scale,
        )  # [batch, kv_heads, groups, dim]
        return out.reshape(batch, -1)


# Up to this many new tokens, a step of a block whose products are all row-invariant (torch's int4
# and int8 CPU kernels in bfloat16; quant.py sets ``Attention.one_token_at_a_time``) attends one token
# at a time. Everything else in such a block computes each token's row the same whichever rows come
# with it, but attention over several new tokens runs one masked kernel call, whose rounding differs
# from a one-token step's now and then (1 ulp of bfloat16). A speculative step verifying k guessed
# tokens must compute what k + 1 plain steps would, or a greedy generation can take another token
# where two logits are within that rounding (measured with int4 peers in bfloat16: token 35 of 48).
# Verification steps carry at most 17 tokens; 10 int4 blocks took 14.0 ms for such a step this way
# against 10.7 ms in one call (the dev box, one thread). float32 blocks and dense bfloat16 ones are
# not row-invariant anyway (their products round by row count), nor are GPUs': they keep one call.
ROW_WISE_MAX_TOKENS = 32


def _row_wise(q: Tensor) -> bool:
    """Whether a step with queries ``q [batch, heads, n, dim]`` attends one token at a time (when its
    block allows it)."""
    return 1 < q.shape[2] <= ROW_WISE_MAX_TOKENS and q.device.type == "cpu" and q.dtype != torch.float32


def activation(name: str, x: Tensor) -> Tensor:
    """The MLP gate's nonlinearity: SiLU (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU)."""
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, act = SiLU (SwiGLU) or GELU-tanh (GeGLU)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.act = config.hidden_act
        self.gate_proj = Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(activation(self.act, self.gate_proj(x)) * self.up_proj(x))  # type: ignore[no-any-return]


class Block(nn.Module):
    """Pre-norm decoder block ``layer_index``: ``x + attn(norm(x))`` then ``+ mlp(norm(.))``.

    Gemma adds a norm after each sublayer (``x + norm(attn(norm(x)))``, the same around the MLP);
    Mixtral's and Qwen3-MoE's MLP is a routed mixture of experts (named ``block_sparse_moe`` and ``mlp``
    as their checkpoints do).

    Maps ``x [batch, n, hidden_size]`` to the same shape. ``cos``/``sin`` come
    from the stage's shared :class:`RotaryEmbedding`, ``mask`` from
    :func:`attention_mask`; cache views are this block's slice of a stage
    ``KVCache``.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        hidden, eps, gemma = config.hidden_size, config.rms_norm_eps, config.gemma_norms
        self.sandwich = gemma
        self.input_layernorm = RMSNorm(hidden, eps, gemma=gemma)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(hidden, eps, gemma=gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, gemma=True)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, gemma=True)
        # the checkpoint's name for the feed-forward part: a dense MLP, or the experts (Mixtral's own name)
        moe = config.is_moe(layer_index)
        self.feed_forward_name = "block_sparse_moe" if moe and config.model_type == "mixtral" else "mlp"
        self.add_module(self.feed_forward_name, SparseMoE(config) if moe else MLP(config))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        position: int = 0,
    ) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_keys, cache_values, position)
        feed_forward = getattr(self, self.feed_forward_name)
        if not self.sandwich:
            x = x + attn
            return x + feed_forward(self.post_attention_layernorm(x))  # type: ignore[no-any-return]
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(feed_forward(self.pre_feedforward_layernorm(x)))  # type: ignore[no-any-return]
