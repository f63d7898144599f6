"""The `peerd` command line: help works, options parse into the config the daemon gets."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from peerd.cli.demo import split_blocks
from peerd.cli.main import main
from peerd.cli.parser import build_parser, parse_blocks, parse_size


def test_peerd_help_runs_as_a_program() -> None:
    out = subprocess.run([sys.executable, "-m", "peerd", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("run", "bootstrap", "demo", "generate", "status", "finetune", "model"):
        assert command in out.stdout


def test_building_the_parser_imports_neither_torch_nor_hivemind() -> None:
    """Every command builds the whole parser first: were torch and hivemind imported there, even
    `peerd --help` and `peerd simulate` would take seconds (17 s cold) before doing anything."""
    code = (
        "import sys; from peerd.cli.parser import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'hivemind') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_run_options_parse() -> None:
    args = build_parser().parse_args(
        ["run", "--blocks", "3:7", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm", "--memory-budget", "6GB",
         "--max-blocks", "4", "--step-delay", "0.1", "--http-port", "0"]
    )  # fmt: skip
    assert args.blocks == (3, 7)
    assert args.memory_budget == 6 * 10**9
    assert args.max_blocks == 4 and args.step_delay == 0.1 and args.http_port == 0


@pytest.mark.parametrize("text", ["7", "3:", "5:2", "a:b", "-1:3"])
def test_bad_block_ranges_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"START:END|START < END"):
        parse_blocks(text)


def test_sizes() -> None:
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_demo_splits_blocks_evenly() -> None:
    assert split_blocks(30, 3) == [(0, 10), (10, 20), (20, 30)]
    spans = split_blocks(7, 3)
    assert spans[0][0] == 0 and spans[-1][1] == 7
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(2))


# --- which swarm to join -------------------------------------------------------------------------


def test_initial_peers_come_from_the_flag_then_the_environment_then_the_shipped_list(monkeypatch) -> None:
    from peerd.cli import helpers

    monkeypatch.delenv("PEERD_INITIAL_PEERS", raising=False)
    flag = build_parser().parse_args(["status", "--initial-peers", "/ip4/10.1.1.1/tcp/1/p2p/QmA"])
    monkeypatch.setenv("PEERD_INITIAL_PEERS", "/ip4/10.2.2.2/tcp/2/p2p/QmB,/ip4/10.3.3.3/tcp/3/p2p/QmC")
    assert helpers.resolve_initial_peers(flag) == ["/ip4/10.1.1.1/tcp/1/p2p/QmA"]
    bare = build_parser().parse_args(["status"])
    assert helpers.resolve_initial_peers(bare) == ["/ip4/10.2.2.2/tcp/2/p2p/QmB", "/ip4/10.3.3.3/tcp/3/p2p/QmC"]
    monkeypatch.delenv("PEERD_INITIAL_PEERS")
    shipped = helpers._shipped_bootstrap_peers()
    if shipped:
        assert helpers.resolve_initial_peers(bare) == shipped
    else:
        with pytest.raises(helpers.SwarmArgumentError, match="no swarm to join"):
            helpers.resolve_initial_peers(bare)


def test_run_without_a_swarm_refuses_and_says_how_to_join_or_start_one(monkeypatch, capsys) -> None:
    from peerd.cli import helpers

    monkeypatch.delenv("PEERD_INITIAL_PEERS", raising=False)
    monkeypatch.setattr(helpers, "BOOTSTRAP_LIST", helpers.BOOTSTRAP_LIST.with_name("no-such-list.txt"))
    assert main(["run", "--model", "/nonexistent"]) == 2  # refused before any model or network work
    err = capsys.readouterr().err
    assert "no swarm to join" in err and "--initial-peers" in err and "--new-swarm" in err
    assert main(["status"]) == 2
    assert "peerd bootstrap --new-swarm" in capsys.readouterr().err
    assert main(["bootstrap", "--new-swarm", "--initial-peers", "/ip4/10.1.1.1/tcp/1/p2p/QmA"]) == 2
    assert "drop one of the two" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--cache-tokens", "-5"], "--cache-tokens: -5 is out of range: must be >= 1"),
        (["run", "--max-session-length", "0"], "--max-session-length: 0 is out of range: must be >= 1"),
        (["run", "--port", "99999"], "--port: 99999 is out of range: must be >= 0 and <= 65535"),
        (["bootstrap", "--port", "-1"], "--port: -1 is out of range"),
        (["run", "--announce-period", "0"], "--announce-period: 0 is out of range: must be > 0 and <= 300"),
        (["run", "--announce-period", "301"], "--announce-period: 301 is out of range"),
        (["run", "--drain-timeout", "nan"], "--drain-timeout: nan is out of range: must be >= 0"),
        (["run", "--torch-threads", "two"], "--torch-threads: not an integer: 'two'"),
        (["generate", "hi", "--top-p", "1.5"], "--top-p: 1.5 is out of range: must be > 0 and <= 1"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
    ],
)
def test_out_of_range_numbers_are_refused_at_parse_time_with_the_range(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_numbers_in_range_parse_to_their_type() -> None:
    args = build_parser().parse_args(["run", "--port", "65535", "--drain-timeout", "0", "--cache-tokens", "1"])
    assert (args.port, args.drain_timeout, args.cache_tokens) == (65535, 0.0, 1)
    assert isinstance(args.port, int) and isinstance(args.drain_timeout, float)


def test_status_table_shows_how_each_peer_is_reached() -> None:
    from dataclasses import replace

    from peerd.cli.status import format_status
    from peerd.swarm.dht import BlockView
    from peerd.swarm.status import status_from_views
    from tests.helpers.fake_swarm import record

    home = replace(record("home", 0, 2), reach="relayed", addrs=("/ip4/10.200.0.2/tcp/1/p2p/QmR/p2p-circuit",))
    home = replace(home, uplink_bytes_per_s=2.5e6)
    public = replace(record("public", 2, 4), reach="direct", addrs=("/ip4/203.0.113.7/tcp/31330",))
    views = [BlockView(i, (home,) if i < 2 else (public,)) for i in range(4)]
    status = status_from_views("tiny", 4, views)
    assert {p["peer_id"]: p["reach"] for p in status["peers"]} == {"home": "relayed", "public": "direct"}
    lines = format_status(status).splitlines()
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split()[-1] == "REACH"
    assert next(line for line in lines if line.startswith("home")).split()[-3:] == ["20", "Mbit/s", "relayed"]
    assert next(line for line in lines if line.startswith("public")).split()[-2:] == ["-", "direct"]


def test_generating_commands_take_a_spot_check_rate_in_range() -> None:
    peer = "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"
    for command in (["generate", "--initial-peers", peer, "hi"], ["chat", "--initial-peers", peer]):
        assert build_parser().parse_args([*command, "--spot-check-rate", "0.05"]).spot_check_rate == 0.05
        assert build_parser().parse_args(command).spot_check_rate == 0.02  # on by default (docs/security.md)
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--spot-check-rate", "1.5"])
