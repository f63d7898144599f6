"""int4 weights (groups of 32, float16 scale and minimum): exact on Q4_1 checkpoints, bounded elsewhere.

The shipped SmolLM2 is a GGUF Q4_1 checkpoint, so the claim behind ``--quant int4``'s quality is that
weights gguf's own Q4_1 quantizer produced come back bit for bit; on weights off that grid it must
err less than nf4 (bitsandbytes, blocks of 64) does, and it must compute what its dequantised weight
says, in float32 and in half precision, with gradients reaching the input.
"""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from torch import nn

from peerd.model import int4
from peerd.model.int4 import (
    INT4_BITS_PER_WEIGHT,
    Int4CpuLinear,
    Int4Linear,
    cpu_kernel_fits,
    dequantize_int4,
    quantize_int4,
)
from peerd.model.quant import BITS_PER_WEIGHT, quantize_linears, weight_bytes


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_a_q4_1_tensor_comes_back_exactly() -> None:
    x = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.05
    on_grid = quants.dequantize(quants.quantize(x, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    weight = torch.from_numpy(np.ascontiguousarray(on_grid)).float()
    assert not torch.equal(weight, torch.from_numpy(x))  # gguf really rounded it
    packed, scale, minimum = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)
    assert scale.dtype == minimum.dtype == torch.float16 and scale.shape == (48, 8)
    assert torch.equal(dequantize_int4(packed, scale, minimum, torch.float32), weight)


def test_off_the_grid_it_errs_less_than_nf4() -> None:
    weight = torch.randn(384, 576, generator=torch.Generator().manual_seed(1)) * 0.02
    int4 = dequantize_int4(*quantize_int4(weight), torch.float32)
    q, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    nf4 = bnb_functional.dequantize_4bit(q, state)
    assert 0.05 < _relative_error(int4, weight) < _relative_error(nf4, weight) < 0.12


def test_codes_cover_the_group_and_constant_groups_are_exact() -> None:
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    weight[1, :32] = 0.25  # a constant group: scale 0, every code 0, the minimum is the value
    packed, scale, minimum = quantize_int4(weight)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(4, 2, 32)
    assert codes.amax(-1)[0].tolist() == [15, 15] and codes.amin(-1)[0].tolist() == [0, 0]
    out = dequantize_int4(packed, scale, minimum, torch.float32)
    assert torch.equal(out[1, :32], torch.full((32,), 0.25)) and float(scale[1, 0]) == 0.0
    # every weight within half a step of its group's scale (plus the float16 rounding of the ends)
    step = scale.float().repeat_interleave(32, dim=1)
    assert bool(((out - weight).abs() <= step / 2 + 1e-3 * weight.abs().amax()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_layer_computes_with_its_dequantised_weight_and_passes_gradients(dtype: torch.dtype) -> None:
    linear = nn.Linear(96, 40, bias=True)
    layer = Int4Linear.from_linear(linear)
    weight = dequantize_int4(layer.packed, layer.scale, layer.minimum, torch.float32)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 5, 40)
    want = nn.functional.linear(x.detach().float(), weight, linear.bias.detach())
    assert _relative_error(out.detach(), want) < (1e-6 if dtype == torch.float32 else 2e-2)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    assert grad.shape == x.shape and bool(grad.abs().sum() > 0)
    assert not list(layer.parameters())  # frozen: everything is a buffer


def test_quantize_linears_int4_size_and_bad_shapes() -> None:
    holder = nn.Module()
    holder.proj = nn.Linear(1536, 576, bias=False)
    before = weight_bytes(holder)
    quantize_linears(holder, "int4", "cpu")
    assert isinstance(holder.proj, Int4Linear)
    assert weight_bytes(holder) * 8 == pytest.approx(576 * 1536 * INT4_BITS_PER_WEIGHT)
    assert weight_bytes(holder) / before == pytest.approx(BITS_PER_WEIGHT["int4"] / 32)
    odd = nn.Module()
    odd.proj = nn.Linear(48, 4)
    with pytest.raises(ValueError, match="int4 needs linear inputs in multiples of 32; proj has 48"):
        quantize_linears(odd, "int4", "cpu")
    with pytest.raises(ValueError, match="multiples of 32, got 40"):
        quantize_int4(torch.zeros(3, 40))


_CPU_KERNEL = pytest.mark.skipif(not cpu_kernel_fits(64, 32), reason="this torch build has no packed int4 CPU kernel")


@_CPU_KERNEL
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (192, 576), (576, 1536)])
def test_the_cpu_kernel_layer_holds_the_same_codes_and_computes_its_weight(
    out_features: int, in_features: int, monkeypatch
) -> None:
    linear = nn.Linear(in_features, out_features, bias=True)
    packed, scale, minimum = quantize_int4(linear.weight)
    layer = Int4CpuLinear.from_linear(linear)
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == packed.shape  # 4 bits a weight
    assert torch.equal(int4._codes_from_cpu_layout(layer.packed), int4._codes(packed))  # the same codes
    assert layer.scales_zeros.dtype == torch.bfloat16 and layer.scales_zeros.shape == (
        in_features // 32,
        out_features,
        2,
    )
    # its weight: Int4Linear's, with the scale and zero rounded to bfloat16 (a small part of a step)
    weight, exact = layer.weight(torch.float32), dequantize_int4(packed, scale, minimum, torch.float32)
    step = scale.float().repeat_interleave(32, dim=1)
    assert bool(((weight - exact).abs() <= step / 16 + 1e-6).all())
    calls: list[tuple[int, ...]] = []
    kernel = int4._CPU_KERNEL
    monkeypatch.setattr(int4, "_CPU_KERNEL", lambda x, *a: (calls.append(tuple(x.shape)), kernel(x, *a))[1])
    x = torch.randn(2, 3, in_features, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = layer(x.bfloat16())
    assert calls == [(6, in_features)] and out.dtype == torch.bfloat16 and out.shape == (2, 3, out_features)
    want = nn.functional.linear(x.bfloat16().float(), weight, linear.bias.detach())
    assert _relative_error(out, want) < 1e-2  # bfloat16 outputs of that weight
    with torch.inference_mode():  # float32 inputs: the same weight through an ordinary product
        assert _relative_error(layer(x), want) < 1e-2 and len(calls) == 1
        # rows that are a view with gaps (a slice of wider rows) are made dense for the kernel
        wide = torch.cat([x, x], dim=-1).bfloat16()
        assert torch.equal(layer(wide[..., :in_features]), out) and len(calls) == 2


@_CPU_KERNEL
def test_the_cpu_kernel_layer_passes_gradients_through_its_weight() -> None:
    linear = nn.Linear(64, 128, bias=False)
    layer = Int4CpuLinear.from_linear(linear)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(6)).bfloat16().requires_grad_(True)
    (grad,) = torch.autograd.grad(layer(x).float().sum(), x)
    want = layer.weight(torch.float32).sum(0)  # d(sum of x @ W.T) / dx = the column sums of W
    assert _relative_error(grad[0], want) < 1e-2
    assert not list(layer.parameters())


@_CPU_KERNEL
def test_quantize_linears_int4_takes_the_cpu_kernel_for_bfloat16_on_the_cpu_only() -> None:
    def holder(dtype: torch.dtype, out_features: int = 576) -> nn.Module:
        module = nn.Module()
        module.proj = nn.Linear(1536, out_features, bias=False).to(dtype)
        return quantize_linears(module, "int4", "cpu")

    assert isinstance(holder(torch.bfloat16).proj, Int4CpuLinear)
    assert isinstance(holder(torch.float32).proj, Int4Linear)  # float32 stays exact
    assert isinstance(holder(torch.bfloat16, out_features=40).proj, Int4Linear)  # not the kernel's shape
    # the same 5.0 bits per weight with its scales
    assert weight_bytes(holder(torch.bfloat16)) * 8 == pytest.approx(576 * 1536 * INT4_BITS_PER_WEIGHT)
