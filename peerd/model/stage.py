"""A pipeline stage: a contiguous run of transformer blocks [start, end) and its KV cache.

This is what a server hosts. Its parameter names are the checkpoint names
without the leading ``model.`` (``layers.{i}.self_attn.q_proj.weight`` with the
absolute block index i), so a loader maps names by adding a prefix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peerd.model import quant as quant_module
from peerd.model.config import ModelConfig
from peerd.model.llama import Block, RotaryEmbedding, attention_mask

__all__ = ["KVCache", "Stage", "cache_bytes_per_token"]


@dataclass
class KVCache:
    """Keys and values of every block of one stage for a batch of sequences, preallocated to ``max_length``.

    ``keys`` and ``values`` are ``[num_blocks, batch, num_kv_heads, max_length,
    head_dim]``; the block axis counts from the stage's first block.
    ``length`` counts the valid positions ``[0, length)``: :meth:`Stage.forward`
    sets it to ``position + n`` after writing and refuses a position beyond it,
    which would attend to never-written entries. It is one count for the whole
    cache, so a session should keep to one block range.
    """

    keys: Tensor  # [num_blocks, batch, num_kv_heads, max_length, head_dim]
    values: Tensor  # same shape as keys
    length: int = 0  # positions [0, length) hold keys/values of the current sequences

    def __post_init__(self) -> None:
        if self.keys.dim() != 5 or self.keys.shape != self.values.shape:
            raise ValueError(
                f"KVCache keys/values must both be [num_blocks, batch, kv_heads, max_length, head_dim], "
                f"got {tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )

    @property
    def num_blocks(self) -> int:
        """Blocks covered (the stage's end - start)."""
        return int(self.keys.shape[0])

    @property
    def batch_size(self) -> int:
        """Sequences held side by side."""
        return int(self.keys.shape[1])

    @property
    def max_length(self) -> int:
        """Tokens each sequence can hold (positions 0 .. max_length - 1)."""
        return int(self.keys.shape[3])

    @property
    def size_bytes(self) -> int:
        """Memory held by keys and values together."""
        return 2 * self.keys.numel() * self.keys.element_size()


def cache_bytes_per_token(config: ModelConfig, num_blocks: int, dtype: torch.dtype) -> int:
    """Cache bytes one token of one sequence costs across ``num_blocks`` blocks (keys and values).

    A cache for ``batch`` sequences of ``max_length`` tokens costs exactly
    ``batch * max_length * cache_bytes_per_token(...)``; servers charge sessions
    against their memory budget with it.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_blocks * config.num_kv_heads * config.head_dim * itemsize


class Stage(nn.Module):
    """Blocks ``[start, end)`` of a model: hidden states in, hidden states out, with an optional KV cache.

    Build one with :meth:`random` or ``peerd.model.loading.load_stage``; calling
    the constructor directly allocates randomly initialised float32 weights on
    the current default device. Weights are frozen (``requires_grad=False``):
    servers never train them, yet :meth:`forward` without a cache stays
    differentiable with respect to its input hidden states (for backward RPCs).
    """

    def __init__(self, config: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"stage blocks [{start}, {end}) must be a non-empty part of [0, {config.num_layers})")
        self.config = config
        self.start = start
        self.end = end
        # Keys are absolute block indices, so state-dict names are the checkpoint's minus "model.".
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(start, end)})
        self.quant = "none"  # how linear weights are stored: "none" (the dtype), "int8", "nf4" or "int4" (quant.py)
        self.rotary = RotaryEmbedding(config)
        # Gemma 3's sliding blocks rotate with their own base; other families share one table
        self.local_rotary = RotaryEmbedding(config, local=True) if config.local_rope_theta is not None else None
        self.requires_grad_(False)

    @classmethod
    def random(
        cls,
        config: ModelConfig,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        std: float = 0.02,
        quant: str = "none",
    ) -> Stage:
        """A stage with reproducible random weights (normal(0, std) matrices and biases, unit norms).

        ``quant`` stores its linear weights quantised as a peer with ``--quant`` would.
        """
        generator = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            stage = cls(config, start, end)
        state = {}
        for name, param in stage.state_dict().items():
            if name.endswith("norm.weight"):
                value = torch.zeros(param.shape) if config.gemma_norms else torch.ones(param.shape)
            else:
                value = torch.randn(param.shape, generator=generator) * std
            state[name] = value.to(device=device, dtype=dtype)
        stage.load_state_dict(state, assign=True)
        for block in stage.layers.values():
            quant_module.quantize_linears(block, quant, device)
        stage.quant = quant
        return stage.requires_grad_(False).eval()

    @property
    def dtype(self) -> torch.dtype:
        """dtype it computes in: of the cache it allocates and of the hidden states it accepts.

        The norms' weights tell, since quantized linear weights are stored as integers.
        """
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        """Device of the weights, of the cache it allocates and of the hidden states it accepts."""
        return next(self.parameters()).device

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (quantised ones with their scales), measured once: weights never change."""
        return quant_module.weight_bytes(self)

    @property
    def num_blocks(self) -> int:
        """Blocks hosted (end - start)."""
        return self.end - self.start

    def allocate_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A zeroed cache for ``batch_size`` sequences of up to ``max_length`` tokens, on the stage device."""
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"cache batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self._check_window(max_length)
        c = self.config
        shape = (self.num_blocks, batch_size, c.num_kv_heads, max_length, c.head_dim)
        # Normal tensors even when called under inference_mode, so that the cache can be
        # written in place both inside and outside inference mode (an inference tensor can't).
        with torch.inference_mode(False):
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        return KVCache(keys, values)

    def grow_cache(self, cache: KVCache, max_length: int) -> KVCache:
        """``cache`` with room for ``max_length`` tokens per sequence, its valid positions kept.

        Servers allocate a session's cache in chunks as the session grows instead of for its whole
        announced length up front, so a session holds the memory it used, not what it asked for.
        """
        if max_length <= cache.max_length:
            return cache
        grown = self.allocate_cache(cache.batch_size, max_length)
        n = cache.length
        with torch.inference_mode(False):
            grown.keys[:, :, :, :n] = cache.keys[:, :, :, :n]  # [blocks, batch, kv_heads, n, head_dim]
            grown.values[:, :, :, :n] = cache.values[:, :, :, :n]
        grown.length = n
        return grown

    def forward(
        self,
        hidden: Tensor,
        cache: KVCache | None = None,
        position: int = 0,
        start: int | None = None,
        end: int | None = None,
    ) -> Tensor:
        """Run blocks ``[start, end)`` (default: all hosted) on ``hidden [batch, n, hidden_size]``.

        The n tokens sit at positions ``position .. position + n - 1``. Without a
        cache, they attend causally among themselves only (a stateless forward,
        differentiable w.r.t. ``hidden``). With a cache, their keys and values
        are written at ``[position, position + n)`` and they attend causally to
        cache entries ``[0, position + n)``; a position below ``cache.length``
        rewinds the sequence, one above it is refused. The cached path runs
        without autograd.
        ``start``/``end`` are absolute block indices within the hosted range;
        the cache always spans the whole stage. Raises ``ValueError`` on a
        wrong shape, dtype, device, range, or a cache too short.
        """
        start, end = self.check_step(hidden, cache, position, start, end)
        if cache is None:
            return self._run(hidden, None, position, start, end, key_length=hidden.shape[1])
        n = hidden.shape[1]
        # Writing graph-tracked tensors into the cache would keep every step's graph alive.
        with torch.no_grad():
            out = self._run(hidden, cache, position, start, end, key_length=position + n)
        cache.length = position + n
        return out

    def check_step(
        self, hidden: Tensor, cache: KVCache | None, position: int, start: int | None, end: int | None
    ) -> tuple[int, int]:
        """The checks of :meth:`forward` (``ValueError`` on failure); the block range, defaults filled in."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are not a non-empty part of hosted [{self.start}, {self.end})")
        if hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden states must be [batch, n_tokens, {self.config.hidden_size}], got {tuple(hidden.shape)}"
            )
        if hidden.dtype != self.dtype or hidden.device != self.device:
            raise ValueError(
                f"hidden states are {hidden.dtype} on {hidden.device}, stage expects {self.dtype} on {self.device}"
            )
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        batch, n, _ = hidden.shape
        if n == 0:
            raise ValueError("hidden states hold no tokens")
        self._check_window(position + n)
        if cache is None:
            return start, end
        expected = (self.num_blocks, batch, self.config.num_kv_heads, cache.max_length, self.config.head_dim)
        if tuple(cache.keys.shape) != expected:
            raise ValueError(f"cache has shape {tuple(cache.keys.shape)}, expected {expected} for this stage")
        if cache.keys.dtype != self.dtype or cache.keys.device != self.device:
            raise ValueError(f"cache is {cache.keys.dtype} on {cache.keys.device}, stage is {self.dtype}")
        if position + n > cache.max_length:
            raise ValueError(f"tokens [{position}, {position + n}) do not fit a cache of max_length {cache.max_length}")
        if position > cache.length:
            raise ValueError(f"position {position} would leave a gap: the cache holds {cache.length} tokens")
        return start, end

    def _run(
        self, hidden: Tensor, cache: KVCache | None, position: int, start: int, end: int, key_length: int
    ) -> Tensor:
        n, config, device = hidden.shape[1], self.config, hidden.device
        groups = config.num_queries_per_kv
        # Built once per call and shared by all blocks of a kind (full or sliding): the tables are
        # cached, a one-token step needs no mask, and a mask is small next to the block compute.
        full = (*self.rotary.cos_sin(position, n, dtype=hidden.dtype, device=device),
                attention_mask(n, key_length, groups, device))  # fmt: skip
        sliding = full
        if any(config.is_sliding(i) for i in range(start, end)):
            rotary = self.local_rotary or self.rotary
            sliding = (*rotary.cos_sin(position, n, dtype=hidden.dtype, device=device),
                       attention_mask(n, key_length, groups, device, config.sliding_window))  # fmt: skip
        for index in range(start, end):
            block = self.layers[str(index)]
            cos, sin, mask = sliding if config.is_sliding(index) else full
            if cache is None:
                hidden = block(hidden, cos, sin, mask)
            else:
                slot = index - self.start
                hidden = block(hidden, cos, sin, mask, cache.keys[slot], cache.values[slot], position)
        return hidden

    def _check_window(self, length: int) -> None:
        window = self.config.sliding_window
        # families with layer_types mask their sliding blocks exactly; the older ones are exact
        # only within the window
        if window is not None and not self.config.layer_types and length > window:
            raise ValueError(
                f"{length} tokens exceed the model's sliding window of {window}; "
                "sliding-window attention beyond the window is not implemented"
            )
