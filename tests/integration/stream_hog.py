"""A hostile client in its own process: holds as many streams, or as many half-sent frames, as it can.

    python -m tests.integration.stream_hog MADDR PEER_ID idle IDENTITIES STREAMS
    python -m tests.integration.stream_hog MADDR PEER_ID frames FRAMES FRAME_BYTES

``idle``: from each of IDENTITIES libp2p identities, opens STREAMS inference streams (no per-client
request admission there: each one holds its slot until the peer closes it), sends nothing, and reopens
each one the peer closes (after 0.2 s: the attacker's own CPU is the test machine's too).
``frames``: from one identity, opens FRAMES streams and on each sends a Hello and then a frame header
declaring FRAME_BYTES followed by half of that body, and holds the stream.
Prints "ready" once every stream has been opened (and every half frame written or refused), and at
the end (stdin closed) one JSON line of counts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import struct
import sys
from typing import Any

from hivemind.p2p import P2P, PeerID

from peerd.rpc.fdlimit import raise_open_files_limit
from peerd.rpc.streams import STREAM_NAMES
from protocols import PROTOCOL_VERSION, Error, Hello, encode_frame, read_message

HELLO = encode_frame(Hello(PROTOCOL_VERSION, "tiny", "stream-hog"))


async def _open(p2p: P2P, peer_id: str, rpc: str = "forward") -> tuple[Any, Any]:
    _, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), STREAM_NAMES[rpc]), 30
    )
    return reader, writer


async def _reply(reader: Any, counts: collections.Counter[str], timeout_s: float) -> None:
    try:
        reply = await asyncio.wait_for(read_message(reader), timeout_s)
        counts[f"code_{int(reply.code)}" if isinstance(reply, Error) else "reply"] += 1
    except TimeoutError:
        counts["held"] += 1
    except Exception:
        counts["closed"] += 1


async def idle(p2p: P2P, peer_id: str, streams: int, counts: collections.Counter[str], opened: Any) -> None:
    async def hold() -> None:
        first = True
        while True:
            try:
                reader, writer = await _open(p2p, peer_id, "inference")
            except Exception:
                counts["open_failed"] += 1
                await asyncio.sleep(0.2)
                continue
            counts["opened"] += 1
            if first:
                first = False
                opened.release()
            await _reply(reader, counts, 3600)  # returns when the peer answers or closes it
            writer.close()
            await asyncio.sleep(0.2)

    await asyncio.gather(*(hold() for _ in range(streams)))


async def half_frame(p2p: P2P, peer_id: str, frame_bytes: int, counts: collections.Counter[str]) -> Any:
    reader, writer = await _open(p2p, peer_id)
    counts["opened"] += 1
    try:
        writer.write(HELLO + struct.pack(">I", frame_bytes))
        half = bytes(1 << 20)
        for _ in range(frame_bytes // 2 >> 20):
            writer.write(half)
            await asyncio.wait_for(writer.drain(), 30)
        counts["half_sent"] += 1
    except Exception:
        counts["write_failed"] += 1
    await _reply(reader, counts, 2.0)  # a refusal comes at once; an admitted frame waits for the rest
    return writer


async def main(maddr: str, peer_id: str, mode: str, a: int, b: int) -> None:
    raise_open_files_limit()
    counts: collections.Counter[str] = collections.Counter()
    tasks: list[asyncio.Future[Any]] = []
    if mode == "idle":
        p2ps = [await P2P.create(initial_peers=[maddr]) for _ in range(a)]
        opened = asyncio.Semaphore(0)
        tasks = [asyncio.ensure_future(idle(p2p, peer_id, b, counts, opened)) for p2p in p2ps]
        for _ in range(a * b):
            await asyncio.wait_for(opened.acquire(), 120)
        writers: list[Any] = []
    else:
        p2ps = [await P2P.create(initial_peers=[maddr])]
        writers = list(await asyncio.gather(*(half_frame(p2ps[0], peer_id, b, counts) for _ in range(a))))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    print(json.dumps(counts), flush=True)
    for task in tasks:
        task.cancel()
    for writer in writers:
        writer.close()
    for p2p in p2ps:
        await p2p.shutdown()


if __name__ == "__main__":
    maddr, peer_id, mode, a, b = sys.argv[1:6]
    asyncio.run(main(maddr, peer_id, mode, int(a), int(b)))
