"""An in-process swarm for tests: real peers (each with its own p2pd and compute thread) on
127.0.0.1 sharing the test's event loop, serving a tiny checkpoint; and clients of it.

The ``make_swarm`` fixture (tests/integration/conftest.py) builds these and shuts them down.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from peerd.client import GenerationResult, SwarmClient
from peerd.config import PeerConfig
from peerd.daemon.peer import Peer
from peerd.swarm.records import PeerState

__all__ = ["MODEL_ID", "Swarm", "crash", "generate_through_a_crash"]

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


async def generate_through_a_crash(
    swarm: Swarm, client: SwarmClient, prompt: list[int], *, max_new_tokens: int, crash_after: int
) -> tuple[GenerationResult, Peer]:
    """Generate while the first span's peer vanishes after ``crash_after`` tokens; returns the result
    and the vanished peer. The swarm's third peer must be on every route (the tail): the step after
    the crash waits there until the victim is gone, or a fast machine could finish the generation
    before its p2pd has shut down."""
    route = await client.wait_for_route()
    victim = next(p for p in swarm.peers if p.peer_id == route[0].peer_id)
    tail = swarm.peers[2]
    assert tail.runtime is not None
    gate = threading.Event()
    crashes: list[asyncio.Task[None]] = []
    seen: list[int] = []

    async def crash_then_release() -> None:
        try:
            await crash(victim)
        finally:
            gate.set()

    def on_token(token: int) -> None:
        seen.append(token)
        if len(seen) == crash_after:
            tail.runtime.submit(gate.wait, "test-gate")  # type: ignore[union-attr]
            crashes.append(asyncio.create_task(crash_then_release()))

    result = await client.generate(prompt, max_new_tokens=max_new_tokens, stop_on_eos=False, on_token=on_token)
    await asyncio.gather(*crashes)
    assert crashes, "the crash never happened"
    assert victim.peer_id not in {s.peer_id for s in result.route}
    return result, victim
