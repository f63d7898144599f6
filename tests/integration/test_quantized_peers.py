"""Quantized peers in a real swarm (tiny model, peers on 127.0.0.1): what they announce, how a
client that asks for a minimum precision routes around them, and spot checks that tell an honest
quantized peer (never banned) from a lying one (banned), at the same precision or across precisions.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from peerd.client.routing import Span
from peerd.client.verify import relative_errors, tolerance_for
from peerd.daemon.peer import Peer
from peerd.model import LocalModel
from protocols import Compression

PROMPT = [1, 40, 41, 42, 43, 44, 45]


class _Perturbed:
    """Wraps a stage so that every output is off by ``scale`` x its own spread (a test-only liar)."""

    def __init__(self, stage: Any, scale: float) -> None:
        self._stage, self._scale = stage, scale

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self._stage.forward(hidden, *args, **kwargs)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
        return out + self._scale * out.std() * noise.to(out.dtype)


def lying_peer(scale: float) -> type[Peer]:
    class LyingPeer(Peer):
        async def startup(self) -> None:
            await super().startup()
            assert self.servicer is not None
            self.servicer.stage = _Perturbed(self.servicer.stage, scale)  # type: ignore[assignment]

    return LyingPeer


async def _span(client: Any, peer: Peer) -> Span:
    record = (await client.servers(refresh=True))[peer.peer_id]
    return Span(peer.peer_id, 0, 6, record)


async def test_quantized_peers_announce_it_and_min_precision_routes_around_them(
    make_swarm: Any, local_model: LocalModel
) -> None:
    swarm = await make_swarm([(0, 6)])
    full = swarm.peers[0]
    small = await swarm.add_peer("nf4", (0, 6), quant="nf4")
    client = await swarm.client()
    try:
        records = await client.servers(refresh=True)
        assert (records[small.peer_id].quant, records[full.peer_id].quant) == ("nf4", "none")
        info = await client.peers.info(small.peer_id)
        assert info.extra["quant"] == "nf4"
        assert info.extra["weight_bytes"] < 0.25 * (await client.peers.info(full.peer_id)).extra["weight_bytes"]
        client.min_precision = "int8"
        assert set(await client.servers(refresh=True)) == {full.peer_id}
        result = await client.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 8, eos_token_ids=())
        client.min_precision = None
        client.allowed_peers = {small.peer_id}  # only the 4-bit peer: it serves, honestly approximate
        quantized = await client.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)
        assert len(quantized.token_ids) == 8
        with pytest.raises(ValueError, match="min_precision must be one of"):
            client.min_precision = "int3"
    finally:
        await client.close()


async def test_an_honest_quantized_peer_passes_a_check_by_a_full_precision_peer(make_swarm: Any) -> None:
    swarm = await make_swarm([(0, 6)])
    full = swarm.peers[0]
    honest = await swarm.add_peer("nf4", (0, 6), quant="nf4")
    client = await swarm.client()
    try:
        hidden = client.head.embed(torch.tensor([PROMPT]))
        out = await client.peers.forward(honest.peer_id, hidden, 0, 6)
        reference = await client.peers.forward(full.peer_id, hidden, 0, 6)
        # 4-bit weights are honestly this far from float32: a float32-only tolerance would call it a lie
        assert float(relative_errors(out, reference).max()) > 10 * tolerance_for(["float32"], Compression.NONE)
        verdict = await client.checker.verify(await _span(client, honest), hidden, out)
        assert verdict.checked and not verdict.span_peer_wrong and verdict.incident is None
        assert honest.peer_id not in client.router.banned()
        # a liar at the same 4-bit precision, too far off for any precision: the float32 peer catches it
        liar = await swarm.add_peer("liar", (0, 6), quant="nf4", peer_class=lying_peer(3.0))
        client.allowed_peers = {full.peer_id, liar.peer_id}
        lie = await client.peers.forward(liar.peer_id, hidden, 0, 6)
        verdict = await client.checker.verify(await _span(client, liar), hidden, lie)
        assert verdict.span_peer_wrong and verdict.incident is not None
        assert liar.peer_id in client.router.banned() and full.peer_id in client.router.banned()  # no judge
    finally:
        await client.close()


@pytest.mark.parametrize("quant", ["nf4", "int4"])
async def test_a_subtle_liar_is_caught_by_a_recomputation_at_its_own_precision(make_swarm: Any, quant: str) -> None:
    swarm = await make_swarm([(0, 6)])
    full = swarm.peers[0]
    honest = await swarm.add_peer(quant, (0, 6), quant=quant)
    # off by less than 4-bit weights are honestly off from float32: only a same-precision check sees it
    liar = await swarm.add_peer("liar", (0, 6), quant=quant, peer_class=lying_peer(0.05))
    client = await swarm.client(spot_check_local_blocks=6)  # the client judges, at the peer's precision
    try:
        hidden = client.head.embed(torch.tensor([PROMPT]))
        lie = await client.peers.forward(liar.peer_id, hidden, 0, 6)
        reference = await client.peers.forward(full.peer_id, hidden, 0, 6)
        cross = tolerance_for(["float32"], Compression.NONE, [quant, "none"])
        assert float(relative_errors(lie, reference).max()) < cross  # a float32 check alone would pass it
        verdict = await client.checker.verify(await _span(client, liar), hidden, lie)
        assert verdict.span_peer_wrong and verdict.incident is not None
        assert verdict.incident.verdict == "lied" and verdict.incident.peer_ids == (liar.peer_id,)
        banned = client.router.banned()
        assert liar.peer_id in banned and honest.peer_id not in banned and full.peer_id not in banned
        # the honest 4-bit peer, checked the same way, stays in good standing
        out = await client.peers.forward(honest.peer_id, hidden, 0, 6)
        verdict = await client.checker.verify(await _span(client, honest), hidden, out)
        assert verdict.checked and not verdict.span_peer_wrong
        assert honest.peer_id not in client.router.banned()
    finally:
        await client.close()


async def test_a_quantized_peer_places_more_blocks_in_the_same_memory_budget(make_swarm: Any) -> None:
    # Without --blocks a peer hosts what fits its --memory-budget at the *measured* size of one of
    # its blocks: float32 fits 2 blocks of the tiny model here, nf4 (about 1/5 of the bytes) all 6.
    swarm = await make_swarm([(0, 6)])
    budget = dict(memory_budget_bytes=600_000, cache_tokens=256, placement_jitter_s=0.0, placement_settle_s=0.1)
    full = await swarm.add_peer("full", None, **budget)
    small = await swarm.add_peer("nf4", None, quant="nf4", **budget)
    assert full.capacity is not None and small.capacity is not None
    assert small.capacity.block_weight_bytes < 0.3 * full.capacity.block_weight_bytes
    hosted = {p.config.quant: p.blocks[1] - p.blocks[0] for p in (full, small)}
    # the nf4 probe block counts bitsandbytes' shared code books once more per block, so 5 or 6 fit
    assert hosted["none"] == 2 and hosted["nf4"] >= 5, hosted
    # measured after loading: what placement predicted from the probe block, less the code books that
    # bitsandbytes shares between layers (the probe, alone, counts them once per block)
    assert small.stage is not None
    blocks = hosted["nf4"]
    assert 0.7 * blocks * small.capacity.block_weight_bytes < small.stage.weight_bytes
    assert small.stage.weight_bytes <= blocks * small.capacity.block_weight_bytes
