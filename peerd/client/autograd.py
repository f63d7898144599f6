"""Remote blocks as a differentiable torch module: ``loss.backward()`` runs through the swarm.

:class:`RemoteBlocks` is the ``nn.Module`` face of :class:`peerd.client.pipeline.RemotePipeline`:
``blocks(hidden)`` is a ``torch.autograd.Function``, so ``loss.backward()`` and any torch optimizer
just work.

**Why the training step runs in a worker thread.** Autograd is synchronous: ``loss.backward()``
calls our ``backward`` and waits for its result, while the client (p2pd streams, DHT) lives on an
asyncio event loop. The function therefore hands each remote call to the client's loop with
``asyncio.run_coroutine_threadsafe`` and blocks on the answer -- which only works if the caller is
*not* the loop's own thread. So a training loop is async and runs each step with
``await asyncio.to_thread(step)``: local torch compute (embeddings, head, loss, optimizer) stays
off the event loop, exactly as servers keep torch off theirs, and the loop keeps serving streams
and heartbeats meanwhile. We rejected the alternatives: an explicit async forward/backward API
would have the user wire gradients between local graph pieces by hand (``loss.backward()`` would
not reach the soft prompt), and a hidden event-loop thread owned by the module (two loops, p2pd
objects bound to the wrong one). Calling the module from the loop thread raises a clear error
instead of deadlocking (see also docs/finetuning.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from peerd.client.pipeline import PipelineClient, PipelineTrace, RemotePipeline

__all__ = ["RemoteBlocks"]

T = TypeVar("T")


class _RemoteBlocksFunction(torch.autograd.Function):
    """Autograd glue: forward and backward each block the calling thread on the client's event loop."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, module: RemoteBlocks) -> Tensor:
        out, trace = module.run_sync(lambda: module.pipeline.forward(hidden))
        ctx.module = module
        ctx.trace = trace
        module.last_trace = trace
        return out.to(hidden.device, hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        module: RemoteBlocks = ctx.module
        trace: PipelineTrace = ctx.trace
        grad = module.run_sync(lambda: module.pipeline.backward(trace, grad_output))
        ctx.trace = None  # free the saved stage inputs as soon as they are used
        return grad.to(grad_output.device, grad_output.dtype), None


class RemoteBlocks(nn.Module):
    """The swarm's frozen blocks ``[start, end)`` as a differentiable module: hidden states in and out.

    Build it inside the client's event loop (it remembers that loop), then call it -- and run
    ``loss.backward()`` -- from another thread, normally ``await asyncio.to_thread(train_step)``.
    Gradients flow to whatever produced the input hidden states (a soft prompt, embedding adapters);
    the blocks themselves have no parameters here. Keyword arguments go to :class:`RemotePipeline`.
    ``last_trace`` holds the trace of the latest forward (timeline, retries) for inspection.
    """

    def __init__(
        self,
        client: PipelineClient,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        **pipeline_kwargs: Any,
    ) -> None:
        super().__init__()
        self.client = client
        self.pipeline = RemotePipeline(client, **pipeline_kwargs)
        self.loop = loop or asyncio.get_running_loop()
        self.last_trace: PipelineTrace | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        out: Tensor = _RemoteBlocksFunction.apply(hidden, self)  # type: ignore[no-untyped-call]
        return out

    def run_sync(self, make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``make_coro()`` on the client's loop and wait for it; refuses to run on that loop's thread."""
        if self._on_loop_thread():
            raise RuntimeError(
                "RemoteBlocks waits for the swarm synchronously, so it cannot run on the event loop's own "
                "thread (that would deadlock): run the training step in a worker thread, e.g. "
                "`await asyncio.to_thread(train_step)`"
            )
        return asyncio.run_coroutine_threadsafe(make_coro(), self.loop).result()

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:  # no loop runs in this thread: a worker thread, as intended
            return False
