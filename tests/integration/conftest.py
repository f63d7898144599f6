"""Fixtures that start real peers (real p2pd, real hivemind DHT) on 127.0.0.1 with a tiny model.

The in-process swarm itself is ``tests.helpers.swarm.Swarm``; these fixtures build and clean it up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from peerd.model.loading import load_local_model
from peerd.model.local import LocalModel
from tests.helpers.swarm import MODEL_ID, Swarm
from tests.helpers.tiny_model import make_tiny_checkpoint

__all__ = ["MODEL_ID", "Swarm"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", num_layers=6)


@pytest.fixture(scope="session")
def local_model(tiny_ckpt: Path) -> LocalModel:
    return load_local_model(tiny_ckpt, progress=False)


@pytest.fixture
async def make_swarm(tiny_ckpt: Path, tmp_path: Path) -> AsyncIterator[object]:
    swarms: list[Swarm] = []

    async def factory(
        spans: Sequence[tuple[int, int]] = ((0, 2), (2, 4), (4, 6)), *, ckpt: Path | None = None, **overrides: object
    ) -> Swarm:
        swarm = Swarm(ckpt or tiny_ckpt, tmp_path, [])
        swarms.append(swarm)
        for i, span in enumerate(spans):
            await swarm.add_peer(f"peer{i}", span, **overrides)
        return swarm

    yield factory
    for swarm in swarms:
        for peer in swarm.peers:
            await peer.shutdown()
        await asyncio.gather(*swarm.tasks)
