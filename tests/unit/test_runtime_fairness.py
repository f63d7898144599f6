"""ComputeRuntime serves remote peers round robin: a flooding peer delays only itself."""

from __future__ import annotations

import threading

from peerd.server.runtime import ComputeRuntime


def test_a_flooding_owner_does_not_starve_another() -> None:
    runtime = ComputeRuntime(name="fairness-test")
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = runtime.submit(gate.wait, "flooder")  # holds the thread while the queues fill
        flood = [runtime.submit(lambda: order.append("flooder"), "flooder") for _ in range(100)]
        polite = [runtime.submit(lambda: order.append("polite"), "polite") for _ in range(3)]
        gate.set()
        for future in [blocker, *flood, *polite]:
            future.result(timeout=10)
    finally:
        runtime.close()
    # the polite peer's jobs alternate with the flooder's instead of waiting behind all 100
    assert [i for i, who in enumerate(order) if who == "polite"] == [0, 2, 4]
    assert runtime.queued == 0
