"""Every class of bad input gets its error code, while a well-behaved client keeps getting correct results."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hivemind.p2p import PeerID

from peerd.model.local import LocalModel
from peerd.rpc.streams import STREAM_NAMES
from protocols import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    ForwardRequest,
    Hello,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    read_message,
)
from tests.helpers.raw_stream import error_code as _code
from tests.helpers.raw_stream import exchange as _exchange
from tests.helpers.raw_stream import frames as _frames
from tests.helpers.raw_stream import zero_hidden as _hidden

HIDDEN = 64  # tiny model's hidden size
GOOD_HELLO = Hello(PROTOCOL_VERSION, "tiny", "hostile-test")


async def test_bad_requests_get_typed_errors_while_a_good_client_is_served(make_swarm, local_model: LocalModel) -> None:
    # no eviction of idle sessions here (tests/integration/test_cache_squatting.py covers it): the
    # cache-exhaustion part below holds two idle sessions and expects the third to be refused
    swarm = await make_swarm([(0, 2), (2, 6)], cache_tokens=256, max_session_length=128, evict_idle_s=3600.0)
    target = swarm.peers[0]
    good = await swarm.client()
    hostile = await swarm.client()
    p2p, pid = hostile.p2p, target.peer_id
    prompt = [4, 8, 15, 16, 23, 42]
    try:
        good_run = asyncio.create_task(good.generate(prompt, max_new_tokens=40, stop_on_eos=False))

        cases: list[tuple[str, str, bytes, ErrorCode]] = [
            ("garbage body", "forward", struct.pack(">I", 5) + b"\xc1" * 5, ErrorCode.MALFORMED_FRAME),
            ("oversized frame", "forward", struct.pack(">I", 1 << 30), ErrorCode.FRAME_TOO_LARGE),
            (
                "wrong model",
                "forward",
                _frames(Hello(PROTOCOL_VERSION, "other-model", "x")),
                ErrorCode.WRONG_MODEL,
            ),
            (
                "newer major version",
                "info",
                _frames(Hello((PROTOCOL_VERSION[0] + 1, 0), "tiny", "x")),
                ErrorCode.UNSUPPORTED_VERSION,
            ),
            (
                "no hello",
                "forward",
                _frames(ForwardRequest(_hidden((1, 2, HIDDEN)), 0, 2)),
                ErrorCode.UNEXPECTED_MESSAGE,
            ),
            (
                "wrong shape",
                "forward",
                _frames(GOOD_HELLO, ForwardRequest(_hidden((1, 2, HIDDEN - 1)), 0, 2)),
                ErrorCode.WRONG_SHAPE,
            ),
            (
                "wrong rank",
                "forward",
                _frames(GOOD_HELLO, ForwardRequest(_hidden((2, HIDDEN)), 0, 2)),
                ErrorCode.WRONG_SHAPE,
            ),
            (
                "wrong dtype",
                "forward",
                _frames(GOOD_HELLO, ForwardRequest(_hidden((1, 2, HIDDEN), "int64"), 0, 2)),
                ErrorCode.WRONG_DTYPE,
            ),
            (
                "blocks not served",
                "forward",
                _frames(GOOD_HELLO, ForwardRequest(_hidden((1, 2, HIDDEN)), 0, 6)),
                ErrorCode.BLOCKS_NOT_SERVED,
            ),
            (
                "too many tokens",
                "forward",
                _frames(GOOD_HELLO, ForwardRequest(_hidden((1, 9000, HIDDEN)), 0, 2)),
                ErrorCode.REQUEST_TOO_LARGE,
            ),
            (
                "unknown session",
                "inference",
                _frames(GOOD_HELLO, InferenceStep(_hidden((1, 1, HIDDEN)), 0, 1)),
                ErrorCode.UNKNOWN_SESSION,
            ),
            (
                "over-limit length",
                "inference",
                _frames(GOOD_HELLO, InferenceOpen(b"s" * 16, 0, 2, 129, 1)),
                ErrorCode.SESSION_TOO_LONG,
            ),
        ]
        for name, rpc, payload, expected in cases:
            reply = await _exchange(p2p, pid, rpc, payload)
            assert _code(reply) == expected, name

        result = await good_run
        assert result.token_ids == local_model.generate_greedy(prompt, 40, eos_token_ids=[])

        # cache exhaustion: 256 tokens of budget; two sessions of 128 fit, the third is refused. The
        # good client's session ends when its close frame arrives, over another connection: wait for it
        deadline = asyncio.get_running_loop().time() + 10
        while target.servicer.sessions:
            assert asyncio.get_running_loop().time() < deadline, "the good client's session stayed open"
            await asyncio.sleep(0.05)
        held = []
        for i in range(2):
            _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(pid), STREAM_NAMES["inference"])
            writer.write(_frames(GOOD_HELLO, InferenceOpen(bytes([i]) * 16, 0, 2, 128, 1)))
            await writer.drain()
            held.append((reader, writer))
            assert isinstance(await asyncio.wait_for(read_message(reader), 10), InferenceOpened)
        reply = await _exchange(p2p, pid, "inference", _frames(GOOD_HELLO, InferenceOpen(b"z" * 16, 0, 2, 8, 1)))
        assert _code(reply) == ErrorCode.CACHE_FULL

        # a bad step inside an open session is answered and the session survives
        reader, writer = held[0]
        writer.write(_frames(InferenceStep(_hidden((1, 1, HIDDEN + 1)), 0, 1)))
        await writer.drain()
        assert _code(await asyncio.wait_for(read_message(reader), 10)) == ErrorCode.WRONG_SHAPE
        writer.write(_frames(InferenceStep(_hidden((1, 3, HIDDEN)), 0, 2)))
        await writer.drain()
        ok = await asyncio.wait_for(read_message(reader), 10)
        assert not isinstance(ok, Error)
        for _, writer in held:
            writer.close()

        # closed streams free their cache: the budget is whole again
        deadline = asyncio.get_running_loop().time() + 10
        while target.servicer.budget.used_tokens:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert not target.servicer.sessions
        again = await good.generate(prompt, max_new_tokens=8, stop_on_eos=False)
        assert again.token_ids == result.token_ids[:8]
    finally:
        await good.close()
        await hostile.close()


# the idle timer starts when the server sends InferenceOpened; the test checks the reservation right
# after reading it, so the timeout is long enough that a busy machine does not expire it first
@pytest.mark.parametrize("idle_timeout_s", [2.0])
async def test_idle_session_expires_and_frees_its_cache(make_swarm, idle_timeout_s: float) -> None:
    swarm = await make_swarm([(0, 6)], session_idle_timeout_s=idle_timeout_s)
    peer = swarm.peers[0]
    client = await swarm.client()
    try:
        _, reader, writer = await client.p2p.call_binary_stream_handler(
            PeerID.from_base58(peer.peer_id), STREAM_NAMES["inference"]
        )
        writer.write(_frames(GOOD_HELLO, InferenceOpen(b"i" * 16, 0, 6, 32, 1)))
        await writer.drain()
        assert isinstance(await asyncio.wait_for(read_message(reader), 10), InferenceOpened)
        assert peer.servicer.budget.used_tokens == 32
        reply = await asyncio.wait_for(read_message(reader), 10)  # sent when the idle timer fires
        assert _code(reply) == ErrorCode.SESSION_EXPIRED
        assert peer.servicer.budget.used_tokens == 0 and not peer.servicer.sessions
        writer.close()
    finally:
        await client.close()
