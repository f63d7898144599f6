"""peerd.model.linear.Linear: oneDNN for float32 CPU products, F.linear for trainable weights and other dtypes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerd.model import linear as linear_module
from peerd.model.linear import Linear, onednn_on

pytestmark = pytest.mark.skipif(not onednn_on(), reason="this torch build has no oneDNN linear kernel")


class _Spy:
    """Counts the calls that reach oneDNN's kernel, passing them on."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args: Any) -> Tensor:
        self.calls += 1
        return self.kernel(*args)  # type: ignore[no-any-return]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Spy]:
    spy = _Spy(linear_module._KERNEL)
    monkeypatch.setattr(linear_module, "_KERNEL", spy)
    monkeypatch.setattr(linear_module, "MKL_MAX_WEIGHT", 0)  # the AVX-512 rules, on any CPU
    yield spy


def test_without_avx512_small_weights_take_f_linear_bit_for_bit_and_large_ones_keep_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert linear_module.mkl_max_weight("AVX512") == 0 and linear_module.mkl_max_weight("AMX") == 0
    assert linear_module.mkl_max_weight("AVX2") == linear_module.mkl_max_weight("DEFAULT") == 1 << 22
    spy = _Spy(linear_module._KERNEL)
    monkeypatch.setattr(linear_module, "_KERNEL", spy)
    monkeypatch.setattr(linear_module, "MKL_MAX_WEIGHT", 96 * 200)
    small, large = _layer(96, 200, bias=True), _layer(96, 201, bias=True)
    x = torch.randn(5, 96)
    with torch.inference_mode():
        assert torch.equal(small(x), F.linear(x, small.weight, small.bias)) and spy.calls == 0
        torch.testing.assert_close(large(x), F.linear(x, large.weight, large.bias), rtol=1e-5, atol=1e-5)
    assert spy.calls == 1


def _layer(in_features: int, out_features: int, bias: bool, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(in_features, out_features, bias=bias)
    layer.requires_grad_(False)  # as the model's blocks and head: frozen weights
    return layer


@pytest.mark.parametrize(
    "shape", [(1, 96), (2, 96), (3, 96), (4, 96), (5, 96), (17, 96), (2, 5, 96), (96,), (3, 96, 2), (1, 2, 96)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_inference_takes_onednn_or_for_2_to_4_rows_mkl_and_agrees_with_f_linear_to_float_rounding(
    spy: _Spy, shape: tuple[int, ...], bias: bool
) -> None:
    layer = _layer(96, 200, bias)
    x = torch.randn(shape)
    if len(shape) == 3 and shape[-1] == 2:
        x = x.transpose(1, 2)  # a non-contiguous input [3, 2, 96]
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x, layer.weight, layer.bias)
    rows = x.numel() // 96
    assert spy.calls == (0 if rows in linear_module.SKINNY_ROWS else 1)  # 2-4 rows: MKL, weight on the left
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_rows_of_more_than_1024_features_take_onednn_however_few() -> None:
    """MKL's transposed product loses to oneDNN from ~2048 features on (module comment)."""
    calls = _Spy(linear_module._KERNEL)
    layer = _layer(1025, 8, bias=False)
    x = torch.randn(2, 1025)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_module, "_KERNEL", calls)
        patch.setattr(linear_module, "MKL_MAX_WEIGHT", 0)  # the AVX-512 rules, on any CPU
        got = layer(x)
    assert calls.calls == 1
    torch.testing.assert_close(got, F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)


def test_the_gradient_of_two_rows_flows_through_the_mkl_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_module, "MKL_MAX_WEIGHT", 0)  # the AVX-512 rules, on any CPU
    layer = _layer(64, 32, bias=True)
    x = torch.randn(2, 64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out.detach(), F.linear(x.detach(), layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    grad = torch.randn(2, 32)
    out.backward(grad)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, grad @ layer.weight, rtol=1e-5, atol=1e-5)


def test_no_grad_forwards_and_input_gradients_take_onednn_trainable_weights_take_f_linear(spy: _Spy) -> None:
    layer = _layer(64, 32, bias=True)
    x = torch.randn(5, 64)  # 2-4 rows take MKL (tested above)
    with torch.no_grad():
        layer(x)
    assert spy.calls == 1
    layer(x)  # grad mode, but nothing requires grad: no graph to record
    assert spy.calls == 2

    # the gradient of the input (a backward RPC, a soft prompt): oneDNN forward and backward
    x_grad = torch.randn(2, 3, 64, requires_grad=True)
    out = layer(x_grad)
    assert spy.calls == 3 and out.requires_grad
    want = F.linear(x_grad.detach(), layer.weight, layer.bias)
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    grad = torch.randn(2, 3, 32)
    out.backward(grad)
    assert spy.calls == 4 and x_grad.grad is not None
    want_grad = grad @ layer.weight
    torch.testing.assert_close(x_grad.grad, want_grad, rtol=1e-5, atol=1e-5 * float(want_grad.abs().max()))
    summed = torch.randn(5, 64, requires_grad=True)
    layer(summed).sum().backward()  # an expanded (stride 0) gradient
    assert summed.grad is not None
    torch.testing.assert_close(summed.grad, layer.weight.sum(0).expand(5, 64), rtol=1e-5, atol=1e-5)
    calls = spy.calls

    # a trainable weight or bias needs autograd's own graph: F.linear, exactly
    trainable = _layer(64, 32, bias=True)
    trainable.weight.requires_grad_(True)
    out = trainable(x_grad)
    assert torch.equal(out, F.linear(x_grad, trainable.weight, trainable.bias))
    out.sum().backward()
    assert trainable.weight.grad is not None
    bias_only = _layer(64, 32, bias=True)
    bias_only.bias.requires_grad_(True)
    bias_only(x).sum().backward()
    assert spy.calls == calls and bias_only.bias.grad is not None


def test_other_dtypes_and_the_switch_take_f_linear_bit_for_bit(spy: _Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(64, 32, bias=True)
    x = torch.randn(3, 64)
    half = _layer(64, 32, bias=True).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(half(x.bfloat16()), F.linear(x.bfloat16(), half.weight, half.bias))
        assert spy.calls == 0
        monkeypatch.setattr(linear_module, "ONEDNN", False)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert spy.calls == 0


def test_state_dict_is_nn_linears() -> None:
    ours, theirs = Linear(8, 4), nn.Linear(8, 4)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.Linear)


def test_int4_layers_compute_their_dequantized_weight_with_onednn(spy: _Spy) -> None:
    from peerd.model.int4 import Int4Linear, dequantize_int4

    layer = Int4Linear.from_linear(_layer(96, 40, bias=True))
    x = torch.randn(5, 96)  # (2-4 rows would take MKL's transposed product)
    with torch.inference_mode():
        got = layer(x)
        want = F.linear(x, dequantize_int4(layer.packed, layer.scale, layer.minimum, x.dtype), layer.bias)
    assert spy.calls == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
