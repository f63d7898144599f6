"""A batch waits briefly for the steps that recent batches of its key promise, while they keep coming; a lone
session never waits."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import pytest

from peerd.server.batchfill import PEAK_HORIZON_S, QUIET_FACTOR, QUIET_MIN_S, BatchHistory
from peerd.server.runtime import ComputeRuntime
from tests.helpers.runtime import hold_thread


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
    # a batch may wait up to 0.2 s (its compute time) and, steps having come 10 ms apart, up to
    # 40 ms after the last one: a wave 10 ms apart fills unless a step is late by 30 ms or more
    runtime = ComputeRuntime(name="window-test", inline_max_cost=0.0, batch_window_s=0.5)
    runner = _SlowRunner(0.2)
    try:
        hold = hold_thread(runtime)  # the thread is busy: the first wave queues whole
        first = _wave(runtime, runner, 8, 0.01)
        hold.set()
        assert [f.result(10) for f in first] == list(range(8))
        # the next wave reaches the peer a step every 10 ms: without waiting it would run as 1 + 7
        second = _wave(runtime, runner, 8, 0.01)
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
        hold = hold_thread(runtime)
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


def test_a_batch_waits_for_no_more_steps_than_sessions_are_open() -> None:
    """After a burst of 8 sessions, a lone session (the only one open: ``most=1``) starts at once;
    told nothing, the same step waits out the quiet time for 7 steps of sessions that have ended."""
    runtime = ComputeRuntime(name="window-test", inline_max_cost=0.0, batch_window_s=10.0)
    runner = _SlowRunner(0.4)  # a batch's compute time, the longest a filling batch may wait
    starts: list[float] = []
    record = lambda payloads: (starts.append(time.perf_counter()), runner(payloads))[1]  # noqa: E731
    try:
        hold = hold_thread(runtime)
        first = _wave(runtime, runner, 8, 0.1)  # 0.1 s apart: the quiet time is 4 x 0.1 s
        hold.set()
        assert [f.result(10) for f in first] == list(range(8))
        runner.seconds = 0.0
        waits = []
        for most in (None, 1):
            submitted = time.perf_counter()
            assert runtime.submit_step(most, record, "blocks", "lone", most=most).result(10) == most
            waits.append(starts[-1] - submitted)
    finally:
        runtime.close()
    assert runner.sizes == [8, 1, 1]
    assert waits[0] >= 0.35  # expecting 8: waited for steps that never came (quiet 0.4 s, compute 0.4 s)
    assert waits[1] < 0.15  # one session open: nothing to wait for


def test_a_batch_stops_waiting_once_the_expected_steps_stop_coming() -> None:
    """Sessions moving as two waves: the largest recent batch (8) promises steps that are at another
    peer. A wave of 4 must start once its steps stop coming, not wait out a batch's compute time."""
    runtime = ComputeRuntime(name="window-test", inline_max_cost=0.0, batch_window_s=10.0)
    runner = _SlowRunner(2.0)  # the first batch makes a batch's compute time (the old bound) 2 s
    try:
        hold = hold_thread(runtime)
        first = _wave(runtime, runner, 8, 0.002)
        hold.set()
        assert [f.result(10) for f in first] == list(range(8))
        runner.seconds = 0.0
        started = time.perf_counter()
        second = _wave(runtime, runner, 4, 0.002)
        assert [f.result(10) for f in second] == list(range(4))
        waited_s = time.perf_counter() - started
    finally:
        runtime.close()
    assert runner.sizes[0] == 8 and sum(runner.sizes[1:]) == 4
    assert waited_s < 1.0  # waiting for the 4 that never come took the 2 s compute time


def test_batch_history_spacing_ignores_one_long_pause_and_bounds_the_quiet_wait() -> None:
    history = BatchHistory()
    assert history.quiet_s() == float("inf")  # no spacing known yet: only window and compute time bound it
    # two waves of 3 queued behind a busy thread, 1 ms apart within a wave, 40 ms between them
    history.ran(6, started=10.0, took=0.03, arrivals=[0.000, 0.001, 0.002, 0.042, 0.043, 0.044])
    assert history.gap_s == pytest.approx(0.001)
    assert history.quiet_s() == pytest.approx(max(QUIET_MIN_S, QUIET_FACTOR * 0.001))
    assert history.expected(10.0 + PEAK_HORIZON_S / 2, 64) == 6
    assert history.expected(10.0 + PEAK_HORIZON_S * 2, 64) == 1  # forgotten after the horizon
    assert history.fill_deadline(20.0, window_s=0.05) == pytest.approx(20.03)  # a batch's compute time
