"""Two p2pd peers that contact each other at the same moment connect at once, not after libp2p's dial backoff."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hivemind.p2p import P2P, PeerID

from peerd.rpc.p2pd import connect_in_turn, is_connected

PAIRS = 40  # with both dialling at once, about 1 first contact in 30 failed on loopback (3 of 90)
YIELD_S = 0.5


async def _echo(_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(4))
    await writer.drain()
    writer.close()


async def _fresh_pair() -> tuple[P2P, P2P, list[str], list[str]]:
    a, b = [await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"]) for _ in range(2)]
    for p in (a, b):
        await p.add_binary_stream_handler("echo", _echo)
    addrs = [[str(m) for m in await p.get_visible_maddrs()] for p in (a, b)]
    return a, b, addrs[0], addrs[1]


async def _contact(me: P2P, peer_id: str, addrs: list[str]) -> float:
    """Connect in turn, then one echo over a stream; the seconds it took."""
    started = time.perf_counter()
    await connect_in_turn(me, peer_id, addrs, yield_s=YIELD_S)
    for attempt in range(2):
        _, reader, writer = await me.call_binary_stream_handler(PeerID.from_base58(peer_id), "echo")
        writer.write(b"ping")
        await writer.drain()
        try:
            assert await reader.readexactly(4) == b"ping"
            break
        except asyncio.IncompleteReadError:
            # One stream of 40 pairs came back empty in a CI run on a slow 2-core box: a stream opened
            # as the two daemons settled on one connection. What this test bounds is the dial (no
            # backoff); a caller opens another stream, as peerd's do on a reset.
            if attempt:
                raise
        finally:
            writer.close()
    return time.perf_counter() - started


async def test_peers_contacting_each_other_at_once_never_wait_for_a_dial_backoff() -> None:
    slowest: list[float] = []
    for _ in range(PAIRS):
        a, b, a_addrs, b_addrs = await _fresh_pair()
        try:
            async with asyncio.timeout(4.0):  # a dial backoff alone is 5 s
                took = await asyncio.gather(_contact(a, str(b.peer_id), b_addrs), _contact(b, str(a.peer_id), a_addrs))
            slowest.append(max(took))
        finally:
            await asyncio.gather(a.shutdown(), b.shutdown())
    assert max(slowest) < YIELD_S, sorted(slowest)[-3:]  # the lower id's connection came before the yield ran out


async def test_the_higher_peer_id_dials_itself_when_the_lower_one_does_not() -> None:
    a, b, a_addrs, b_addrs = await _fresh_pair()
    try:
        (low, low_addrs), (high, _) = sorted([(a, a_addrs), (b, b_addrs)], key=lambda pa: str(pa[0].peer_id))
        started = time.perf_counter()
        await connect_in_turn(high, str(low.peer_id), low_addrs, yield_s=YIELD_S)
        waited = time.perf_counter() - started
        assert await is_connected(high, str(low.peer_id)) and await is_connected(low, str(high.peer_id))
        assert YIELD_S <= waited < YIELD_S + 3.0, waited
        started = time.perf_counter()  # connected now: no second wait
        await connect_in_turn(high, str(low.peer_id), low_addrs, yield_s=YIELD_S)
        assert time.perf_counter() - started < YIELD_S
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())
