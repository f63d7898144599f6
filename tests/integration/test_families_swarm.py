"""The newer families served by a real swarm: Gemma 3 (sliding and global blocks, its client head)
and Mixtral (routed experts) generate through peers on 127.0.0.1 exactly as the whole model does in
one process, also when the peer of the first span vanishes mid-generation (failover replays its
inputs to a replica)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerd.client.speculative import Speculation
from peerd.model.loading import load_local_model
from tests.helpers.swarm import generate_through_a_crash
from tests.helpers.tiny_model import make_family_checkpoint

PROMPT = [1, 70, 71, 72, 73, 74, 75, 76]  # longer than Gemma's 3-token window


@pytest.mark.parametrize("family", ["gemma3", "mixtral"])
async def test_generation_with_a_failover_equals_the_local_model(make_swarm, tmp_path: Path, family: str) -> None:
    ckpt = make_family_checkpoint(tmp_path / family, family, num_layers=6)
    expected = load_local_model(ckpt, progress=False).generate_greedy(PROMPT, 16, eos_token_ids=[])
    swarm = await make_swarm([(0, 3), (0, 3), (3, 6)], ckpt=ckpt)
    client = await swarm.client()
    # one token per step: a multi-token step could finish the generation before the crash is felt
    client.speculation = Speculation(max_draft_tokens=0)
    try:
        result, _ = await generate_through_a_crash(swarm, client, PROMPT, max_new_tokens=16, crash_after=6)
        assert result.token_ids == expected and len(result.stalls_s) == 1
    finally:
        await client.close()
