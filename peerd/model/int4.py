"""4-bit linear weights in groups of 32 with a float16 scale and minimum each (``--quant int4``).

Each run of ``INT4_GROUP`` weights along a row (the input dimension) is stored as 4-bit codes
``q`` in 0..15 and two float16 numbers, so that ``w = q * scale + minimum``: 4 bits per weight plus
32 bits per group, 5.0 bits per weight in all. This is the layout of GGUF's Q4_1 (the format the
shipped SmolLM2 checkpoint comes in), so a checkpoint converted from Q4_1 is stored again without
any loss, where re-quantising it to nf4 adds a second rounding on a different grid (+20% perplexity,
docs/decisions.md section 9). On weights that were never quantised it errs less than nf4 with
blocks of 64 (measured in the same place), at 0.9 more bits per weight.

bitsandbytes has no grouped format with a minimum (zero point), and torchao's int4 has no CPU
layout in the version we measured, so :class:`Int4Linear` is plain torch: it unpacks its codes for
every matmul (on the CPU and on CUDA alike) and keeps everything as buffers, so gradients reach the
input (backward RPCs) and never the frozen weights. Quantising runs on the CPU in float32 and is
deterministic: two peers quantising the same checkpoint hold the same codes.

Blocks computing in bfloat16 on the CPU hold the same codes in the layout of torch's packed int4
kernel instead (:class:`Int4CpuLinear`), which multiplies without unpacking: 10 SmolLM2 blocks'
decode step took 2.9 ms there against 83 ms unpacking in bfloat16, 53 ms unpacking in float32 and
8.1 ms with float32 weights (one thread, dev box). float32 blocks keep :class:`Int4Linear`, exact.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional

from peerd.model.linear import linear

__all__ = [
    "INT4_BITS_PER_WEIGHT",
    "INT4_GROUP",
    "Int4CpuLinear",
    "Int4Linear",
    "cpu_kernel_fits",
    "dequantize_int4",
    "quantize_int4",
]

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


# torch's packed int4 product on the CPU (``x [m, in]`` bfloat16 by codes in its own layout, with a
# bfloat16 scale and zero per group and output row). With bfloat16 inputs it is vectorised: on the
# dev box (AVX512-BF16, one thread) a [1536 x 576] product of one row took 26 us against 1,415 us for
# dequantise-then-multiply and 53 us for the float32 dense product. With float32 or float16 inputs
# the same op is ~50x slower (not vectorised in this build), so only bfloat16 inputs use it.
_CPU_KERNEL = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_CPU_PACK = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
_CPU_ROWS = 64  # output rows the kernel takes in multiples of (its AVX512 layout packs blocks of 64)


def cpu_kernel_fits(out_features: int, in_features: int) -> bool:
    """Whether torch's packed int4 CPU kernel exists in this build and takes a layer of this shape."""
    fits = out_features % _CPU_ROWS == 0 and in_features % INT4_GROUP == 0
    return _CPU_KERNEL is not None and _CPU_PACK is not None and fits


def _codes(packed: Tensor) -> Tensor:
    """Codes ``[out, in]`` uint8 of this module's row layout (``quantize_int4``'s ``packed``)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _codes_from_cpu_layout(packed: Tensor) -> Tensor:
    """Codes ``[out, in]`` uint8 from the CPU kernel's layout (:func:`_cpu_layout`)."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1)
    return nibbles.index_select(0, _cpu_layout(out_features, in_features)).reshape(out_features, in_features)


@functools.lru_cache(maxsize=8)  # a model has a handful of layer shapes
def _cpu_layout(out_features: int, in_features: int) -> Tensor:
    """For each code of an ``[out, in]`` layer in row order, where the CPU kernel's packing puts it
    (an index into the packed bytes' nibbles, low nibble first), as int32.

    The layout depends on the instructions torch's kernel was built for (with AVX512: output rows in
    blocks of 64, byte j of an input column holding rows j and 32 + j; with AVX2 another one), so it
    is read off the packing itself: codes that spell each weight's index in base 16, one digit per
    packing, tell where every weight went."""
    assert _CPU_PACK is not None  # only layers made by Int4CpuLinear.from_linear get here
    count = out_features * in_features
    ids = torch.arange(count, dtype=torch.int64).reshape(out_features, in_features)
    at = torch.zeros(count, dtype=torch.int64)  # nibble position -> the index of the weight it holds
    for shift in range(0, max(count - 1, 1).bit_length(), 4):
        packed = _CPU_PACK(((ids >> shift) & 15).int(), 1)
        if packed.numel() * 2 != count:
            raise RuntimeError(f"torch's int4 CPU packing gave {packed.numel()} bytes for {count} codes")
        at += torch.stack((packed & 15, packed >> 4), dim=-1).reshape(-1).long() << shift
    where = torch.empty(count, dtype=torch.int64)
    where[at] = torch.arange(count)
    if not torch.equal(at[where], torch.arange(count)):  # every nibble holds a different weight
        raise RuntimeError("torch's int4 CPU packing is not a permutation of the codes")
    return where.int()


class Int4CpuLinear(nn.Module):
    """An int4 layer computing in bfloat16 on the CPU with torch's packed int4 kernel.

    The same codes as :class:`Int4Linear` (``quantize_int4``: groups of 32, the scale and minimum
    rounded to float16 first), stored in the kernel's layout, with a bfloat16 scale and zero per
    group: ``w = (q - 8) * scale + zero``, ``zero = minimum + 8 * scale``. Rounding the two to
    bfloat16 moves a weight by at most ~1/30 of its group's step, against the half step of the 4-bit
    rounding itself; its outputs are bfloat16 ones. 5.0 bits per weight, as ``Int4Linear``.

    Inputs that are not bfloat16 on the CPU, and any that need a gradient (backward RPCs), take the
    dequantised weight of those same numbers through an ordinary product (slow, but the same layer).
    """

    packed: Tensor
    scales_zeros: Tensor
    bias: Tensor | None

    def __init__(self, packed: Tensor, scales_zeros: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features = packed.shape[1] * 2
        self.out_features = packed.shape[0]
        self.register_buffer("packed", packed)  # [out, in/2] uint8, the kernel's layout
        self.register_buffer("scales_zeros", scales_zeros)  # [in/32, out, 2] bfloat16
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4CpuLinear:
        """Quantise ``linear``'s weight as ``Int4Linear.from_linear`` does; the result is on the CPU."""
        if _CPU_PACK is None or not cpu_kernel_fits(linear.out_features, linear.in_features):
            raise ValueError(
                f"torch's int4 CPU kernel does not take a [{linear.out_features} x {linear.in_features}] layer"
            )
        packed, scale, minimum = quantize_int4(linear.weight)
        cpu_packed = _CPU_PACK(_codes(packed).int(), 1)  # [out, in/2] uint8
        scale32 = scale.float()
        scales_zeros = torch.stack((scale32, minimum.float() + 8 * scale32), dim=-1)  # [out, g, 2]
        scales_zeros = scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)  # [g, out, 2]
        bias = None if linear.bias is None else linear.bias.detach().to("cpu").clone()
        return cls(cpu_packed, scales_zeros, bias)

    def weight(self, dtype: torch.dtype) -> Tensor:
        """The ``[out, in]`` weight the kernel computes with, in ``dtype``."""
        codes = _codes_from_cpu_layout(self.packed).float() - 8  # [out, in]
        scales_zeros = self.scales_zeros.float().transpose(0, 1)  # [out, g, 2]
        grouped = codes.reshape(self.out_features, -1, INT4_GROUP)  # [out, g, 32]
        weight = torch.addcmul(scales_zeros[..., 1:], grouped, scales_zeros[..., :1])  # [out, g, 32]
        return weight.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        kernel = x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.packed.device.type == "cpu"
        if _CPU_KERNEL is None or not kernel or (torch.is_grad_enabled() and x.requires_grad):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return linear(x, self.weight(x.dtype).to(x.device), bias)
        flat = x.reshape(-1, self.in_features).contiguous()  # the kernel takes dense rows only
        rows: Tensor = _CPU_KERNEL(flat, self.packed, INT4_GROUP, self.scales_zeros)
        out = rows.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={INT4_GROUP}, cpu kernel"
