"""A daemon whose p2pd dies stops with a clear error and a non-zero status, so its supervisor restarts it."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import psutil
from hivemind.p2p import P2P

from peerd.cli.demo import LocalSwarm
from peerd.rpc.p2pd import p2pd_pid


def _p2pd_child(pid: int) -> psutil.Process:
    children = [c for c in psutil.Process(pid).children() if c.name() == "p2pd" or "p2pd" in " ".join(c.cmdline())]
    assert len(children) == 1, children
    return children[0]


def _kill_p2pd_and_wait_exit(swarm: LocalSwarm, name: str) -> tuple[int, str]:
    proc = next(p for p in swarm.procs if p.name == name)
    child = _p2pd_child(proc.popen.pid)
    os.kill(child.pid, signal.SIGKILL)
    started = time.monotonic()
    code = proc.popen.wait(60)  # generous on a loaded machine; a hang would fail here
    print(f"{name} stopped {time.monotonic() - started:.1f} s after its p2pd was killed")
    return code, proc.log_tail(10)


def test_peer_and_bootstrap_stop_when_their_p2pd_dies(tiny_ckpt: Path, tmp_path: Path) -> None:
    swarm = LocalSwarm(str(tiny_ckpt), workdir=tmp_path)
    try:
        swarm.start_bootstrap(extra=["--model-id", "tiny", "--http-port", "0"])
        peer = swarm.start_peer("a", (0, 6), ["--no-measure", "--model-id", "tiny"])
        swarm.wait_ready([peer], timeout_s=120)
        boot = next(p for p in swarm.procs if p.name == "bootstrap")
        (info,) = swarm.wait_ready([boot], timeout_s=5)
        # the container health check's URL: a bootstrap node answers it while it has its network
        with urllib.request.urlopen(f"http://127.0.0.1:{info['http_port']}/healthz", timeout=10) as answer:
            assert answer.status == 200 and answer.read() == b"ok\n"
        code, log = _kill_p2pd_and_wait_exit(swarm, "a")
        assert code == 1, log
        assert "the libp2p daemon (p2pd" in log and "exited with status -9" in log, log
        code, log = _kill_p2pd_and_wait_exit(swarm, "bootstrap")
        assert code == 1, log
        assert "exited with status -9" in log, log
    finally:
        swarm.stop()


async def test_the_p2pd_pid_is_found_where_hivemind_keeps_it() -> None:
    p2p = await P2P.create()
    try:
        pid = p2pd_pid(p2p)
        assert pid is not None and psutil.Process(pid).ppid() == os.getpid()
    finally:
        await p2p.shutdown()
