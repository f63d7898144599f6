"""Raw protocol frames on a peer's streams, bypassing the client SDK (for hostile-input tests)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from hivemind.p2p import PeerID

from peerd.rpc.streams import STREAM_NAMES
from protocols import Error, ErrorCode, Message, WireTensor, encode_array, encode_frame, read_message


def frames(*msgs: Message) -> bytes:
    """The bytes of ``msgs`` as consecutive frames."""
    return b"".join(encode_frame(m) for m in msgs)


def zero_hidden(shape: tuple[int, ...], dtype: str = "float32") -> WireTensor:
    """A zero tensor of ``shape``: float32, or int64 for ``dtype="int64"`` (a wrong-dtype probe)."""
    return encode_array(np.zeros(shape, dtype=np.float32 if dtype == "float32" else np.int64), dtype=dtype)


async def exchange(p2p: Any, peer_id: str, rpc: str, payload: bytes) -> Message:
    """Open ``rpc``'s stream to ``peer_id``, send raw ``payload``, return the first reply."""
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), STREAM_NAMES[rpc])
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(read_message(reader), 10)
    finally:
        writer.close()


def error_code(msg: Message) -> ErrorCode:
    """The code of an error reply (fails the test if ``msg`` is not an error)."""
    assert isinstance(msg, Error), f"expected an error frame, got {type(msg).__name__}"
    return ErrorCode(msg.code)
