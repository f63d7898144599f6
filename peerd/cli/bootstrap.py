"""`peerd bootstrap`: a DHT-only node that other peers join through."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peerd.cli.helpers import install_stop_handlers, resolve, write_ready_file

__all__ = ["cmd_bootstrap"]


def _health_app(alive: Callable[[], bool]) -> Any:
    """``/healthz``: 200 while the node has its network (p2pd), 503 otherwise; for container checks."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def healthz(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok\n") if alive() else PlainTextResponse("no network\n", status_code=503)

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"])])


async def cmd_bootstrap(args: argparse.Namespace) -> int:
    from peerd.daemon.relaying import serve_as_relay
    from peerd.identity import load_or_create_identity, lock_identity
    from peerd.model.config import ModelConfig
    from peerd.rpc.dialback import DialBackService
    from peerd.rpc.p2pd import P2PDaemonLost, start_p2p, wait_for_p2pd_exit
    from peerd.swarm.addresses import listen_maddrs, rank_maddrs
    from peerd.swarm.dht import SwarmDHT
    from peerd.swarm.records import swarm_prefix
    from peerd.web.server import AsgiServer
    from protocols import STREAM_DIALBACK

    model_id, path = resolve(args.model, args.cache_dir)
    model_id = args.model_id or model_id
    num_blocks = ModelConfig.from_pretrained(path).num_layers
    identity = Path(args.identity).expanduser()
    lock = lock_identity(identity)  # released when this process ends, however it ends
    key = load_or_create_identity(identity)
    # a bootstrap node must be dialable: it serves dial-back tests and relays for NATed peers
    p2p = await start_p2p(
        host_maddrs=listen_maddrs(args.host, args.port), initial_peers=args.initial_peers, identity_path=str(identity)
    )
    await p2p.add_binary_stream_handler(STREAM_DIALBACK, DialBackService().handle)
    await serve_as_relay(p2p)
    stop = asyncio.Event()
    install_stop_handlers(stop.set)
    lost: P2PDaemonLost | None = None
    try:
        dht = await SwarmDHT.create(
            p2p,
            private_key=key,
            prefix=swarm_prefix(args.swarm, model_id),
            num_blocks=num_blocks,
            initial_peers=args.initial_peers,
        )
        http = AsgiServer(_health_app(lambda: p2p.is_alive)) if args.http_port is not None else None
        try:
            http_port = await http.start(args.http_host, args.http_port) if http is not None else None
            maddrs = rank_maddrs([str(m) for m in await p2p.get_visible_maddrs()])
            started = "started a new swarm" if args.new_swarm else "joined swarm"
            print(f"bootstrap node {p2p.peer_id}: {started} {args.swarm!r}, model {model_id}", flush=True)
            print("peers join with:  --initial-peers " + ",".join(maddrs), flush=True)
            write_ready_file(args.ready_file, {"peer_id": str(p2p.peer_id), "maddrs": maddrs, "http_port": http_port})
            lost = await wait_for_p2pd_exit(p2p, stop)
        finally:
            if http is not None:
                await http.close()
            if p2p.is_alive and not lost:
                with contextlib.suppress(Exception):  # bounded: a dying p2pd must not hang SIGTERM
                    await asyncio.wait_for(dht.shutdown(), 5.0)
    finally:
        await p2p.shutdown()
        lock.release()
    if lost is not None:
        raise lost  # one line on stderr and exit status 1 (cli/main.py), for the supervisor
    return 0
