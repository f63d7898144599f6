"""4-bit linear weights in groups of 32 with a float16 scale and minimum each (``--quant int4``).

Each run of ``INT4_GROUP`` weights along a row (the input dimension) is stored as 4-bit codes
``q`` in 0..15 and two float16 numbers, so that ``w = q * scale + minimum``: 4 bits per weight plus
32 bits per group, 5.0 bits per weight in all. This is the layout of GGUF's Q4_1 (the format the
shipped SmolLM2 checkpoint comes in), so a checkpoint converted from Q4_1 is stored again without
any loss, where re-quantising it to nf4 adds a second rounding on a different grid (+20% perplexity,
docs/decisions.md section 9). On weights that were never quantised it errs less than nf4 with
blocks of 64 (measured in the same place), at 0.9 more bits per weight.

bitsandbytes has no grouped format with a minimum (zero point), and torchao's int4 has no CPU
layout in the version we measured, so the layer is plain torch: it unpacks its codes for every
matmul (on the CPU and on CUDA alike) and keeps everything as buffers, so gradients reach the
input (backward RPCs) and never the frozen weights. Quantising runs on the CPU in float32 and is
deterministic: two peers quantising the same checkpoint hold the same codes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional

from peerd.model.linear import linear

__all__ = ["INT4_BITS_PER_WEIGHT", "INT4_GROUP", "Int4Linear", "dequantize_int4", "quantize_int4"]

INT4_GROUP = 32  # weights per scale and minimum (GGUF Q4_1's block)
INT4_BITS_PER_WEIGHT = 4 + 2 * 16 / INT4_GROUP  # codes, float16 scale and minimum: 5.0
# byte -> (low code, high code) as floats: one gather unpacks and converts two codes at once
_PAIRS = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="xy"), dim=-1).reshape(256, 2)


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes [out, in/2] uint8, scales [out, in/32] float16, minimums [out, in/32] float16).

    ``weight`` is [out, in] with ``in`` a multiple of ``INT4_GROUP``. The scale and minimum are
    rounded to float16 *before* the codes are chosen, so the codes fit the numbers actually stored;
    weights already on such a grid (a Q4_1 checkpoint) come back exactly.
    """
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP:
        raise ValueError(f"int4 needs linear inputs in multiples of {INT4_GROUP}, got {in_features}")
    groups = weight.detach().to("cpu", torch.float32).reshape(out_features, -1, INT4_GROUP)  # [out, g, 32]
    minimum = groups.amin(-1, keepdim=True).half().float()  # [out, g, 1]
    scale = ((groups.amax(-1, keepdim=True) - minimum) / 15).half().float()  # [out, g, 1]
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # a constant group: all codes 0
    codes = torch.clamp(torch.round((groups - minimum) * inverse), 0, 15).to(torch.uint8)  # [out, g, 32]
    codes = codes.reshape(out_features, in_features)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [out, in/2]: even inputs low nibble, odd high
    return packed.contiguous(), scale[..., 0].half(), minimum[..., 0].half()


def dequantize_int4(packed: Tensor, scale: Tensor, minimum: Tensor, dtype: torch.dtype) -> Tensor:
    """The [out, in] weight in ``dtype`` (computed in float32 for float32, else in float16)."""
    out_features = packed.shape[0]
    work = torch.float32 if dtype == torch.float32 else torch.float16
    pairs = _PAIRS.to(packed.device, work)
    codes = functional.embedding(packed.int(), pairs)  # [out, in/2, 2]: low nibble first
    codes = codes.reshape(out_features, scale.shape[1], INT4_GROUP)  # [out, g, 32]
    # q * scale + minimum; q * scale is exact (4-bit times 11-bit mantissa), so fusing rounds nothing
    weight = torch.addcmul(minimum.to(work)[..., None], codes, scale.to(work)[..., None])  # [out, g, 32]
    return weight.reshape(out_features, -1).to(dtype)  # [out, in]


class Int4Linear(nn.Module):
    """A frozen linear layer whose weight is held as int4 codes with per-group scale and minimum.

    Built from an ``nn.Linear`` by :meth:`from_linear`; computes ``x @ W.T + b`` in ``x``'s dtype.
    """

    packed: Tensor
    scale: Tensor
    minimum: Tensor
    bias: Tensor | None

    def __init__(self, packed: Tensor, scale: Tensor, minimum: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = packed.shape[1] * 2
        self.out_features = packed.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        """Quantise ``linear``'s weight (its bias stays in its dtype); the result is on the CPU."""
        bias = None if linear.bias is None else linear.bias.detach().to("cpu").clone()
        return cls(*quantize_int4(linear.weight), bias)

    def forward(self, x: Tensor) -> Tensor:
        weight = dequantize_int4(self.packed, self.scale, self.minimum, x.dtype)  # [out, in]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={INT4_GROUP}"
