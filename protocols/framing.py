"""Frames on a byte stream: a 4-byte length, then a small msgpack header and raw payloads.

Frame: ``length`` (uint32 big-endian) | body. Body: ``header_length`` (uint32 big-endian) |
header (one msgpack map, at most MAX_HEADER_BYTES) | payloads (raw bytes, back to back).
The header is ``{"v": [major, minor], "t": "<type name>", "b": {<fields>}, "p": [<payload
lengths>]}``; a tensor field's map names its payloads by index into ``p``.

Decoding checks the declared lengths before reading or allocating anything, parses the header
with msgpack-python under strict per-type limits (the header cap bounds the object count: every
object takes at least one byte), checks the version before anything else in the envelope, and
raises only ``ProtocolError`` for bad bytes. Payloads are never copied on decode (tensors are
views of the frame body) nor on encode (:func:`frame_parts` hands the tensors' own buffers to
the writer, which sends them with scatter writes instead of joining them into one frame).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from typing import Any, NoReturn

import msgpack

from protocols.errors import ErrorCode, ProtocolError
from protocols.fields import MAX_EXTRA_ITEMS, MAX_STRING_BYTES
from protocols.messages import Message
from protocols.version import PROTOCOL_VERSION, check_version
from protocols.wire import Payloads, message_from_wire, message_to_wire

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Default limit on a frame's body (the 4 length bytes are not counted)."""
HEADER_BYTES = 4
HEADER = struct.Struct(">I")
"""The frame's length prefix: the body length as an unsigned 32-bit big-endian integer."""
MAX_HEADER_BYTES = 65536
"""Largest msgpack header of a body; so at most 65536 msgpack objects per frame."""
MAX_PAYLOADS = 64
"""Most payloads in one frame (a message has at most two tensors, each data plus scales)."""

# Payloads shorter than this are copied into the piece before them, so a decode step's frame is
# one write; longer ones are written from the tensor's own memory.
_COALESCE_BYTES = 65536
# msgpack-python's own limits: no str or bin over the longest field, no array or map over the
# largest ``extra``, no ext types at all. Ints, floats and nesting are bounded by the header cap.
_UNPACK_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": MAX_STRING_BYTES,
    "max_bin_len": MAX_STRING_BYTES,
    "max_array_len": MAX_EXTRA_ITEMS,
    "max_map_len": MAX_EXTRA_ITEMS,
    "max_ext_len": 0,
}
# A version-1 body is a bare msgpack map; a version-2 body starts with its header length, whose
# top byte is 0 for any header that fits the cap. Told apart, a v1 frame gets UNSUPPORTED_VERSION.
_V1_FIRST_BYTES = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, message)


def _too_large(size: int, max_frame_bytes: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FRAME_TOO_LARGE, f"frame body of {size} bytes exceeds the limit of {max_frame_bytes}"
    )


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    # msgpack-python keeps the last of repeated keys and accepts bin keys; we refuse both, so that
    # no two readers of one frame can disagree about what it says.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a map repeats a key")
    for key in result:
        if type(key) is not str:
            raise ValueError(f"a map key is {type(key).__name__}; only str keys are used")
    return result


# --------------------------------------------------------------------------- encoding


def _header(msg: Message, payloads: Payloads) -> bytes:
    envelope: dict[str, Any] = {"v": list(PROTOCOL_VERSION), "t": msg.TYPE, "b": message_to_wire(msg, payloads)}
    if payloads:
        envelope["p"] = [len(data) for data in payloads]
    header: bytes = msgpack.packb(envelope, use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"{msg.TYPE} header is {len(header)} bytes; at most {MAX_HEADER_BYTES}"
        )
    return header


def frame_parts(msgs: Iterable[Message], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> list[bytes | memoryview]:
    """The frames of ``msgs``, back to back, as pieces to write in order (see :func:`write_parts`).

    Payloads of 64 KiB and more are the tensors' own buffers, not copies: the transport may hold
    them after ``drain()`` returns, so never mutate a tensor once it is sent (peerd sends fresh
    activations only). Smaller pieces are joined, so a decode step's frame is one piece.
    ``ProtocolError(FRAME_TOO_LARGE)`` if a body is over the limit: refusing before sending saves
    the peer from reading a frame it would refuse.
    """
    parts: list[bytes | memoryview] = []
    small = bytearray()
    for msg in msgs:
        payloads: Payloads = []
        header = _header(msg, payloads)
        size = HEADER_BYTES + len(header) + sum(len(data) for data in payloads)
        if size > max_frame_bytes or size > 0xFFFFFFFF:
            raise _too_large(size, max_frame_bytes)
        small += HEADER.pack(size)
        small += HEADER.pack(len(header))
        small += header
        for data in payloads:
            if len(data) < _COALESCE_BYTES:
                small += data
                continue
            parts.append(bytes(small))
            small = bytearray()
            parts.append(data)
    if small:
        parts.append(bytes(small))
    return parts


def encode_frame(msg: Message, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Length prefix plus body of ``msg`` as one ``bytes`` (payloads copied once; prefer :func:`write_message`)."""
    parts = frame_parts([msg], max_frame_bytes)
    return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)


def encode_message(msg: Message) -> bytes:
    """The body of ``msg`` (no length prefix), payloads copied once."""
    parts = frame_parts([msg], 0xFFFFFFFF)
    first = parts[0]
    assert type(first) is bytes  # frame_parts starts with the joined small pieces, never a payload
    if len(parts) == 1:  # small payloads are already in the first piece
        return first[HEADER_BYTES:]
    # one join: slicing the joined frame instead would copy every large payload a second time
    return b"".join([memoryview(first)[HEADER_BYTES:], *parts[1:]])


def pack_body(envelope: Any, payloads: Iterable[bytes] = ()) -> bytes:
    """A body from a raw header value and payloads, unchecked: for tests and vectors that need odd frames."""
    header: bytes = msgpack.packb(envelope, use_bin_type=True)
    return HEADER.pack(len(header)) + header + b"".join(payloads)


# --------------------------------------------------------------------------- decoding


def _unpack_header(view: memoryview) -> Any:
    try:
        return msgpack.unpackb(view, object_pairs_hook=_strict_map, **_UNPACK_LIMITS)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # OutOfData is not a ValueError
        raise _malformed(f"header is not valid msgpack within the limits: {type(exc).__name__}: {exc}"[:300]) from None


def _refuse_v1(view: memoryview) -> NoReturn:
    """A version-1 body (a bare msgpack envelope): refuse it by its version, as v1 peers expect."""
    unpacker = msgpack.Unpacker(max_buffer_size=MAX_HEADER_BYTES, **_UNPACK_LIMITS)
    unpacker.feed(view[:MAX_HEADER_BYTES])
    version: Any = None
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "v":
                version = unpacker.unpack()
                break
            unpacker.skip()
    except (ValueError, TypeError, msgpack.UnpackException):
        pass  # cut short (OutOfData) or malformed: no version to name
    if type(version) is list and len(version) == 2 and all(type(part) is int and part >= 0 for part in version):
        check_version((version[0], version[1]))
    raise _malformed("body is a bare msgpack map: a version-1 envelope, or not a frame at all")


def _split_payloads(lengths: Any, view: memoryview, start: int) -> Payloads:
    if type(lengths) is not list or len(lengths) > MAX_PAYLOADS:
        raise _malformed(f'envelope "p" must be an array of at most {MAX_PAYLOADS} lengths')
    if not all(type(length) is int and length >= 0 for length in lengths):
        raise _malformed('envelope "p" must hold non-negative ints')
    if sum(lengths) != view.nbytes - start:
        raise _malformed(f"payloads declare {sum(lengths)} bytes; the body has {view.nbytes - start} after the header")
    payloads: Payloads = []
    for length in lengths:
        payloads.append(view[start : start + length])
        start += length
    return payloads


def decode_message(body: bytes | memoryview, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Decode one frame body (without its length prefix) into a message.

    Tensor ``data`` in the result are views of ``body``: keep ``body`` unchanged while the
    message is in use. Raises ProtocolError: FRAME_TOO_LARGE (body or header over its limit),
    MALFORMED_FRAME (bad lengths, bad msgpack, envelope shape), UNSUPPORTED_VERSION (another
    major version), UNKNOWN_MESSAGE, INVALID_MESSAGE, BAD_TENSOR.
    """
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = view.nbytes
    if size > max_frame_bytes:
        raise _too_large(size, max_frame_bytes)
    if size == 0:
        raise _malformed("empty frame body")
    if view[0] in _V1_FIRST_BYTES:
        _refuse_v1(view)
    if size < HEADER_BYTES:
        raise _malformed(f"body of {size} bytes is shorter than its 4-byte header length")
    (header_size,) = HEADER.unpack_from(view)
    if header_size == 0 or header_size > size - HEADER_BYTES:
        raise _malformed(f"header length {header_size} does not fit a body of {size} bytes")
    if header_size > MAX_HEADER_BYTES:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"header of {header_size} bytes exceeds the limit of {MAX_HEADER_BYTES}"
        )
    start = HEADER_BYTES + header_size
    envelope = _unpack_header(view[HEADER_BYTES:start])
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
    return message_from_wire(type_name, fields, _split_payloads(envelope.get("p", []), view, start))


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
    write_parts(writer, frame_parts([msg], max_frame_bytes))
    await writer.drain()


def write_parts(writer: asyncio.StreamWriter, parts: list[bytes | memoryview]) -> int:
    """Write the pieces of :func:`frame_parts` in order, without joining them; return the bytes written.

    One ``write`` per piece rather than ``writelines``: the standard library's selector transport
    joins what ``writelines`` is given (a copy of every payload), while each ``write`` sends at once
    what the socket takes and buffers only the rest. Small frames are one piece, so one write.
    """
    for part in parts:
        writer.write(part)
    return sum(len(part) for part in parts)


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
