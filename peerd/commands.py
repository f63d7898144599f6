"""The async bodies of the CLI subcommands (argparse stays in cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from peerd.cli import install_stop_handlers, resolve, write_ready_file
from peerd.config import PeerConfig

__all__ = ["cmd_bootstrap", "cmd_generate", "cmd_run", "cmd_status"]

logger = logging.getLogger("peerd")


def peer_config_from_args(args: argparse.Namespace) -> PeerConfig:
    model_id, path = resolve(args.model, args.cache_dir)
    return PeerConfig(
        model_path=path,
        model_id=args.model_id or model_id,
        blocks=args.blocks,
        max_blocks=args.max_blocks,
        memory_budget_bytes=args.memory_budget,
        placement_jitter_s=args.placement_jitter,
        placement_settle_s=args.placement_settle,
        rebalance_period_s=args.rebalance_period,
        rebalance_threshold=args.rebalance_threshold,
        swarm=args.swarm,
        host=args.host,
        port=args.port,
        announce_maddrs=tuple(args.announce_maddrs),
        initial_peers=tuple(args.initial_peers),
        identity_path=Path(args.identity),
        public_name=args.name,
        device=args.device,
        dtype=args.dtype,
        torch_threads=args.torch_threads,
        cache_tokens=args.cache_tokens,
        max_session_length=args.max_session_length,
        max_sessions=args.max_sessions,
        max_sessions_per_peer=args.max_sessions_per_peer,
        max_inflight_per_peer=args.max_inflight_per_peer,
        allowed_peers=frozenset(args.allow_peers) if args.allow_peers is not None else None,
        session_idle_timeout_s=args.session_idle_timeout,
        http_port=args.http_port,
        http_host=args.http_host,
        announce_period_s=args.announce_period,
        drain_timeout_s=args.drain_timeout,
        measure_throughput=not args.no_measure,
        step_delay_s=args.step_delay,
    )


async def cmd_run(args: argparse.Namespace) -> int:
    from peerd.peer import Peer

    config = peer_config_from_args(args)
    peer = Peer(config)
    install_stop_handlers(peer.request_stop)
    try:
        await peer.startup()
        maddrs = await peer.visible_maddrs()
        assert peer.stage is not None
        print(
            f"peer {peer.peer_id} serving {config.model_id} blocks {peer.stage.start}:{peer.stage.end}",
            flush=True,
        )
        print("others can join with:  --initial-peers " + " ".join(maddrs), flush=True)
        if peer.http_port is not None:
            print(f"metrics and health page: http://{config.http_host}:{peer.http_port}/", flush=True)
        write_ready_file(
            args.ready_file,
            {
                "peer_id": peer.peer_id,
                "maddrs": maddrs,
                "http_port": peer.http_port,
                "blocks": [peer.stage.start, peer.stage.end],
                "pid": __import__("os").getpid(),
            },
        )
        await peer.serve()
    finally:
        logger.info("shutting down")
        await peer.shutdown()
    return 0


async def cmd_bootstrap(args: argparse.Namespace) -> int:
    from hivemind.p2p import P2P

    from peerd.identity import load_or_create_identity
    from peerd.model.config import ModelConfig
    from peerd.swarm.dht import SwarmDHT
    from peerd.swarm.records import swarm_prefix

    model_id, path = resolve(args.model, args.cache_dir)
    model_id = args.model_id or model_id
    num_blocks = ModelConfig.from_pretrained(path).num_layers
    identity = Path(args.identity).expanduser()
    key = load_or_create_identity(identity)
    p2p = await P2P.create(
        initial_peers=args.initial_peers or None,
        host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"],
        identity_path=str(identity),
        check_if_identity_free=False,
    )
    stop = asyncio.Event()
    install_stop_handlers(stop.set)
    try:
        dht = await SwarmDHT.create(
            p2p,
            private_key=key,
            prefix=swarm_prefix(args.swarm, model_id),
            num_blocks=num_blocks,
            initial_peers=args.initial_peers,
        )
        try:
            maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
            print(f"bootstrap node {p2p.peer_id} for swarm {args.swarm!r}, model {model_id}", flush=True)
            print("peers join with:  --initial-peers " + " ".join(maddrs), flush=True)
            write_ready_file(args.ready_file, {"peer_id": str(p2p.peer_id), "maddrs": maddrs})
            await stop.wait()
        finally:
            await dht.shutdown()
    finally:
        await p2p.shutdown()
    return 0


async def _connect(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from peerd.client import SwarmClient

    model_id, path = resolve(args.model, args.cache_dir)
    return await SwarmClient.connect(args.initial_peers, path, model_id=args.model_id or model_id, swarm=args.swarm)


async def cmd_generate(args: argparse.Namespace) -> int:
    from peerd.client import SamplingParams
    from peerd.model.chat import chat_prompt_ids

    client = await _connect(args)
    try:
        route = await client.wait_for_route()
        print("route: " + " -> ".join(str(s) for s in route), file=sys.stderr, flush=True)
        prompt = args.prompt if args.raw or client.tokenizer is None else chat_prompt_ids(client.tokenizer, args.prompt)
        adapter = None
        if args.adapter:
            from peerd.client.adapters import ClientAdapter

            adapter = ClientAdapter.load(args.adapter, client.head)
        result = await client.generate(
            prompt,
            max_new_tokens=args.max_new_tokens,
            sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
            on_text=lambda piece: print(piece, end="", flush=True),
            adapter=adapter,
        )
        print(flush=True)
        print(
            f"[{len(result.token_ids)} tokens, first token after {result.time_to_first_token_s * 1e3:.0f} ms, "
            f"{result.tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    finally:
        await client.close()
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    from peerd.status import format_status, gather_status

    client = await _connect(args)
    try:
        status = await gather_status(client)
    finally:
        await client.close()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if not status["gaps"] else 3
