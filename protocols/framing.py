"""Frames on a byte stream: a 4-byte big-endian body length, then a msgpack envelope.

The envelope is the map ``{"v": [major, minor], "t": "<type name>", "b": {<fields>}}``.
Decoding checks the declared length against the limit before reading or allocating
the body, checks the version before anything else in the envelope, and raises only
``ProtocolError`` for bad bytes. Tensor payloads are not copied on decode (they are
views of the frame body) and are copied once on encode (into the frame).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from protocols import _msgpack
from protocols.errors import ErrorCode, ProtocolError
from protocols.messages import Message
from protocols.version import PROTOCOL_VERSION, check_version
from protocols.wire import message_from_wire, message_to_wire

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Default limit on a frame's body (the 4 header bytes are not counted)."""
HEADER_BYTES = 4
HEADER = struct.Struct(">I")
"""The frame header: the body length as an unsigned 32-bit big-endian integer."""


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, message)


def _too_large(size: int, max_frame_bytes: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FRAME_TOO_LARGE, f"frame body of {size} bytes exceeds the limit of {max_frame_bytes}"
    )


def _envelope(msg: Message) -> dict[str, Any]:
    return {"v": list(PROTOCOL_VERSION), "t": msg.TYPE, "b": message_to_wire(msg)}


def encode_message(msg: Message) -> bytes:
    """The msgpack body of ``msg`` (no frame header). Tensor payloads are copied once."""
    return _msgpack.packb(_envelope(msg))


def encode_frame(msg: Message, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Header plus body of ``msg``; ``ProtocolError(FRAME_TOO_LARGE)`` if the body is over the limit.

    Refusing here, before sending, saves the peer from reading a frame it would refuse.
    """
    chunks, size = _msgpack.pack_chunks(_envelope(msg))
    if size > max_frame_bytes or size > 0xFFFFFFFF:
        raise _too_large(size, max_frame_bytes)
    return b"".join([HEADER.pack(size), *chunks])


def decode_message(body: bytes | memoryview, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Decode one msgpack envelope (a frame body without its header) into a message.

    Tensor ``data`` in the result are views of ``body``: keep ``body`` unchanged while the
    message is in use. Raises ProtocolError: FRAME_TOO_LARGE, MALFORMED_FRAME (bad
    msgpack, envelope shape), UNSUPPORTED_VERSION (another major version), UNKNOWN_MESSAGE,
    INVALID_MESSAGE, BAD_TENSOR.
    """
    view = memoryview(body)
    if view.nbytes > max_frame_bytes:
        raise _too_large(view.nbytes, max_frame_bytes)
    if view.nbytes == 0:
        raise _malformed("empty frame body")
    envelope = _msgpack.unpack(view)
    if type(envelope) is not dict:
        raise _malformed(f"envelope must be a map, got {type(envelope).__name__}")
    # The version comes first: a different major may change everything else.
    version = envelope.get("v")
    if type(version) is not list or len(version) != 2 or not all(type(part) is int and part >= 0 for part in version):
        raise _malformed(f'envelope "v" must be [major, minor] non-negative ints, got {version!r:.80}')
    check_version((version[0], version[1]))
    type_name, fields = envelope.get("t"), envelope.get("b")
    if type(type_name) is not str:
        raise _malformed(f'envelope "t" must be a str, got {type(type_name).__name__}')
    if type(fields) is not dict:
        raise _malformed(f'envelope "b" must be a map, got {type(fields).__name__}')
    return message_from_wire(type_name, fields)


async def read_message(reader: asyncio.StreamReader, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Read one frame from ``reader`` and decode it.

    Raises EOFError when the stream ends cleanly at a frame boundary (the normal end of a
    conversation), ProtocolError(MALFORMED_FRAME) when it ends inside a frame, and
    ProtocolError(FRAME_TOO_LARGE) as soon as a header declares a body over the limit,
    before reading it. Transport errors (ConnectionError...) pass through unchanged. No
    timeout here: wrap the call in ``asyncio.timeout``.
    """
    return decode_message(await read_frame(reader, max_frame_bytes), max_frame_bytes)


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Read one frame's body (without its 4 header bytes) and do not decode it.

    The first half of :func:`read_message`, with the same errors, for callers that also
    need the frame's size (a server counting the bytes it receives).
    """
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError("stream ended at a frame boundary") from None
        raise _malformed(f"stream ended inside a frame header ({len(exc.partial)} of 4 bytes)") from None
    (size,) = HEADER.unpack(header)
    if size > max_frame_bytes:
        raise _too_large(size, max_frame_bytes)
    return await read_body(reader, size)


READ_PIECE_BYTES = 1 << 20


async def read_body(reader: asyncio.StreamReader, size: int) -> bytes:
    """Exactly ``size`` bytes of a frame body, read in pieces of at most 1 MiB.

    ``readexactly`` lets the reader's buffer grow to the whole frame, reallocating as it goes, and then
    copies it twice; a frame that stops half-way pins that buffer. Pieces hold only what has arrived,
    allocate each byte once, and cost one join at the end: a bounded, predictable footprint per frame.
    """
    if size <= READ_PIECE_BYTES:
        try:
            return await reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise _malformed(f"stream ended inside a frame body ({len(exc.partial)} of {size} bytes)") from None
    pieces: list[bytes] = []
    remaining = size
    while remaining:
        piece = await reader.read(min(remaining, READ_PIECE_BYTES))
        if not piece:
            raise _malformed(f"stream ended inside a frame body ({size - remaining} of {size} bytes)")
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


async def write_message(
    writer: asyncio.StreamWriter, msg: Message, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> None:
    """Encode ``msg`` as one frame, write it and wait for the transport to drain."""
    writer.write(encode_frame(msg, max_frame_bytes))
    await writer.drain()


class FrameDecoder:
    """Incremental, synchronous frame parser for non-asyncio clients and fuzzing.

    ``feed`` takes any slice of the byte stream and returns the messages completed by it.
    An oversized header is refused as soon as its 4 bytes arrive. After a ProtocolError
    the stream cannot be resynchronised: every later ``feed`` / ``eof`` raises it again.
    When a bad frame follows good ones in the same ``feed``, the good messages are
    returned and the error is raised by the next call. Call ``eof`` when the stream ends:
    it raises MALFORMED_FRAME if a partial frame is buffered.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Append ``data`` and return every message it completes, in order."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        offset = 0
        try:
            while len(buffer) - offset >= HEADER_BYTES:
                (size,) = HEADER.unpack_from(buffer, offset)
                if size > self.max_frame_bytes:
                    raise _too_large(size, self.max_frame_bytes)
                end = offset + HEADER_BYTES + size
                if len(buffer) < end:
                    break
                # One copy into an owned body: the message's tensors view it, and the buffer
                # will change. The views are released before the buffer is resized below.
                with memoryview(buffer) as whole, whole[offset + HEADER_BYTES : end] as part:
                    body = bytes(part)
                offset = end
                messages.append(decode_message(body, self.max_frame_bytes))
        except ProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            if not messages:
                raise
            return messages
        del buffer[:offset]
        return messages

    def eof(self) -> None:
        """Declare the end of the stream; raise MALFORMED_FRAME if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            self._error = _malformed(f"stream ended inside a frame ({len(self._buffer)} bytes buffered)")
            raise self._error
