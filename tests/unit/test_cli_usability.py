"""What a new user meets first: the README's commands parse as written, every option has help with
its default, and `peerd run` options can come from PEERD_* environment variables."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from peerd.cli.parser import all_parsers, build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
MADDR = "/ip4/127.0.0.1/tcp/31330/p2p/QmTestPeer"


def _readme_commands() -> list[list[str]]:
    """Every `peerd ...` command in the README's shell blocks (continuations joined, comments cut)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and (words[0].endswith("bin/peerd") or words[0] == "peerd"):
                # the README's placeholder addresses become a real-looking one
                argv = [MADDR if prev == "--initial-peers" else w for prev, w in zip(["", *words], words)]
                commands.append(argv[1:])
    return commands


def test_the_readme_commands_parse_as_written() -> None:
    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"model", "bootstrap", "run", "status", "generate", "chat", "api", "finetune"}
    for argv in commands:
        args = build_parser().parse_args(argv)  # SystemExit (a usage error) fails the test
        if argv[0] == "generate":
            assert args.initial_peers == [MADDR] and args.prompt in ("Why is the sky blue?", "...")


def test_initial_peers_takes_one_value_so_a_prompt_can_follow() -> None:
    args = build_parser().parse_args(["generate", "--initial-peers", f"{MADDR},{MADDR}2", "Why?"])
    assert args.initial_peers == [MADDR, MADDR + "2"] and args.prompt == "Why?"
    args = build_parser().parse_args(["generate", "--initial-peers", MADDR, "--initial-peers", MADDR + "2", "Why?"])
    assert args.initial_peers == [MADDR, MADDR + "2"]


def test_every_option_has_help_and_help_shows_defaults() -> None:
    parser = build_parser()
    for command in all_parsers(parser):
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
                continue
            assert action.help, f"{command.prog}: {action.option_strings or action.dest} has no help text"
    run_help = " ".join(next(p for p in all_parsers(parser) if p.prog.endswith(" run")).format_help().split())
    assert "(default: 60.0)" in run_help  # --session-idle-timeout
    assert "(default: 64)" in run_help  # --max-sessions


def test_run_options_come_from_peerd_environment_variables(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PEERD_MAX_SESSIONS", "5")
    monkeypatch.setenv("PEERD_NO_MEASURE", "yes")
    monkeypatch.setenv("PEERD_ALLOW_PEERS", "QmA,QmB")
    monkeypatch.setenv("PEERD_MEMORY_BUDGET", "2GB")
    monkeypatch.setenv("PEERD_REACHABILITY", "relayed")
    args = build_parser().parse_args(["run"])
    assert (args.max_sessions, args.no_measure, args.allow_peers) == (5, True, ["QmA", "QmB"])
    assert args.memory_budget == 2 * 10**9 and args.reachability == "relayed"
    assert build_parser().parse_args(["run", "--max-sessions", "7"]).max_sessions == 7  # a flag wins

    monkeypatch.setenv("PEERD_MAX_SESSIONS", "0")
    with pytest.raises(SystemExit):
        build_parser()
    assert "$PEERD_MAX_SESSIONS" in capsys.readouterr().err
    monkeypatch.setenv("PEERD_MAX_SESSIONS", "5")
    monkeypatch.setenv("PEERD_REACHABILITY", "sometimes")
    with pytest.raises(SystemExit):
        build_parser()
    assert "$PEERD_REACHABILITY" in capsys.readouterr().err
