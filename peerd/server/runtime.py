"""The only thread boundary in the daemon: torch work runs here, off the event loop.

One worker thread owns all compute, so torch's intra-op threads are never oversubscribed by
concurrent requests, and the event loop stays free to read frames, answer ``info`` and heartbeat the
DHT while a long prefill runs. Jobs are served fairly across remote peers: each peer id has its own
FIFO, and the worker takes one job from each waiting peer in turn (round robin), so one client
flooding a peer delays only itself.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

__all__ = ["ComputeRuntime", "RuntimeClosed"]

T = TypeVar("T")


class RuntimeClosed(Exception):
    """The runtime is shutting down and accepts no more work."""


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: Future[Any]
    enqueued_at: float = field(default_factory=time.perf_counter)


class ComputeRuntime:
    """Runs callables on one dedicated thread, round-robin across submitters."""

    def __init__(self, *, torch_threads: int | None = None, name: str = "peerd-compute") -> None:
        self._queues: dict[str, collections.deque[_Job]] = {}
        self._order: collections.deque[str] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._torch_threads = torch_threads
        self.busy_s = 0.0  # total time spent computing (for utilisation metrics)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)
        while True:
            with self._cv:
                while not self._order and not self._closed:
                    self._cv.wait()
                if not self._order:
                    return  # closed and drained
                owner = self._order.popleft()
                queue = self._queues[owner]
                job = queue.popleft()
                if queue:
                    self._order.append(owner)  # back of the line: others go first
                else:
                    del self._queues[owner]
            if not job.future.set_running_or_notify_cancel():
                continue
            started = time.perf_counter()
            try:
                result = job.fn()
            except BaseException as exc:
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                self.busy_s += time.perf_counter() - started

    def submit(self, fn: Callable[[], T], owner: str = "") -> Future[T]:
        """Queue ``fn`` for the compute thread on behalf of ``owner`` (a remote peer id)."""
        future: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeClosed("compute runtime is closed")
            queue = self._queues.get(owner)
            if queue is None:
                queue = self._queues[owner] = collections.deque()
                self._order.append(owner)
            queue.append(_Job(fn, future))
            self._cv.notify()
        return future

    async def run(self, fn: Callable[[], T], owner: str = "") -> T:
        """Await ``fn`` computed on the compute thread; cancelling the await drops a queued job."""
        future = self.submit(fn, owner)
        return await asyncio.wrap_future(future)

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting work, finish what is queued, and join the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
