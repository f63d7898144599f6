"""A hostile client in its own process (as it would be on its own machine): floods one peer.

    python -m tests.integration.flooder MADDR PEER_ID CONCURRENCY MODEL_ID HIDDEN [BATCH TOKENS IDENTITIES]

Keeps CONCURRENCY forward requests of BATCH x TOKENS (default 1 x 128) in flight against PEER_ID
from each of IDENTITIES libp2p identities (default 1), each answered one replaced by the next at
once (refusals included: a flooder does not back off), until its stdin closes. Prints "ready" once
connected and, at the end, one JSON line: {reply code: count}.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys

import numpy as np
from hivemind.p2p import P2P, PeerID

from peerd.rpc.streams import STREAM_NAMES
from protocols import PROTOCOL_VERSION, Error, ForwardRequest, Hello, encode_array, encode_frame, read_message


async def main(
    maddr: str, peer_id: str, concurrency: int, model_id: str, hidden: int, batch: int, tokens: int, identities: int
) -> None:
    p2ps = [await P2P.create(initial_peers=[maddr]) for _ in range(identities)]
    request = encode_frame(Hello(PROTOCOL_VERSION, model_id, "flooder")) + encode_frame(
        ForwardRequest(encode_array(np.ones((batch, tokens, hidden), dtype=np.float32)), 0, 3)
    )
    counts: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def worker(p2p: P2P) -> None:
        while not stop.is_set():
            try:
                _, reader, writer = await p2p.call_binary_stream_handler(
                    PeerID.from_base58(peer_id), STREAM_NAMES["forward"]
                )
                try:
                    writer.write(request)
                    await writer.drain()
                    reply = await asyncio.wait_for(read_message(reader), 30)
                finally:
                    writer.close()
                counts[int(reply.code) if isinstance(reply, Error) else 0] += 1
            except Exception:
                counts[-1] += 1

    async def wait_for_stdin() -> None:
        await asyncio.to_thread(sys.stdin.read)
        stop.set()

    print("ready", flush=True)
    await asyncio.gather(wait_for_stdin(), *(worker(p2p) for p2p in p2ps for _ in range(concurrency)))
    print(json.dumps(counts), flush=True)
    for p2p in p2ps:
        await p2p.shutdown()


if __name__ == "__main__":
    maddr, peer_id, concurrency, model_id, hidden = sys.argv[1:6]
    batch, tokens, identities = (int(a) for a in (sys.argv[6:9] or ["1", "128", "1"]))
    asyncio.run(main(maddr, peer_id, int(concurrency), model_id, int(hidden), batch, tokens, identities))
