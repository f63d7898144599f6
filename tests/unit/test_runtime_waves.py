"""Sessions that ran in one batch are a wave: the next batch waits for the wave's missing members,
however unevenly they arrive, until its deadline; a member that ended or came too late leaves it."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any

from peerd.server.runtime import ComputeRuntime
from tests.helpers.runtime import hold_thread


class _Runner:
    """Records each batch's members; takes ``seconds`` per batch (a forward's time)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[list[Any]] = []
        self.started: list[float] = []
        self.threads: list[int] = []

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.started.append(time.perf_counter())
        self.threads.append(threading.get_ident())
        self.batches.append(sorted(payloads))
        time.sleep(self.seconds)
        return payloads


def _submit(runtime: ComputeRuntime, runner: _Runner, members: list[int], *, waves: bool) -> list[Future[Any]]:
    return [
        runtime.submit_step(m, runner, "blocks", f"client{m}", member=m if waves else None, most=16) for m in members
    ]


def _first_wave(runtime: ComputeRuntime, runner: _Runner, members: list[int], *, waves: bool) -> None:
    hold = hold_thread(runtime)  # the thread is busy: the steps queue whole and run as one batch
    futures = _submit(runtime, runner, members, waves=waves)
    hold.set()
    assert [f.result(10) for f in futures] == members


def _stalled_wave(runtime: ComputeRuntime, runner: _Runner, members: list[int], stall_s: float, *, waves: bool) -> None:
    """All but the last member 1 ms apart, then the last one ``stall_s`` later (its frame was held up by
    another process's forward on a busy machine)."""
    futures = []
    for m in members[:-1]:
        futures += _submit(runtime, runner, [m], waves=waves)
        time.sleep(0.001)
    time.sleep(stall_s)
    futures += _submit(runtime, runner, members[-1:], waves=waves)
    assert [f.result(10) for f in futures] == members


def test_a_wave_waits_for_a_member_held_up_past_the_quiet_time() -> None:
    members = list(range(8))
    sizes = {}
    for waves in (True, False):
        runtime = ComputeRuntime(name="wave-test", inline_max_cost=0.0, batch_window_s=0.5)
        runner = _Runner(0.2)  # a batch's compute time: the longest a filling batch waits
        try:
            _first_wave(runtime, runner, members, waves=waves)
            runner.seconds = 0.0
            # 7 steps 1 ms apart, the 8th 40 ms later: 10x the quiet time that spacing allows
            _stalled_wave(runtime, runner, members, 0.04, waves=waves)
            _stalled_wave(runtime, runner, members, 0.04, waves=waves)
        finally:
            runtime.close()
        sizes[waves] = [len(b) for b in runner.batches]
    assert sizes[True] == [8, 8, 8]  # the wave waited for its member and stayed whole
    assert sizes[False][0] == 8 and len(sizes[False]) >= 5  # untold, the batch started without it, twice


def test_a_member_later_than_the_deadline_leaves_the_wave() -> None:
    runtime = ComputeRuntime(name="wave-test", inline_max_cost=0.0, batch_window_s=0.5)
    runner = _Runner(0.1)
    try:
        _first_wave(runtime, runner, list(range(4)), waves=True)
        runner.seconds = 0.0
        started = time.perf_counter()
        _stalled_wave(runtime, runner, list(range(4)), 0.4, waves=True)  # far past the 0.1 s deadline
        waited = runner.started[1] - started
        # the wave is now 0..2: their next batch waits for nobody, and 3 runs on its own
        late = _submit(runtime, runner, [3], waves=True)
        assert late[0].result(10) == 3
        started = time.perf_counter()
        assert [f.result(10) for f in _submit(runtime, runner, [0, 1, 2], waves=True)] == [0, 1, 2]
        again_s = runner.started[-1] - started
    finally:
        runtime.close()
    assert runner.batches == [[0, 1, 2, 3], [0, 1, 2], [3], [3], [0, 1, 2]]
    assert 0.07 <= waited <= 0.3  # it waited out the deadline (~0.1 s: a batch's compute time) for 3
    assert again_s < 0.05


def test_a_member_that_ended_is_not_waited_for() -> None:
    runtime = ComputeRuntime(name="wave-test", inline_max_cost=0.0, batch_window_s=0.5)
    runner = _Runner(0.3)
    try:
        _first_wave(runtime, runner, list(range(4)), waves=True)
        runner.seconds = 0.0
        runtime.forget(3)  # its session closed
        started = time.perf_counter()
        assert [f.result(10) for f in _submit(runtime, runner, [0, 1, 2], waves=True)] == [0, 1, 2]
        waited = runner.started[-1] - started
    finally:
        runtime.close()
    assert runner.batches == [[0, 1, 2, 3], [0, 1, 2]]
    assert waited < 0.1  # not the 0.3 s deadline


def test_only_a_session_alone_in_its_wave_runs_inline() -> None:
    runtime = ComputeRuntime(name="wave-test", inline_max_cost=10.0, batch_window_s=0.5)
    runner = _Runner(0.0)

    async def step(member: int) -> Any:  # most=1: recent batches' sizes promise nothing (test_runtime_window.py)
        return await runtime.run_step(member, runner, "blocks", "alice", member=member, most=1)

    try:
        asyncio.run(step(7))  # a session alone: on the event loop
        _first_wave(runtime, runner, [0, 1], waves=True)
        runtime.forget(1)
        asyncio.run(step(0))  # its wave mate ended: alone again, on the event loop
        asyncio.run(step(7))
        _first_wave(runtime, runner, [0, 7], waves=True)
        asyncio.run(step(0))  # it last ran with 7, who is still open: it queues for 7
    finally:
        runtime.close()
    on_loop = [t == threading.get_ident() for t in runner.threads]
    assert on_loop == [True, False, True, True, False, False]
