"""Linear layers whose inference forward on a CPU runs oneDNN's matrix product instead of MKL's.

PyTorch's CPU wheel sends a float32 ``F.linear`` to MKL. For the products a decode step makes (1 to
a few dozen rows against a weight read from memory) MKL is slow on the CPUs we measured: SmolLM2's
LM head (49152 x 576) took 6.6 ms for 1 row, 13-16 ms for 2-3 rows and 15-18 ms for 16 on one
thread of an AMD EPYC (Zen 4) core; oneDNN, which PyTorch also ships (``torch.ops.mkldnn``), took
3.6, 6.6 and 9.2 ms on the same dense weight. Ten SmolLM2 blocks run a decode step 1.2-1.35x faster
(docs/benchmarks.md, "oneDNN's products").

So :class:`Linear` (an ``nn.Linear``: same parameters, same state-dict names) runs oneDNN's kernel
when that is safe: a float32 CPU input and weight, and no autograd graph to record (inference, or
any forward under ``torch.no_grad``). Training forwards that need gradients, other dtypes (bfloat16
already goes to oneDNN through ``F.linear``) and other devices take ``F.linear`` as before. Both
kernels compute the same float32 sums in another order: outputs agree to float rounding (relative
1e-6 measured), not bit for bit, the same as a product over more rows does.

:data:`ONEDNN` switches the fast path off for a process (benchmarks compare the two side by side).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ONEDNN", "Linear", "onednn_on"]


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
    """Whether :class:`Linear` computes float32 CPU inference with oneDNN in this process (the build
    has the kernel and :data:`ONEDNN` is on); if not, with MKL through ``F.linear``."""
    return ONEDNN and _KERNEL is not None


class Linear(nn.Linear):
    """``nn.Linear`` computing inference forwards of float32 CPU tensors with oneDNN (see the module)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (
            onednn_on()
            and _KERNEL is not None  # for mypy: onednn_on() says so
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or self._bias_grad()))
        ):
            return _KERNEL(x, weight, self.bias, "none", [], "")
        return F.linear(x, weight, self.bias)

    def _bias_grad(self) -> bool:
        return self.bias is not None and self.bias.requires_grad
