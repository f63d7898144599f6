"""A user who cannot be served is told why, distinctly: the request is too large for this swarm (or
the model), the swarm is busy (retry later), or nobody serves the blocks; and `peerd generate` says
so in one line, as it does for a prompt that is not UTF-8 text. Real peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from peerd.rpc.errors import NoRouteError, RequestTooLargeError, SwarmBusyError
from tests.helpers.swarm import MODEL_ID

PROMPT = [4, 8, 15, 16, 23, 42]


async def test_too_large_is_named_at_once_with_the_swarms_limit_and_the_models(make_swarm) -> None:
    # a session may hold at most max(128, 1024 / 4) = 256 tokens on these peers, and 200 positions
    swarm = await make_swarm([(0, 3), (3, 6)], cache_tokens=1024, max_session_length=200)
    client = await swarm.client(failover_timeout_s=60.0)
    try:
        started = time.monotonic()
        with pytest.raises(RequestTooLargeError) as info:
            await client.generate(PROMPT, max_new_tokens=300, stop_on_eos=False)
        assert time.monotonic() - started < 30  # not after the 60 s wait for a route: waiting cannot help
        assert info.value.limit_tokens == 200 and info.value.needed_tokens == len(PROMPT) + 300
        assert "admit sessions of at most 200" in str(info.value)
        with pytest.raises(RequestTooLargeError, match="has a context of 2048 tokens"):
            await client.generate(PROMPT, max_new_tokens=100_000)
        # the same client, a request that fits: served (nobody was banned for the refusals)
        result = await client.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)
        assert len(result.token_ids) == 8 and not client.router.banned()
    finally:
        await client.close()


async def test_a_full_peer_makes_a_busy_error_not_a_missing_peer(make_swarm) -> None:
    # 256 cache tokens, sessions reserve 128 at a time: two fresh sessions fill the peer, and fresh
    # ones (opened, first step on its way) are not evicted for a newcomer within their grace period
    swarm = await make_swarm([(0, 6)], cache_tokens=256, evict_idle_s=3600.0)
    hog = await swarm.client()
    honest = await swarm.client(failover_timeout_s=3.0)
    held = [hog.inference_session(max_length=128) for _ in range(2)]
    try:
        for session in held:
            await session.open()
        with pytest.raises(SwarmBusyError) as info:
            await honest.generate(PROMPT, max_new_tokens=8, stop_on_eos=False)
        assert isinstance(info.value, NoRouteError)  # callers that wait for a route keep waiting on it
        assert "the swarm is busy" in str(info.value) and "retry in a moment" in str(info.value)
    finally:
        for session in held:
            await session.close()
        await hog.close()
        await honest.close()


async def test_nobody_serving_is_still_a_plain_no_route(make_swarm) -> None:
    swarm = await make_swarm([(0, 3), (3, 6)])
    client = await swarm.client(failover_timeout_s=2.0)
    try:
        await swarm.peers[1].shutdown()  # drains and announces itself offline
        client.router.view_ttl_s = 0.0
        with pytest.raises(NoRouteError) as info:
            await client.generate(PROMPT, max_new_tokens=4)
        assert type(info.value) is NoRouteError and "no live peer serves block(s) 3:6" in str(info.value)
    finally:
        await client.close()


async def _generate_cli(swarm, *args: str | bytes) -> tuple[int, str]:
    argv = ["--model", str(swarm.ckpt), "--model-id", MODEL_ID, "--initial-peers", ",".join(swarm.initial_peers)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "peerd", "generate", *argv, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


async def test_cli_prints_one_line_for_bad_prompt_and_too_many_tokens(make_swarm) -> None:
    swarm = await make_swarm([(0, 6)])
    code, err = await _generate_cli(swarm, "--raw", b"caf\xe9 au lait")
    assert code == 1 and "Traceback" not in err, err
    assert "peerd: error: the prompt is not valid UTF-8 text (byte 0xe9 at character 3)" in err
    code, err = await _generate_cli(swarm, "--raw", "--max-new-tokens", "100000", "hello")
    assert code == 1 and "Traceback" not in err, err
    assert "request too large" in err and "lower --max-new-tokens" in err
