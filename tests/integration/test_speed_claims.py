"""A peer lying about its speed (docs/security.md, "Claims are measured"): it announces 1e9 tokens/s
and takes 0.3 s per step. A fresh client caps the unmeasured claim at 4x the view's median, and once
it has timed the liar's steps it moves the session to an honest peer and bans the liar."""

from __future__ import annotations

import time
from typing import Any

from peerd.cli.status import format_status, gather_status
from peerd.client.claims import CLAIM_CAP_FACTOR, MIN_SAMPLES
from peerd.daemon.capacity import Capacity
from peerd.daemon.peer import Peer
from peerd.daemon.routes import swarm_document
from peerd.model.local import LocalModel
from peerd.rpc.speedprobe import SpeedProbe, forward_one_token
from peerd.rpc.transport import PeerClient
from tests.helpers.swarm import MODEL_ID

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
NEW_TOKENS = 30
STEP_DELAY_S = 0.3  # the liar's real speed: 6 blocks per 0.3 s, 20 tokens/s per block


class BraggingPeer(Peer):
    """Serves correctly, but announces 1e9 tokens/s per block and adds STEP_DELAY_S to every step."""

    async def startup(self) -> None:
        await super().startup()
        assert self.servicer is not None
        self.capacity = Capacity(decode_tokens_per_s=1e9, prefill_tokens_per_s=1e9)
        self.servicer.step_delay_s = STEP_DELAY_S
        await self.announce()


async def test_a_peer_lying_about_its_speed_is_capped_measured_left_and_banned(
    make_swarm, local_model: LocalModel
) -> None:
    swarm = await make_swarm([(0, 6)])
    honest = swarm.peers[0]
    liar = await swarm.add_peer("liar", (0, 6), peer_class=BraggingPeer)
    client = await swarm.client()
    try:
        servers = await client.router.servers(refresh=True)
        assert servers[liar.peer_id].decode_tokens_per_s == 1e9
        # unmeasured: the claim counts for no more than a few times the median claim (the honest one's)
        planned = client.router.speeds.planning_speeds(servers)
        assert planned[liar.peer_id] == CLAIM_CAP_FACTOR * servers[honest.peer_id].decode_tokens_per_s
        # with RTTs this small the capped claim wins; equal-ish RTTs set by hand make that certain
        client.rtts_ms[liar.peer_id], client.rtts_ms[honest.peer_id] = 1.0, 5.0
        result = await client.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, NEW_TOKENS, eos_token_ids=[])
        assert [s.peer_id for s in result.route] == [honest.peer_id]
        assert liar.peer_id in client.router.banned()
        assert liar.metrics.tokens.labels(phase="decode")._value.get() <= MIN_SAMPLES  # left after measuring
        observed = client.router.speeds.observed(liar.peer_id)
        # 6 blocks x 1-8 tokens per 0.3 s step: tens to a few hundred tokens/s per block, never 1e9
        assert observed is not None and observed < 1000
        print(f"\nliar: claims 1e9, observed {observed:.0f} tokens/s per block; left after {MIN_SAMPLES} steps")
        # once measured, planning uses what was seen, not what is claimed, even after the ban ends
        client.router.bans.forgive(liar.peer_id)
        route = await client.router.plan_inference(0, 6, 64)
        assert [s.peer_id for s in route] == [honest.peer_id]
    finally:
        await client.close()


class _SlowStage:
    """A stage whose every forward sleeps ``delay_s`` in the compute thread: a really slow machine."""

    def __init__(self, stage: Any, delay_s: float) -> None:
        self._stage, self._delay_s = stage, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stage, name)

    def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self._delay_s)
        return self._stage.forward(hidden, *args, **kwargs)


class SlowBraggingPeer(Peer):
    """Announces 1e9 tokens/s per block; every forward (inference step or stateless) takes 0.3 s."""

    async def startup(self) -> None:
        await super().startup()
        assert self.servicer is not None
        self.capacity = Capacity(decode_tokens_per_s=1e9, prefill_tokens_per_s=1e9)
        self.servicer.stage = _SlowStage(self.servicer.stage, STEP_DELAY_S)  # type: ignore[assignment]
        await self.announce()


async def test_status_and_health_page_show_claimed_vs_observed_speed(make_swarm) -> None:
    swarm = await make_swarm([(0, 6)])
    honest = swarm.peers[0]
    liar = await swarm.add_peer("liar", (0, 6), peer_class=SlowBraggingPeer)
    client = await swarm.client()
    try:
        status = await gather_status(client)
        peers = {p["peer_id"]: p for p in status["peers"]}
        assert peers[liar.peer_id]["decode_tokens_per_s"] == 1e9
        # 6 blocks per >= 0.3 s: at most 20 tokens/s per block, whatever the machine
        observed_liar = peers[liar.peer_id]["observed_tokens_per_s"]
        assert observed_liar is not None and 0 < observed_liar <= 6 / STEP_DELAY_S
        assert peers[honest.peer_id]["observed_tokens_per_s"] is not None
        line = next(row for row in format_status(status).splitlines() if row.startswith("liar"))
        assert line.split()[4:6] == ["1000000000", f"{observed_liar:.0f}"]  # CLAIMED, OBSERVED
        unprobed = await gather_status(client, probe=False)
        assert all("observed_tokens_per_s" not in p for p in unprobed["peers"])

        # the health page of the honest peer measures the same way, from the peer
        forwarder = PeerClient(honest.p2p, MODEL_ID, timeout_s=5.0)
        doc = await swarm_document(
            honest, speed=SpeedProbe(forward_one_token(forwarder, honest.model_config.hidden_size))
        )
        page = {p["peer_id"]: p for p in doc["models"][0]["peers"]}
        assert page[liar.peer_id]["decode_tokens_per_s"] == 1e9
        assert 0 < page[liar.peer_id]["observed_tokens_per_s"] <= 6 / STEP_DELAY_S
        assert page[honest.peer_id]["observed_tokens_per_s"] is None  # itself: not probed
        print(f"\nliar claims 1e9 tokens/s per block; observed by status {observed_liar:.1f}, by the page "
              f"{page[liar.peer_id]['observed_tokens_per_s']:.1f}; honest observed "
              f"{peers[honest.peer_id]['observed_tokens_per_s']:.0f}")  # fmt: skip
    finally:
        await client.close()
