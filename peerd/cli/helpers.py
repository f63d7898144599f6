"""Helpers every CLI command shares: the event loop, logging, model resolution, start-up signals.

The event loop is uvloop, chosen through ``asyncio.Runner(loop_factory=...)`` -- never by mutating
a global policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from peerd.config import DEFAULT_SPOT_CHECK_RATE

if TYPE_CHECKING:
    from peerd.client import SamplingParams, SwarmClient

__all__ = [
    "BOOTSTRAP_LIST",
    "SwarmArgumentError",
    "connect_client",
    "empty_swarm_reason",
    "install_stop_handlers",
    "resolve",
    "resolve_initial_peers",
    "run_async",
    "sampling_from_args",
    "setup_logging",
    "write_ready_file",
]

# the public swarm's bootstrap multiaddrs, shipped with the package (may be empty)
BOOTSTRAP_LIST = Path(__file__).resolve().parents[1] / "data" / "bootstrap_peers.txt"


class SwarmArgumentError(ValueError):
    """The swarm to join is not named, or named in two contradicting ways."""


def _shipped_bootstrap_peers() -> list[str]:
    try:
        lines = BOOTSTRAP_LIST.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def resolve_initial_peers(args: argparse.Namespace) -> list[str]:
    """The peers to join: ``--initial-peers``, else ``$PEERD_INITIAL_PEERS``, else the shipped list.

    ``--new-swarm`` (run, bootstrap) means none, on purpose. Joining nothing without saying so is
    refused: a peer that silently starts its own swarm looks healthy while nobody can use it.
    """
    explicit = list(args.initial_peers or [])
    new_swarm = bool(getattr(args, "new_swarm", False))
    if new_swarm and explicit:
        raise SwarmArgumentError(
            "--new-swarm starts a swarm of its own, --initial-peers joins one: drop one of the two"
        )
    if new_swarm:
        return []
    peers = explicit or os.environ.get("PEERD_INITIAL_PEERS", "").replace(",", " ").split()
    peers = peers or _shipped_bootstrap_peers()
    if not peers:
        start = (
            ", or start a new swarm with --new-swarm"
            if hasattr(args, "new_swarm")
            else "; a new swarm starts with `peerd bootstrap --new-swarm` or `peerd run --new-swarm`"
        )
        raise SwarmArgumentError(
            "no swarm to join: pass --initial-peers MADDR (the line a running peer or bootstrap node printed) "
            f"or set PEERD_INITIAL_PEERS; the public bootstrap list ({BOOTSTRAP_LIST.name}) is empty{start}"
        )
    return peers


T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh uvloop event loop."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # hivemind logs every DHT hiccup at INFO/WARNING; operators care about ours
    for noisy in ("hivemind", "hivemind.dht", "hivemind.p2p"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "DEBUG" if verbose else "ERROR")


def resolve(model: str, cache_dir: str | None) -> tuple[str, Path]:
    """(model id the swarm uses, local folder) for a known model id or a path."""
    from peerd.model.registry import canonical_model_id, resolve_model

    path = resolve_model(model, Path(cache_dir) if cache_dir else None)
    return canonical_model_id(model) or path.resolve().name, path


def write_ready_file(path: str | None, data: dict[str, Any]) -> None:
    """Atomically publish start-up facts for a supervising process (demo, tests)."""
    if not path:
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def install_stop_handlers(stop: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def connect_client(args: argparse.Namespace) -> SwarmClient:
    """A client of the swarm and model the common swarm arguments name."""
    from peerd.client import SwarmClient

    client = await SwarmClient.connect(
        args.initial_peers,
        args.model,
        model_id=args.model_id,
        cache_dir=args.cache_dir,
        swarm=args.swarm,
        min_precision=getattr(args, "min_precision", None),
        spot_check_rate=getattr(args, "spot_check_rate", DEFAULT_SPOT_CHECK_RATE),
    )
    client.push = getattr(args, "push", None)
    if getattr(args, "draft_model", None):  # its vocabulary is checked when a generation starts
        from peerd.model.loading import load_local_model

        try:
            client.draft_model = load_local_model(resolve(args.draft_model, args.cache_dir)[1])  # with progress
        except BaseException:
            await client.close()
            raise
    return client


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling options every generating command shares (``parser._add_sampling_args``)."""
    from peerd.client import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id),
    )


async def empty_swarm_reason(client: SwarmClient, swarm: str, grace_s: float = 3.0) -> str | None:
    """Why nothing can be served, if no peer announces this model at all; None once one does.

    Looks for ``grace_s`` (records of a peer that just started take a moment to spread). Telling
    "the swarm is empty" apart from "the bootstrap node is unreachable" (which connecting already
    reports) saves a user the long wait for a route that cannot appear.
    """
    deadline = asyncio.get_running_loop().time() + grace_s
    while True:
        views = await client.dht.read_blocks(timeout_s=client.router.dht_timeout_s)
        if any(view.records for view in views):
            return None
        if asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.5)
    nodes = client.dht.routing_table_size()
    return (
        f"the swarm is reachable ({nodes} DHT node(s) known), but no peer announces model {client.model_id!r} "
        f"in swarm {swarm!r}: check that --swarm and --model-id match the peers', or start one with `peerd run`"
    )
