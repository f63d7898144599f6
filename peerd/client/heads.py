"""The client's LM head, shared by every generation of one client and run in batches off the event loop.

A generation's only heavy local work is turning the last block's output into logits: one pass
over the ``[vocab, hidden]`` head matrix (113 MiB for SmolLM2-135M in float32, 3.6 ms on one CPU
core with oneDNN's product). That pass is bound by memory, not arithmetic, so 16 rows cost about
2.7 times one row. A
client serving many generations at once (the OpenAI API serves every request through one
``SwarmClient``) would otherwise pay the whole pass for each token of each generation, on the
event loop that also carries every stream.

:class:`HeadBatcher` is continuous batching for that pass, like the peers' runtime: requests that
arrive while a batch runs make up the next one, and a lone request runs at once (no window).
Each request keeps its own rows and gets exactly its own logits back; a lone request for one
position gets the same numbers as an unbatched call, and any other agrees with it within float
rounding (a matrix product over more rows may sum in another order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from peerd.model.batching import cpu_padding_rows, min_shared_rows
from peerd.model.linear import use_torch_threads

__all__ = ["HeadBatcher", "LogitsModule"]

MAX_BATCH_ROWS = 64  # positions per batched pass: past this, a bigger batch saves little and delays more


class LogitsModule(Protocol):
    """What turns final hidden states ``[batch, n, hidden]`` into logits ``[batch, n, vocab]``
    (a ``ClientHead``, or a trained adapter's own head)."""

    def logits(self, hidden: Tensor) -> Tensor: ...


@dataclass(eq=False)  # requests are told apart by identity, never by their tensors
class _Request:
    local: LogitsModule
    hidden: Tensor  # [1, n, hidden]
    result: asyncio.Future[Tensor]


class HeadBatcher:
    """Logits for every generation of one client, computed in batches on one worker thread.

    ``await logits(local, hidden)`` with ``hidden [1, n, hidden]`` returns ``[1, n, vocab]``.
    Requests for the same module that wait together run as one pass; a request for another
    module (a generation with its own adapter) runs in a batch of its own module's requests.
    Call :meth:`close` when the client closes.
    """

    def __init__(self, max_rows: int = MAX_BATCH_ROWS) -> None:
        self.max_rows = max_rows
        self._queue: list[_Request] = []
        self._running: asyncio.Future[None] | None = None  # the batch on the worker thread now
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peerd-head")
        self.batches = 0  # passes run, for tests and benchmarks
        self.rows = 0  # positions they covered

    async def logits(self, local: LogitsModule, hidden: Tensor) -> Tensor:
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(f"hidden states must be [1, n, hidden], got {tuple(hidden.shape)}")
        loop = asyncio.get_running_loop()
        request = _Request(local, hidden, loop.create_future())
        self._queue.append(request)
        try:
            while not request.result.done():
                running = self._running or self._start(loop)
                waits: list[asyncio.Future[object]] = [request.result, running]  # type: ignore[list-item]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            request.result.cancel()  # a batch that already holds it computes it and drops the result
            raise
        return request.result.result()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Hand the oldest waiting requests (one module's, up to ``max_rows`` positions) to the worker;
        together only when they make up ``min_shared_rows`` positions or more (4 with MKL's float32
        products on a CPU, else any).

        Called by a waiting request, so the queue holds at least that one."""
        self._queue = [r for r in self._queue if not r.result.done()]
        module = self._queue[0].local
        batch: list[_Request] = []
        rows = 0
        for request in self._queue:
            n = request.hidden.shape[1]
            if request.local is module and (not batch or rows + n <= self.max_rows):
                batch.append(request)
                rows += n
        if rows < min_shared_rows(self._queue[0].hidden):
            # fewer rows than a CPU runs efficiently together: a padded pass costs ~1.8 single ones,
            # and holds every request to the end of it, so the oldest runs alone (the others next)
            batch, rows = batch[:1], batch[0].hidden.shape[1]
        self._queue = [r for r in self._queue if r not in batch]
        self.batches += 1
        self.rows += rows
        # the worker computes with the event loop thread's torch thread count (the count is per
        # thread: the worker's would be the last one set anywhere in the process, or one per core)
        threads = torch.get_num_threads()
        work = loop.run_in_executor(self._executor, _forward, module, [r.hidden for r in batch], threads)
        running: asyncio.Future[None] = loop.create_future()

        def deliver(done: asyncio.Future[list[Tensor]]) -> None:
            self._running = None
            error = done.exception() if not done.cancelled() else asyncio.CancelledError()
            for i, request in enumerate(batch):
                if request.result.done():
                    continue  # its caller was cancelled
                if error is not None:
                    request.result.set_exception(error)
                else:
                    request.result.set_result(done.result()[i])
            running.set_result(None)

        work.add_done_callback(deliver)
        self._running = running
        return running


def _forward(module: LogitsModule, hiddens: list[Tensor], threads: int) -> list[Tensor]:
    """Logits of each ``[1, n_i, hidden]`` in ``hiddens``, from one pass over their rows.

    With MKL's float32 products on a CPU, 2 or 3 rows run with zero rows added up to ``CPU_MIN_ROWS``:
    those are slower over 2-3 rows than over 4 (SmolLM2's head, one core: 1 row 9.9 ms, 2 rows 24.9,
    3 rows 37.1, 4 rows 17.8), which made batching 2-3 requests slower than running them one by one.
    oneDNN's (peerd.model.linear, the default) are not: 1 row 3.6 ms, 2 or 3 rows 5.3, 16 rows 9.6.
    """
    use_torch_threads(threads)
    with torch.inference_mode():
        if len(hiddens) == 1 and hiddens[0].shape[1] == 1:  # one position: exactly the unbatched call
            return [module.logits(hiddens[0])]
        rows = torch.cat([h[0] for h in hiddens])  # [sum n_i, hidden]
        real, pad = rows.shape[0], cpu_padding_rows(rows)
        if pad:
            rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])  # [min_shared_rows, hidden]
        logits = module.logits(rows.unsqueeze(0))[0, :real]  # [sum n_i, vocab]
        parts = torch.split(logits, [h.shape[1] for h in hiddens])  # each [n_i, vocab]
        return [part.unsqueeze(0) for part in parts]  # each [1, n_i, vocab]
