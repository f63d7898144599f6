"""Supervision of the p2pd child process that hivemind's P2P runs for us.

p2pd is a peer's (or bootstrap node's) only network: every stream and every DHT message goes
through it. If it dies (killed, crashed, OOM), the Python process keeps running without a network
and a supervisor (systemd, Docker) sees nothing wrong. So we watch it, and when it exits without
being asked to, the daemon stops with a clear error and a non-zero exit status, to be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from hivemind.p2p import P2P

__all__ = ["P2PDaemonLost", "p2pd_pid", "wait_for_p2pd_exit"]


class P2PDaemonLost(ConnectionError):
    """The p2pd child exited on its own: this process has no network left."""

    def __init__(self, pid: int | None, returncode: int | None) -> None:
        self.pid, self.returncode = pid, returncode
        super().__init__(
            f"the libp2p daemon (p2pd, pid {pid}) exited with status {returncode}: this process has no network "
            "left and stops; run it again (a supervisor such as systemd restarts it on its own)"
        )


def _child(p2p: P2P) -> asyncio.subprocess.Process | None:
    # hivemind 1.1.12 keeps the p2pd process here (pinned in pyproject; checked by a test)
    child = getattr(p2p, "_child", None)
    return child if isinstance(child, asyncio.subprocess.Process) else None


def p2pd_pid(p2p: P2P) -> int | None:
    child = _child(p2p)
    return child.pid if child is not None else None


async def wait_for_p2pd_exit(p2p: P2P, stop: asyncio.Event) -> P2PDaemonLost | None:
    """Wait until ``stop`` is set (None) or p2pd exits first (the error to report)."""
    child = _child(p2p)
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    if child is not None:
        waiters.add(asyncio.ensure_future(child.wait()))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
    if stop.is_set() or child is None:
        return None
    return P2PDaemonLost(child.pid, child.returncode)
