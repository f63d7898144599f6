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

if TYPE_CHECKING:
    from peerd.client import SwarmClient

__all__ = ["connect_client", "install_stop_handlers", "resolve", "run_async", "setup_logging", "write_ready_file"]

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

    model_id, path = resolve(args.model, args.cache_dir)
    return await SwarmClient.connect(args.initial_peers, path, model_id=args.model_id or model_id, swarm=args.swarm)
