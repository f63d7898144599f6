"""Small steps on an idle runtime run inline on the event loop; otherwise they queue and batch."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch

from peerd.server.runtime import ComputeRuntime


class _Runner:
    """Records the thread and the batch size of every call; answers each payload doubled."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, payloads: list[Any]) -> list[Any]:
        self.calls.append((threading.current_thread().name, len(payloads)))
        return [p * 2 for p in payloads]


async def test_a_small_step_on_an_idle_runtime_runs_inline_and_is_charged() -> None:
    runtime = ComputeRuntime(name="inline-test", inline_max_cost=8.0)
    runner = _Runner()
    try:
        assert await runtime.run_step(21, runner, "key", "alice", cost=4.0) == 42
        assert await runtime.run_step(1, runner, "key", "alice", cost=16.0) == 2  # too costly: the thread
    finally:
        runtime.close()
    assert runner.calls == [(threading.current_thread().name, 1), ("inline-test", 1)]
    assert runtime.inline_steps == 1
    assert runtime._vtime["alice"] == 20.0  # both charged to alice's fair share


async def test_an_error_of_an_inline_step_reaches_its_caller_and_frees_the_runtime() -> None:
    runtime = ComputeRuntime(name="inline-test")

    def failing(payloads: list[Any]) -> list[Any]:
        return [ValueError("bad position")]

    try:
        try:
            await runtime.run_step(1, failing, "key", "alice", cost=1.0)
        except ValueError as exc:
            assert "bad position" in str(exc)
        else:
            raise AssertionError("the step's error was swallowed")
        assert await runtime.run(lambda: "thread still serves") == "thread still serves"
    finally:
        runtime.close()


async def test_steps_ready_together_batch_on_the_thread_and_a_busy_thread_is_not_bypassed() -> None:
    runtime = ComputeRuntime(name="inline-test", inline_max_cost=8.0)
    runner = _Runner()
    running, gate = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        gate.wait()

    try:
        # three steps read in the same loop iteration: one forward of three on the thread
        results = await asyncio.gather(*(runtime.run_step(i, runner, "key", f"c{i}", cost=1.0) for i in range(3)))
        assert results == [0, 2, 4]
        assert runner.calls == [("inline-test", 3)]
        # while the thread runs other work, a small step queues behind it instead of running beside it
        blocker = runtime.submit(hold, "bulk")
        assert await asyncio.to_thread(running.wait, 10)
        step = asyncio.ensure_future(runtime.run_step(5, runner, "key", "d", cost=1.0))
        await asyncio.sleep(0.05)
        assert not step.done() and runtime.queued == 1
        gate.set()
        assert await step == 10
        await asyncio.wrap_future(blocker)
    finally:
        gate.set()
        runtime.close()
    assert runner.calls[-1] == ("inline-test", 1)
    assert runtime.inline_steps == 0


def test_inline_and_queued_steps_compute_with_the_runtimes_torch_threads() -> None:
    """torch's thread count is per thread: the event loop computing an inline step uses the runtime's
    count too, not whatever that thread had (one per core on a fresh thread)."""
    seen: list[tuple[str, int]] = []

    def runner(payloads: list[Any]) -> list[Any]:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return payloads

    def loop_thread() -> None:
        torch.set_num_threads(2)  # the event loop's own count; the runtime is told 1
        assert torch.get_num_threads() == 2  # torch has run on this thread before (a peer loads weights here)

        async def main() -> None:
            runtime = ComputeRuntime(name="threads-test", torch_threads=1, inline_max_cost=8.0)
            try:
                await runtime.run_step(1, runner, "key", "alice", cost=4.0)  # inline, on this thread
                await runtime.run_step(1, runner, "key", "alice", cost=16.0)  # on the compute thread
            finally:
                runtime.close()

        asyncio.run(main())

    thread = threading.Thread(target=loop_thread, name="loop-thread")
    thread.start()
    thread.join(timeout=30)
    assert seen == [("loop-thread", 1), ("threads-test", 1)]
