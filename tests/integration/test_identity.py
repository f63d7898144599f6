"""Two daemons never share an identity: the second one given the same key refuses to start."""

from __future__ import annotations

from pathlib import Path

from peerd.cli.demo import LocalSwarm


def test_a_second_daemon_with_the_same_key_refuses_naming_the_holder(tiny_ckpt: Path, tmp_path: Path) -> None:
    swarm = LocalSwarm(str(tiny_ckpt), workdir=tmp_path)
    try:
        swarm.start_bootstrap(extra=["--model-id", "tiny"])
        holder = swarm.procs[0]
        # the same key file as the running bootstrap node (LocalSwarm names it bootstrap.key)
        twin = swarm.start_peer("twin", (0, 3), ["--identity", str(tmp_path / "bootstrap.key"), "--no-measure"])
        assert twin.popen.wait(120) == 1
        log = twin.log_tail(5)
        assert f"is in use by another peerd daemon (pid {holder.popen.pid})" in log, log
        assert "--identity" in log
        assert holder.popen.poll() is None  # the first one keeps running
    finally:
        swarm.stop()
