"""A hostile client in its own process that squats one peer's KV cache.

    python -m tests.integration.squatter MADDR PEER_ID MODEL_ID HIDDEN SESSIONS MAX_LENGTH KEEPALIVE_S

Every trick at once: first it asks for one session of batch 4 x MAX_LENGTH (the old way to take a
whole budget in one go); then it holds SESSIONS sessions of MAX_LENGTH, each having done one token
of work, and keeps each alive with a one-token step every KEEPALIVE_S; an evicted session is
reopened at once. Prints "ready" once its sessions are open and, when its stdin closes, one JSON
line: the greedy open's reply code, evictions seen, reopens refused, keepalive steps answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import numpy as np
from hivemind.p2p import P2P, PeerID

from peerd.rpc.streams import STREAM_NAMES
from protocols import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    encode_array,
    encode_frame,
    read_message,
)

READ_TIMEOUT_S = 30.0


async def main(
    maddr: str, peer_id: str, model_id: str, hidden: int, sessions: int, max_length: int, every_s: float
) -> None:
    p2p = await P2P.create(initial_peers=[maddr])
    pid = PeerID.from_base58(peer_id)
    hello = encode_frame(Hello(PROTOCOL_VERSION, model_id, "squatter"))
    token = encode_array(np.ones((1, 1, hidden), dtype=np.float32))
    stats = {"greedy_code": 0, "evictions": 0, "refused": 0, "steps": 0}
    stop = asyncio.Event()

    async def open_session(batch: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | int:
        _, reader, writer = await p2p.call_binary_stream_handler(pid, STREAM_NAMES["inference"])
        writer.write(hello + encode_frame(InferenceOpen(os.urandom(16), 0, 6, max_length, batch)))
        await writer.drain()
        reply = await asyncio.wait_for(read_message(reader), READ_TIMEOUT_S)
        if isinstance(reply, InferenceOpened):
            return reader, writer
        writer.close()
        return int(reply.code) if isinstance(reply, Error) else -1

    greedy = await open_session(4)
    stats["greedy_code"] = greedy if isinstance(greedy, int) else 0

    async def hold(ready: asyncio.Event) -> None:
        step_id = 0
        while not stop.is_set():
            opened = await open_session(1)
            if isinstance(opened, int):
                stats["refused"] += 1
                await asyncio.sleep(0.1)
                continue
            reader, writer = opened
            ready.set()
            stopping = asyncio.ensure_future(stop.wait())
            read: asyncio.Future[object] | None = None
            try:
                while not stop.is_set():
                    step_id += 1
                    writer.write(encode_frame(InferenceStep(token, 0, step_id)))  # position 0: no growth
                    await writer.drain()
                    reply = await asyncio.wait_for(read if read is not None else read_message(reader), READ_TIMEOUT_S)
                    if isinstance(reply, Error):
                        stats["evictions"] += 1
                        break
                    stats["steps"] += 1
                    # between keepalives, listen: an eviction arrives unasked, and is answered by a reopen
                    read = asyncio.ensure_future(read_message(reader))
                    await asyncio.wait({read, stopping}, timeout=every_s, return_when=asyncio.FIRST_COMPLETED)
                    if read.done():
                        stats["evictions"] += 1
                        break
            except (EOFError, ConnectionError, OSError, asyncio.IncompleteReadError):
                stats["evictions"] += 1  # the peer closed the stream after evicting it
            finally:
                stopping.cancel()
                if read is not None and not read.done():
                    read.cancel()
                writer.close()

    readies = [asyncio.Event() for _ in range(sessions)]
    holders = [asyncio.create_task(hold(r)) for r in readies]
    await asyncio.gather(*(r.wait() for r in readies))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    stop.set()
    await asyncio.gather(*holders, return_exceptions=True)
    print(json.dumps(stats), flush=True)
    await p2p.shutdown()


if __name__ == "__main__":
    maddr, peer_id, model_id, hidden, sessions, max_length, every_s = sys.argv[1:8]
    asyncio.run(main(maddr, peer_id, model_id, int(hidden), int(sessions), int(max_length), float(every_s)))
