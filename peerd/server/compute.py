"""The torch work of each RPC, as functions the compute runtime runs off the event loop."""

from __future__ import annotations

import torch

from peerd.model.stage import KVCache, Stage
from peerd.server.memory import ActivationMeter

__all__ = ["backward", "forward", "inference_step"]


def forward(stage: Stage, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Blocks [start, end) applied to ``hidden``; the answer in the request's dtype, on the CPU."""
    with torch.inference_mode():
        x = hidden.to(stage.device, stage.dtype)
        return stage.forward(x, start=start, end=end).to("cpu", hidden.dtype)


def backward(
    stage: Stage, meter: ActivationMeter, hidden: torch.Tensor, grad_output: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """Gradient w.r.t. ``hidden`` of blocks [start, end), given the gradient w.r.t. their output.

    Activation checkpointing: the forward is recomputed here instead of keeping activations between
    requests, so server memory does not grow with clients in flight.
    """
    with torch.enable_grad(), meter.track():
        x = hidden.to(stage.device, stage.dtype).requires_grad_(True)
        y = stage.forward(x, start=start, end=end)
        (grad,) = torch.autograd.grad(y, x, grad_output.to(stage.device, stage.dtype))
    return grad.to("cpu", hidden.dtype)


def inference_step(
    stage: Stage, hidden: torch.Tensor, cache: KVCache, position: int, start: int, end: int
) -> torch.Tensor:
    """One inference step: the cache is written in place from ``position`` on."""
    with torch.inference_mode():
        x = hidden.to(stage.device, stage.dtype)
        out = stage.forward(x, cache=cache, position=position, start=start, end=end)
        return out.to("cpu", hidden.dtype)
