"""Frame I/O of the handlers: read and answer under the peer's limits and deadlines, count bytes,
encode results, and close streams without cutting the last answer short."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import torch

from peerd.rpc.streams import drain_within
from peerd.rpc.tensors import to_wire
from peerd.server.bounds import CURRENT_STREAM
from peerd.server.limits import Limits
from peerd.server.metrics import PeerMetrics
from protocols import (
    HEADER_BYTES,
    Compression,
    ErrorCode,
    Message,
    ProtocolError,
    WireTensor,
    decode_message,
    error_from_exception,
    frame_parts,
    read_body,
    read_frame,
    write_parts,
)

__all__ = [
    "LINGER_S",
    "linger_and_close",
    "read_request",
    "result_to_wire",
    "send_error",
    "send_frame",
    "send_message",
]

LINGER_S = 2.0  # how long a finished stream waits for the client to close its end


async def read_request(
    reader: asyncio.StreamReader, limits: Limits, metrics: PeerMetrics, timeout_s: float | None = None
) -> Message:
    """The next message, within ``timeout_s`` (default: the request deadline) and the frame limit."""
    async with asyncio.timeout(timeout_s or limits.request_timeout_s):
        body = await _read_body(reader, limits.max_frame_bytes)
    metrics.bytes_in.inc(HEADER_BYTES + len(body))
    return decode_message(body, limits.max_frame_bytes)


async def _read_body(reader: asyncio.StreamReader, max_frame_bytes: int) -> bytes:
    """One frame's body, its declared size charged to the stream's owner while it arrives.

    Outside a gated stream (an in-memory test stream) this is plain :func:`read_frame`.
    """
    ticket = CURRENT_STREAM.get()
    if ticket is None:
        return await read_frame(reader, max_frame_bytes)
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError("stream ended at a frame boundary") from None
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "stream ended inside a frame header") from None
    (size,) = struct.unpack(">I", header)
    if size > max_frame_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes over the limit {max_frame_bytes}")
    charged = ticket.frames.reserve(ticket.owner, size)
    try:
        body = await read_body(reader, size)
    finally:
        ticket.frames.release(ticket.owner, charged)
    ticket.idle = False
    return body


async def send_message(writer: asyncio.StreamWriter, msg: Message, limits: Limits, metrics: PeerMetrics) -> None:
    await send_frame(writer, frame_parts([msg], limits.max_frame_bytes), limits, metrics)


async def send_frame(
    writer: asyncio.StreamWriter, parts: list[bytes | memoryview], limits: Limits, metrics: PeerMetrics
) -> None:
    """Write an encoded frame (:func:`protocols.frame_parts`) within the request deadline."""
    if writer.is_closing():
        # the stream was closed under us (client gone, or the session handed back while draining)
        raise ConnectionResetError("stream already closed")
    size = write_parts(writer, parts)
    await drain_within(writer, limits.request_timeout_s)
    metrics.bytes_out.inc(size)


async def send_error(writer: asyncio.StreamWriter, exc: ProtocolError, limits: Limits, metrics: PeerMetrics) -> None:
    """Answer with an Error frame carrying ``exc``'s code; a client already gone is not an error."""
    metrics.count_error(exc.code)
    try:
        await send_message(writer, error_from_exception(exc), limits, metrics)
    except (OSError, TimeoutError, ConnectionError, ProtocolError):
        pass  # the client is gone; nothing else to tell it


def result_to_wire(tensor: torch.Tensor, compression: Compression) -> WireTensor:
    """Encode a result with the client's compression, or float16 where blockwise8 cannot carry it.

    blockwise8 has no code for NaN or infinity, which a client can provoke by sending them (found by
    fuzzing: this was an INTERNAL error); the tensor's own compression field tells the client.
    """
    try:
        return to_wire(tensor, compression)
    except ValueError:
        if compression is not Compression.BLOCKWISE8:
            raise
        return to_wire(tensor, Compression.FLOAT16)


async def linger_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close a stream only after the client has read everything.

    p2pd resets a libp2p stream whose local end closes while bytes are still in flight, which cut a
    large backward answer mid-frame in a benchmark run. So the handler waits (bounded) for the
    client to close its side first -- our client closes right after reading the answer -- and
    discards anything else a misbehaving client sends meanwhile.
    """
    if not writer.is_closing():
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LINGER_S):
                while await reader.read(1 << 16):
                    pass
    writer.close()
