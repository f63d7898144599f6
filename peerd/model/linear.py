"""Linear layers whose float32 CPU products run on oneDNN's kernel instead of MKL's.

PyTorch's CPU wheel sends a float32 ``F.linear`` to MKL. On the CPU we measure on (AMD EPYC, Zen 4,
AVX-512) MKL is about half as fast as oneDNN, which the same wheel carries (``torch.ops.mkldnn``),
at every size a model here makes, one thread:

* decode (a few rows against a weight read from memory): SmolLM2's LM head (49152 x 576) took 6.4-7.1
  ms for 1 row, 13-19 ms for 2-3 rows and 15-19 ms for 16; oneDNN 3.6-4.7, 5.3-6.6 and 9.2-11.7 ms.
  Ten SmolLM2 blocks run a decode step 1.14-1.35x faster, 16 sessions' steps 1.3x;
* prefill and training (hundreds of rows, bound by arithmetic): an MLP's two products over 512 rows
  took 16.4 ms, 7.4 with oneDNN; the gradient of the input, 7.8 ms against 3.4.

So :class:`Linear` (an ``nn.Linear``: same parameters, same state-dict names) and :func:`linear`
(``F.linear``'s signature; int4 layers compute their dequantized weight with it) compute with oneDNN
when the input and weight are float32 CPU tensors and the weight (and bias) take no gradient, as
every weight of the blocks and the head is frozen here: inference, and forwards that need the
gradient of their *input* (a backward RPC's recomputation, a soft prompt's or a LoRA's training),
whose backward is oneDNN's product with the transposed weight. A trainable weight or bias, another
dtype (bfloat16 already reaches oneDNN through ``F.linear``) or another device take ``F.linear``.
Both kernels compute the same float32 sums in another order: outputs agree to float rounding
(relative 1e-7 to 4e-6 measured), not bit for bit, as a product over more rows already does.

That was measured on AVX-512. On a CPU without it (torch's AVX2 kernels) MKL is the faster one for
the small weights of the blocks, so there weights of up to :data:`MKL_MAX_WEIGHT` elements take
``F.linear`` (see the constant).

:data:`ONEDNN` switches oneDNN off for a process (benchmarks compare the two side by side).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MKL_MAX_WEIGHT",
    "ONEDNN",
    "SKINNY_ROWS",
    "Linear",
    "linear",
    "mkl_max_weight",
    "onednn_on",
    "use_torch_threads",
]


def _find_kernel() -> Callable[..., Tensor] | None:
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):  # a build without it: F.linear everywhere
        return None


_KERNEL = _find_kernel()
ONEDNN = _KERNEL is not None  # False: every Linear computes with F.linear


def onednn_on() -> bool:
    """Whether :class:`Linear` computes float32 CPU products with oneDNN in this process (the build
    has the kernel and :data:`ONEDNN` is on); if not, with MKL through ``F.linear``."""
    return ONEDNN and _KERNEL is not None


# Products over 2-4 rows of at most 1024 features: MKL's ``weight @ x.T`` (the weight as the left
# operand, the few rows as its right operand's columns) streams the weight about as fast as
# oneDNN's kernel does for one row; oneDNN's for 2-4 rows falls to a slower path. One thread on the
# dev box (AMD EPYC, Zen 4), ms per weight, oneDNN / MKL transposed:
#   [576 x 576]    1 row 0.058 (oneDNN)   2 rows 0.083 / 0.056   4 rows 0.085 / 0.061
#   [1536 x 576]   1 row 0.127            2 rows 0.228 / 0.146   4 rows 0.234 / 0.167
#   [49152 x 576]  1 row 4.1 (LM head)    2 rows 6.8 / 4.6       4 rows 7.2 / 5.4
#   [576 x 2048]   2 rows 0.242 / 0.228   4 rows 0.242 / 0.608 (from 2048 features on MKL loses)
#   [4096 x 4096]  2 rows 3.64 / 4.77     4 rows 3.64 / 8.78
# Three rows cost about as much as four either way and are padded to four (a zero row; rows are
# independent). A decode batch of 2-4 SmolLM2 steps through 10 blocks: 13.1 -> 10.7 ms (2 rows),
# 13.5 -> 11.8 (4 rows), alternating in one process.
SKINNY_ROWS: tuple[int, ...] = (2, 3, 4)
SKINNY_MAX_FEATURES = 1024


# Without AVX-512 the kernels compare the other way round for small weights. One thread on an AVX2
# box (AMD EPYC), ms per product, oneDNN / MKL (F.linear) / MKL with the weight on the left:
#   [576 x 576]    1 row 0.083 / 0.049 / 0.056   2 rows 0.130 / 0.085 / 0.154   16 rows 0.274 / 0.216 / 0.212
#   [192 x 576]    1 row 0.052 / 0.020 / 0.023   4 rows 0.094 / 0.042 / 0.060   512 rows 1.63 / 1.30 / 1.52
#   [1536 x 576]   1 row 0.120 / 0.112 / 0.118   2 rows 0.295 / 0.150 / 0.382   64 rows 2.22 / 1.81 / 1.75
#   [576 x 1536]   1 row 0.126 / 0.097 / 0.101   4 rows 0.402 / 0.219 / 0.228   512 rows 13.0 / 12.1 / 11.5
#   [49152 x 576]  1 row 9.17 / 10.1 / 9.64      2 rows 17.6 / 22.0 / 11.8      16 rows 26.2 / 32.6 / 29.6
#   [4096 x 4096]  1 row 3.92 / 3.38 / 3.89      4 rows 9.00 / 11.7 / 8.40      16 rows 12.6 / 15.1 / 14.2
# So there a weight of up to 4 Mi elements takes F.linear at every row count, and larger ones (an LM
# head, the blocks of large models) keep the rules above. With AVX-512 nothing changes (0).
def mkl_max_weight(capability: str) -> int:
    """:data:`MKL_MAX_WEIGHT` for a CPU whose torch kernels are built for ``capability``
    (``torch.backends.cpu.get_cpu_capability()``)."""
    return 1 << 22 if capability in ("AVX2", "DEFAULT") else 0


MKL_MAX_WEIGHT = mkl_max_weight(torch.backends.cpu.get_cpu_capability())


def _product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN, or for 2-4 short rows by MKL with the weight on the left
    (:data:`SKINNY_ROWS`; the caller checked :func:`onednn_on`)."""
    assert _KERNEL is not None  # for mypy: onednn_on() said so
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    if rows not in SKINNY_ROWS or features > SKINNY_MAX_FEATURES:
        return _KERNEL(x, weight, bias, "none", [], "")
    flat = x.reshape(rows, features)
    if rows == 3:
        flat = torch.cat([flat, flat.new_zeros(1, features)])
    out = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
    return out.t()[:rows].contiguous().view(*x.shape[:-1], weight.shape[0])  # rows as they came


class _InputGradient(torch.autograd.Function):
    """oneDNN's product, differentiable with respect to ``x`` only (frozen weight and bias)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return _product(grad, weight.t(), None), None, None  # grad @ weight: [..., in_features]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed with oneDNN where the module says so."""
    if not (
        onednn_on()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.numel() > MKL_MAX_WEIGHT
    ):
        return F.linear(x, weight, bias)
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled() or not (x.requires_grad or trainable):
        return _product(x, weight, bias)  # no graph to record
    if trainable:
        return F.linear(x, weight, bias)  # a graph for the weight's own gradient
    return _InputGradient.apply(x, weight, bias)  # type: ignore[no-untyped-call, no-any-return]


class Linear(nn.Linear):
    """``nn.Linear`` computing float32 CPU products with oneDNN (see the module)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_torch_threads(threads: int | None) -> None:
    """Make torch's intra-op thread count of the calling thread ``threads`` (None or 0: leave it).

    The count is per thread with torch's OpenMP backend: a thread other than the one that called
    ``torch.set_num_threads`` uses the count set last anywhere in the process, or one per core
    before its first parallel op (a product on a new thread of a 2-core box took 2.0 s of CPU per
    second). So a thread that computes for a peer's runtime or a client's head sets it first; a
    cheap check when it is right already."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
