"""A batch waits briefly for the steps that recent batches of its key promise; a lone session never waits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

from peerd.server.runtime import ComputeRuntime


class _SlowRunner:
    """Records each batch's size; takes ``seconds`` per batch (a forward's time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sizes: list[int] = []

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.sizes.append(len(payloads))
        time.sleep(self.seconds)
        return payloads


def _wave(runtime: ComputeRuntime, runner: _SlowRunner, n: int, gap_s: float) -> list[Future[Any]]:
    """``n`` steps of one key from ``n`` owners, ``gap_s`` apart (frames read one at a time)."""
    futures = []
    for i in range(n):
        futures.append(runtime.submit_step(i, runner, "blocks", f"client{i}"))
        time.sleep(gap_s)
    return futures


def test_steps_that_arrive_a_frame_at_a_time_fill_the_batch_recent_ones_had() -> None:
    runtime = ComputeRuntime(name="window-test", inline_max_cost=0.0)
    runner = _SlowRunner(0.05)
    try:
        hold = threading.Event()
        runtime.submit(hold.wait)  # the thread is busy: the first wave queues whole
        first = _wave(runtime, runner, 8, 0.0)
        hold.set()
        assert [f.result(10) for f in first] == list(range(8))
        # the next wave reaches the peer a step every 2 ms: without waiting it would run as 1 + 7
        second = _wave(runtime, runner, 8, 0.002)
        assert [f.result(10) for f in second] == list(range(8))
    finally:
        runtime.close()
    assert runner.sizes == [8, 8]


def test_a_lone_session_never_waits_and_the_window_is_bounded() -> None:
    runtime = ComputeRuntime(name="window-test", inline_max_cost=0.0, batch_window_s=0.2)
    runner = _SlowRunner(0.02)
    try:
        started = time.perf_counter()
        for i in range(5):  # one session: recent batches of one, no wait
            assert runtime.submit_step(i, runner, "blocks", "alice").result(10) == i
        assert time.perf_counter() - started < 5 * 0.02 + 0.1
        hold = threading.Event()
        runtime.submit(hold.wait)
        wave = _wave(runtime, runner, 4, 0.0)
        hold.set()
        [f.result(10) for f in wave]
        # 4 expected, 1 comes: it waits at most a batch's compute time (~20 ms), not the 200 ms window
        started = time.perf_counter()
        runtime.submit_step(9, runner, "blocks", "bob").result(10)
        assert time.perf_counter() - started < 0.15
    finally:
        runtime.close()
    assert runner.sizes == [1, 1, 1, 1, 1, 4, 1]
