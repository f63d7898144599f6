"""`peerd run`: build the peer's config from the arguments, start the daemon, serve until stopped."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from peerd.cli.helpers import install_stop_handlers, resolve, write_ready_file
from peerd.config import PeerConfig

__all__ = ["cmd_run", "peer_config_from_args"]

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
        reachability=args.reachability,
        initial_peers=tuple(args.initial_peers),
        identity_path=Path(args.identity),
        public_name=args.name,
        device=args.device,
        dtype=args.dtype,
        quant=args.quant,
        torch_threads=args.torch_threads,
        cache_tokens=args.cache_tokens,
        max_session_length=args.max_session_length,
        max_sessions=args.max_sessions,
        max_sessions_per_peer=args.max_sessions_per_peer,
        max_inflight_per_peer=args.max_inflight_per_peer,
        allowed_peers=frozenset(args.allow_peers) if args.allow_peers is not None else None,
        session_idle_timeout_s=args.session_idle_timeout,
        evict_idle_s=args.evict_idle,
        http_port=args.http_port,
        http_host=args.http_host,
        announce_period_s=args.announce_period,
        drain_timeout_s=args.drain_timeout,
        measure_throughput=not args.no_measure,
        step_delay_s=args.step_delay,
    )


async def cmd_run(args: argparse.Namespace) -> int:
    from peerd.daemon.peer import Peer  # torch and hivemind load only when a peer runs

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
        if args.new_swarm:
            print(f"started a new swarm {config.swarm!r}; other peers join it with:", flush=True)
            print(f"  peerd run --swarm {config.swarm} --initial-peers " + ",".join(maddrs[:2]), flush=True)
        else:
            print("others can join with:  --initial-peers " + ",".join(maddrs), flush=True)
        if peer.http_port is not None:
            print(f"metrics and health page: http://{config.http_host}:{peer.http_port}/", flush=True)
        write_ready_file(
            args.ready_file,
            {
                "peer_id": peer.peer_id,
                "maddrs": maddrs,
                "http_port": peer.http_port,
                "blocks": [peer.stage.start, peer.stage.end],
                "pid": os.getpid(),
                "reach": peer.reachability.reach,
            },
        )
        await peer.serve()
    finally:
        logger.info("shutting down")
        await peer.shutdown()
    if peer.network_lost is not None:
        raise peer.network_lost  # one line on stderr and exit status 1 (cli/main.py), for the supervisor
    return 0
