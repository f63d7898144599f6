"""ComputeRuntime serves remote peers round robin: a flooding peer delays only itself."""

from __future__ import annotations

import threading

from peerd.server.runtime import ComputeRuntime


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
    # flooder queued first, so it goes first, then each polite job waits for exactly one flood job
    assert [i for i, who in enumerate(order) if who == "polite"] == [1, 3, 5]
    assert runtime.queued == 0
