"""Holding a ComputeRuntime's thread busy, so that tests can fill its queues in a known order."""

from __future__ import annotations

import threading

from peerd.server.runtime import ComputeRuntime


def hold_thread(runtime: ComputeRuntime) -> threading.Event:
    """Occupy the compute thread until the returned event is set. Returns once the holding job runs,
    so that jobs queued meanwhile queue whole and none of them goes before it."""
    running, gate = threading.Event(), threading.Event()

    def block() -> None:
        running.set()
        gate.wait()

    runtime.submit(block, "gate")
    assert running.wait(timeout=10)
    return gate
