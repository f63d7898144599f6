"""Fixtures that start real peers (real p2pd, real hivemind DHT) on 127.0.0.1 with a tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from peerd.client import SwarmClient
from peerd.config import PeerConfig
from peerd.daemon.peer import Peer
from peerd.model.loading import load_local_model
from peerd.model.local import LocalModel
from tests.helpers.tiny_model import make_tiny_checkpoint

MODEL_ID = "tiny"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", num_layers=6)


@pytest.fixture(scope="session")
def local_model(tiny_ckpt: Path) -> LocalModel:
    return load_local_model(tiny_ckpt, progress=False)


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

    async def client(self, **kwargs: object) -> SwarmClient:
        client = await SwarmClient.connect(self.initial_peers, self.ckpt, model_id=MODEL_ID, **kwargs)  # type: ignore[arg-type]
        await client.wait_for_route(timeout_s=20)
        return client


@pytest.fixture
async def make_swarm(tiny_ckpt: Path, tmp_path: Path) -> AsyncIterator[object]:
    swarms: list[Swarm] = []

    async def factory(spans: Sequence[tuple[int, int]] = ((0, 2), (2, 4), (4, 6)), **overrides: object) -> Swarm:
        swarm = Swarm(tiny_ckpt, tmp_path, [])
        swarms.append(swarm)
        for i, span in enumerate(spans):
            await swarm.add_peer(f"peer{i}", span, **overrides)
        return swarm

    yield factory
    for swarm in swarms:
        for peer in swarm.peers:
            await peer.shutdown()
        await asyncio.gather(*swarm.tasks)
