"""An in-process swarm for tests: real peers (each with its own p2pd and compute thread) on
127.0.0.1 sharing the test's event loop, serving a tiny checkpoint; and clients of it.

The ``make_swarm`` fixture (tests/integration/conftest.py) builds these and shuts them down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path

from peerd.client import SwarmClient
from peerd.config import PeerConfig
from peerd.daemon.peer import Peer
from peerd.swarm.records import PeerState

__all__ = ["MODEL_ID", "Swarm"]

MODEL_ID = "tiny"


@dataclass
class Swarm:
    """In-process peers sharing the test's event loop (each still has its own p2pd and compute thread)."""

    ckpt: Path
    workdir: Path
    peers: list[Peer]
    initial_peers: tuple[str, ...] = ()
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def config(self, name: str, blocks: tuple[int, int] | None, **overrides: object) -> PeerConfig:
        base = PeerConfig(
            model_path=self.ckpt,
            model_id=MODEL_ID,
            blocks=blocks,
            identity_path=self.workdir / f"{name}.key",
            initial_peers=self.initial_peers,
            public_name=name,
            host="127.0.0.1",  # tests never listen beyond loopback
            measure_throughput=False,
            announce_period_s=5.0,
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    async def add_peer(
        self, name: str, blocks: tuple[int, int] | None, *, peer_class: type[Peer] = Peer, **overrides: object
    ) -> Peer:
        """Start a peer; ``peer_class`` injects a test-only subclass (e.g. one that lies)."""
        peer = peer_class(self.config(name, blocks, **overrides))
        self.peers.append(peer)
        await peer.startup()
        self.tasks.append(asyncio.create_task(peer.serve()))  # the re-announce loop, as `peerd run` has
        if not self.initial_peers:
            self.initial_peers = tuple(await peer.visible_maddrs())
        return peer

    async def client(self, route_spread: float = 0.0, **kwargs: object) -> SwarmClient:
        client = await SwarmClient.connect(self.initial_peers, self.ckpt, model_id=MODEL_ID, **kwargs)  # type: ignore[arg-type]
        # tests that pick "the route's" peer in advance need the planner's one best route, not a draw
        # among near-equal ones (the draw itself is tested in tests/unit/test_routing.py)
        client.router.route_spread = route_spread
        await client.wait_for_route(timeout_s=20)
        return client


async def crash(peer: Peer) -> None:
    """Make ``peer`` vanish as a killed process would: no goodbye, its p2pd gone."""
    peer.state = PeerState.OFFLINE  # so the later fixture shutdown does not announce either
    peer._stop.set()
    assert peer.p2p is not None
    await peer.p2p.shutdown()
