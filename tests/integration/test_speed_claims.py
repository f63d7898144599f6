"""A peer lying about its speed (docs/security.md, "Claims are measured"): it announces 1e9 tokens/s
and takes 0.3 s per step. A fresh client caps the unmeasured claim at 4x the view's median, and once
it has timed the liar's steps it moves the session to an honest peer and bans the liar."""

from __future__ import annotations

from peerd.client.claims import CLAIM_CAP_FACTOR, MIN_SAMPLES
from peerd.daemon.capacity import Capacity
from peerd.daemon.peer import Peer
from peerd.model.local import LocalModel

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
