"""ComputeRuntime serves remote peers by cost-fair queuing: a flooding peer delays only itself."""

from __future__ import annotations

import threading

import pytest

from peerd.server.runtime import ComputeRuntime
from tests.helpers.runtime import hold_thread


def test_a_flooding_owner_does_not_starve_another() -> None:
    runtime = ComputeRuntime(name="fairness-test")
    running, gate = threading.Event(), threading.Event()
    order: list[str] = []

    def block() -> None:
        running.set()
        gate.wait()

    try:
        # holds the thread while the queues fill; wait until it runs, so the flooder's queue below
        # starts empty whether or not the thread woke before this test thread went on
        blocker = runtime.submit(block, "flooder")
        assert running.wait(timeout=10)
        flood = [runtime.submit(lambda: order.append("flooder"), "flooder") for _ in range(100)]
        polite = [runtime.submit(lambda: order.append("polite"), "polite") for _ in range(3)]
        gate.set()
        for future in [blocker, *flood, *polite]:
            future.result(timeout=10)
    finally:
        runtime.close()
    # the polite peer's jobs alternate with the flooder's instead of waiting behind all 100: the
    # flooder just had its turn (the blocker), so the polite peer, idle until now, goes first, then
    # each polite job waits for exactly one flood job of the same cost
    assert [i for i, who in enumerate(order) if who == "polite"] == [0, 2, 4]
    assert runtime.queued == 0


def test_fairness_is_by_cost_and_a_chunked_job_lets_others_run_between_its_chunks() -> None:
    runtime = ComputeRuntime(name="cost-test")
    order: list[str] = []

    def big_job():  # type: ignore[no-untyped-def]
        for i in range(20):
            order.append(f"big{i}")
            yield 100.0  # each chunk costs what 100 decode steps cost
        return "done"

    try:
        gate = hold_thread(runtime)
        big = runtime.submit_chunks(big_job, "flooder")
        expensive = [runtime.submit(lambda: order.append("expensive"), "flooder", cost=100.0) for _ in range(3)]
        steps = [runtime.submit(lambda: order.append("step"), "polite", cost=1.0) for _ in range(5)]
        gate.set()
        assert big.result(timeout=10) == "done"
        for future in [*expensive, *steps]:
            future.result(timeout=10)
    finally:
        runtime.close()
    # the flooder queued first, so its first chunk runs first; then the polite peer's 5 cheap jobs
    # all run before the second chunk: by cost, 5 steps are far less than one chunk (counting jobs,
    # they would have alternated with the chunks)
    assert order[:7] == ["big0", *["step"] * 5, "big1"], order
    assert order.count("step") == 5 and order.count("expensive") == 3


def test_steps_of_one_key_run_as_one_batch_in_fair_order_and_before_bulk_work() -> None:
    runtime = ComputeRuntime(name="batch-test")
    batches: list[list[str]] = []
    order: list[str] = []

    def runner(payloads: list[str]) -> list[object]:
        batches.append(payloads)
        order.append("batch")
        return [ValueError("bad") if p == "bad" else p.upper() for p in payloads]

    try:
        gate = hold_thread(runtime)
        bulk = runtime.submit(lambda: order.append("bulk"), "many", cost=1.0)
        many = [runtime.submit_step(f"m{i}", runner, "blocks 0-3", "many") for i in range(80)]
        one = runtime.submit_step("one", runner, "blocks 0-3", "one")
        bad = runtime.submit_step("bad", runner, "blocks 0-3", "other")
        elsewhere = runtime.submit_step("x", runner, "blocks 3-6", "one")
        gate.set()
        assert one.result(timeout=10) == "ONE"
        assert many[0].result(timeout=10) == "M0"
        with pytest.raises(ValueError, match="bad"):
            bad.result(timeout=10)  # a failing step fails alone
        for future in [*many, elsewhere, bulk]:
            future.result(timeout=10)
    finally:
        runtime.close()
    # the first batch takes one step per owner per round, so the lone sessions' steps are in it
    # whatever the flooder queued, and it is capped; another block range is never mixed in
    assert len(batches[0]) == 64 and "one" in batches[0] and "bad" in batches[0]
    assert all("x" not in b or b == ["x"] for b in batches)
    assert sum(len(b) for b in batches) == 83
    # the flooder's own steps (urgent) go before its bulk job, which was queued first
    assert order.index("bulk") > order.index("batch")
    assert runtime.batches >= 1 and runtime.batched_steps >= 64


def _recorded(order: list[str]):  # type: ignore[no-untyped-def]
    """A batch runner that appends each payload to ``order`` and returns it."""

    def run(payloads: list[str]) -> list[object]:
        order.extend(payloads)
        return list(payloads)

    return run


def test_an_urgent_step_goes_before_flooders_tied_with_it_in_virtual_time() -> None:
    """Three peers flood with chunks of equal cost, so they share a virtual time; a decode step that
    arrives while one chunk runs starts at that virtual time too, and must run right after that
    chunk, not behind a chunk of every other flooder."""
    runtime = ComputeRuntime(name="tie-test")
    order: list[str] = []
    first_chunk_runs, step_queued = threading.Event(), threading.Event()

    def flood(name: str):  # type: ignore[no-untyped-def]
        for i in range(3):
            order.append(f"{name}{i}")
            if name == "a" and i == 0:
                first_chunk_runs.set()
                assert step_queued.wait(timeout=10)
            yield 64.0  # a chunk: 64 tokens through one block

    try:
        gate = hold_thread(runtime)
        floods = [runtime.submit_chunks(lambda n=name: flood(n), name) for name in "abc"]  # type: ignore[misc]
        gate.set()
        assert first_chunk_runs.wait(timeout=10)
        step = runtime.submit_step("step", _recorded(order), "blocks", "honest")
        step_queued.set()
        assert step.result(timeout=10) == "step"
        for future in floods:
            future.result(timeout=10)
    finally:
        runtime.close()
    assert order[:3] == ["a0", "step", "b0"], order  # by activation order alone: a0, b0, c0, step
