"""Joining a swarm as a new user would: an unreachable bootstrap and an empty swarm are told apart fast."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from peerd.cli.demo import LocalSwarm
from peerd.cli.main import main

FAKE_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once the socket is closed


def test_an_unreachable_bootstrap_is_reported_within_seconds(tiny_ckpt: Path, capsys) -> None:
    maddr = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{FAKE_ID}"
    started = time.monotonic()
    code = main(["status", "--model", str(tiny_ckpt), "--model-id", "tiny", "--initial-peers", maddr])
    elapsed_s = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1
    assert "no initial peer accepts connections" in err and maddr in err, err
    assert elapsed_s < 15, f"took {elapsed_s:.1f} s"  # a TCP connect refused at once; libp2p alone takes far longer


@pytest.fixture
def empty_swarm(tiny_ckpt: Path, tmp_path: Path):
    swarm = LocalSwarm(str(tiny_ckpt), workdir=tmp_path)
    try:
        swarm.start_bootstrap(extra=["--model-id", "tiny"])
        yield swarm.initial_peers
    finally:
        swarm.stop()


def test_an_empty_swarm_is_named_as_such(tiny_ckpt: Path, empty_swarm: list[str], capsys) -> None:
    args = ["--model", str(tiny_ckpt), "--model-id", "tiny", "--initial-peers", ",".join(empty_swarm)]
    started = time.monotonic()
    assert main(["generate", "hello", *args]) == 1
    elapsed_s = time.monotonic() - started
    err = capsys.readouterr().err
    assert "the swarm is reachable" in err and "no peer announces model 'tiny' in swarm 'public'" in err, err
    assert elapsed_s < 25, f"took {elapsed_s:.1f} s"  # not the 30 s wait for a route
    assert main(["status", *args]) == 3  # every block is a gap
    assert "no peer announces model 'tiny'" in capsys.readouterr().err
