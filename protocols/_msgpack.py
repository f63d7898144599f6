"""A small, bounded MessagePack codec for the subset of msgpack this protocol uses.

Why not ``msgpack.packb`` / ``msgpack.unpackb`` directly:

* Decoding: ``unpackb`` copies every ``bin`` value into a new ``bytes`` object and has no
  bound on the total number of objects, so a 64 MiB frame of one-byte ``nil`` values
  becomes a list of 64 million pointers (8x the frame). This reader returns ``bin`` values
  as zero-copy ``memoryview`` slices of the frame body, checks every declared length
  against the bytes that remain *before* allocating, and bounds nesting depth and the
  total object count. Any defect raises ``ProtocolError(MALFORMED_FRAME)``.
* Encoding: ``packb`` copies tensor payloads into its buffer and then again into the
  result. :func:`pack_chunks` instead returns a list of chunks in which large ``bin``
  payloads are the caller's own buffers, so building a frame copies them once.

The encoder writes the canonical (shortest) form, byte-identical to
``msgpack.packb(obj, use_bin_type=True)``; the tests check that and check this decoder
against ``msgpack.unpackb`` on generated values. The decoder accepts every msgpack form of
the supported types (nil, bool, int, float32/64, str, bin, array, map with string keys)
and refuses ext types, non-string map keys and duplicate keys, none of which the protocol
uses.
"""

from __future__ import annotations

import struct
from typing import Any

from protocols.errors import ErrorCode, ProtocolError

MAX_DEPTH = 32
"""Deepest nesting of arrays/maps accepted (the envelope uses 3; ``extra`` may use a few)."""
MAX_OBJECTS = 65536
"""Most msgpack objects (scalars, strings, containers, map keys) accepted in one body."""

# Payloads at least this long are passed through as separate chunks instead of copied
# into the small-object buffer.
_LARGE_BIN_BYTES = 4096

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, message)


# --------------------------------------------------------------------------- encoding


class _Writer:
    __slots__ = ("chunks", "size", "small")

    def __init__(self) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.small = bytearray()
        self.size = 0

    def flush(self) -> None:
        if self.small:
            self.chunks.append(bytes(self.small))
            self.size += len(self.small)
            self.small = bytearray()

    def pack(self, obj: Any, depth: int) -> None:
        out = self.small
        if obj is None:
            out.append(0xC0)
        elif obj is True:
            out.append(0xC3)
        elif obj is False:
            out.append(0xC2)
        elif type(obj) is int:
            _pack_int(out, obj)
        elif type(obj) is float:
            out.append(0xCB)
            out += _F64.pack(obj)
        elif type(obj) is str:
            data = obj.encode("utf-8")
            n = len(data)
            if n < 32:
                out.append(0xA0 | n)
            elif n < 0x100:
                out += bytes((0xD9, n))
            elif n < 0x10000:
                out.append(0xDA)
                out += _U16.pack(n)
            elif n < 0x100000000:
                out.append(0xDB)
                out += _U32.pack(n)
            else:
                raise ValueError("str too long for msgpack")
            out += data
        elif isinstance(obj, bytes | bytearray | memoryview):
            view = memoryview(obj)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            n = view.nbytes
            if n < 0x100:
                out += bytes((0xC4, n))
            elif n < 0x10000:
                out.append(0xC5)
                out += _U16.pack(n)
            elif n < 0x100000000:
                out.append(0xC6)
                out += _U32.pack(n)
            else:
                raise ValueError("bin too long for msgpack")
            if n >= _LARGE_BIN_BYTES:
                self.flush()
                self.chunks.append(view)
                self.size += n
            else:
                out += view
        elif (type(obj) is list or type(obj) is tuple or type(obj) is dict) and depth >= MAX_DEPTH:
            raise ValueError(f"msgpack containers nested deeper than {MAX_DEPTH}")
        elif type(obj) is list or type(obj) is tuple:
            _pack_container_header(out, len(obj), 0x90, 0xDC, 0xDD)
            for item in obj:
                self.pack(item, depth + 1)
        elif type(obj) is dict:
            _pack_container_header(out, len(obj), 0x80, 0xDE, 0xDF)
            for key, value in obj.items():
                if type(key) is not str:
                    raise TypeError(f"map keys must be str, got {type(key).__name__}")
                self.pack(key, depth + 1)
                self.pack(value, depth + 1)
        else:
            raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def _pack_int(out: bytearray, value: int) -> None:
    if value >= 0:
        if value < 0x80:
            out.append(value)
        elif value < 0x100:
            out += bytes((0xCC, value))
        elif value < 0x10000:
            out.append(0xCD)
            out += _U16.pack(value)
        elif value < 0x100000000:
            out.append(0xCE)
            out += _U32.pack(value)
        elif value < 0x10000000000000000:
            out.append(0xCF)
            out += _U64.pack(value)
        else:
            raise ValueError("int too large for msgpack")
    elif value >= -32:
        out.append(value & 0xFF)
    elif value >= -0x80:
        out.append(0xD0)
        out += _I8.pack(value)
    elif value >= -0x8000:
        out.append(0xD1)
        out += _I16.pack(value)
    elif value >= -0x80000000:
        out.append(0xD2)
        out += _I32.pack(value)
    elif value >= -0x8000000000000000:
        out.append(0xD3)
        out += _I64.pack(value)
    else:
        raise ValueError("int too small for msgpack")


def _pack_container_header(out: bytearray, n: int, fix: int, code16: int, code32: int) -> None:
    if n < 16:
        out.append(fix | n)
    elif n < 0x10000:
        out.append(code16)
        out += _U16.pack(n)
    elif n < 0x100000000:
        out.append(code32)
        out += _U32.pack(n)
    else:
        raise ValueError("container too long for msgpack")


def pack_chunks(obj: Any) -> tuple[list[bytes | memoryview], int]:
    """Encode ``obj`` as msgpack; return (chunks, total length in bytes).

    Large ``bin`` payloads appear in the chunk list as views of the caller's buffers (no
    copy), so the caller must not mutate them until the chunks are joined or written.
    Raises TypeError/ValueError for values msgpack (or this subset) cannot represent.
    """
    writer = _Writer()
    writer.pack(obj, 0)
    writer.flush()
    return writer.chunks, writer.size


def packb(obj: Any) -> bytes:
    """Encode ``obj`` as one ``bytes`` object (same bytes as ``msgpack.packb(obj, use_bin_type=True)``)."""
    chunks, _ = pack_chunks(obj)
    return chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else b"".join(chunks)


# --------------------------------------------------------------------------- decoding


# Bodies up to this size are copied to ``bytes`` once so that strings decode from bytes
# slices (about 3x faster than from memoryview slices); bins still view the original.
_COPY_FOR_SPEED_BYTES = 65536


class _Reader:
    __slots__ = ("end", "objects_left", "pos", "raw", "view")

    def __init__(self, view: memoryview, max_objects: int) -> None:
        self.view = view  # bin values are slices of this: zero copy
        self.raw: bytes | memoryview = view.obj if type(view.obj) is bytes and len(view.obj) == len(view) else view
        if type(self.raw) is not bytes and len(view) <= _COPY_FOR_SPEED_BYTES:
            self.raw = bytes(view)
        self.pos = 0
        self.end = len(view)
        self.objects_left = max_objects

    def take(self, n: int) -> int:
        """Advance over n bytes; return where they start. Checks the bytes exist first."""
        start = self.pos
        if n > self.end - start:
            raise _malformed(f"truncated: need {n} bytes at offset {start}, {self.end - start} left")
        self.pos = start + n
        return start

    def read(self, depth: int) -> Any:
        self.objects_left -= 1
        if self.objects_left < 0:
            raise _malformed(f"more than {MAX_OBJECTS} msgpack objects in one frame")
        pos = self.pos
        if pos >= self.end:
            raise _malformed(f"truncated: need 1 byte at offset {pos}, 0 left")
        raw = self.raw
        code = raw[pos]
        self.pos = pos + 1
        # The fixed-size forms first: they are nearly everything in an envelope.
        if code <= 0x7F:  # positive fixint
            return code
        if 0xA0 <= code <= 0xBF:  # fixstr
            return self.read_str(code & 0x1F)
        if code >= 0xE0:  # negative fixint
            return code - 0x100
        if 0x80 <= code <= 0x8F:  # fixmap
            return self.read_map(code & 0x0F, depth)
        if 0x90 <= code <= 0x9F:  # fixarray
            return self.read_array(code & 0x0F, depth)
        if code == 0xC0:
            return None
        if code == 0xC2:
            return False
        if code == 0xC3:
            return True
        if code == 0xC4:
            return self.read_bin(raw[self.take(1)])
        if code == 0xC5:
            return self.read_bin(_U16.unpack_from(raw, self.take(2))[0])
        if code == 0xC6:
            return self.read_bin(_U32.unpack_from(raw, self.take(4))[0])
        if code == 0xCA:
            return _F32.unpack_from(raw, self.take(4))[0]
        if code == 0xCB:
            return _F64.unpack_from(raw, self.take(8))[0]
        if code == 0xCC:
            return raw[self.take(1)]
        if code == 0xCD:
            return _U16.unpack_from(raw, self.take(2))[0]
        if code == 0xCE:
            return _U32.unpack_from(raw, self.take(4))[0]
        if code == 0xCF:
            return _U64.unpack_from(raw, self.take(8))[0]
        if code == 0xD0:
            return _I8.unpack_from(raw, self.take(1))[0]
        if code == 0xD1:
            return _I16.unpack_from(raw, self.take(2))[0]
        if code == 0xD2:
            return _I32.unpack_from(raw, self.take(4))[0]
        if code == 0xD3:
            return _I64.unpack_from(raw, self.take(8))[0]
        if code == 0xD9:
            return self.read_str(raw[self.take(1)])
        if code == 0xDA:
            return self.read_str(_U16.unpack_from(raw, self.take(2))[0])
        if code == 0xDB:
            return self.read_str(_U32.unpack_from(raw, self.take(4))[0])
        if code == 0xDC:
            return self.read_array(_U16.unpack_from(raw, self.take(2))[0], depth)
        if code == 0xDD:
            return self.read_array(_U32.unpack_from(raw, self.take(4))[0], depth)
        if code == 0xDE:
            return self.read_map(_U16.unpack_from(raw, self.take(2))[0], depth)
        if code == 0xDF:
            return self.read_map(_U32.unpack_from(raw, self.take(4))[0], depth)
        if code == 0xC1:
            raise _malformed(f"byte 0xc1 (never used in msgpack) at offset {pos}")
        # 0xc7-0xc9 ext 8/16/32, 0xd4-0xd8 fixext
        raise _malformed(f"msgpack ext type (0x{code:02x}) at offset {pos} is not used here")

    def read_str(self, n: int) -> str:
        start = self.pos
        stop = start + n
        if stop > self.end:
            raise _malformed(f"truncated: str of {n} bytes at offset {start}, {self.end - start} left")
        self.pos = stop
        try:
            return str(self.raw[start:stop], "utf-8")
        except UnicodeDecodeError as exc:
            raise _malformed(f"invalid UTF-8 in str at offset {start}") from exc

    def read_bin(self, n: int) -> memoryview:
        start = self.take(n)
        return self.view[start : start + n]

    def check_count(self, n: int, min_bytes_each: int, depth: int) -> None:
        # Checked before building the container: each element needs at least one byte, so a
        # declared length beyond the remaining bytes (or object budget) is a lie.
        if depth >= MAX_DEPTH:
            raise _malformed(f"msgpack nesting deeper than {MAX_DEPTH}")
        if n * min_bytes_each > self.end - self.pos:
            raise _malformed(f"container declares {n} entries but only {self.end - self.pos} bytes remain")
        if n * min_bytes_each > self.objects_left:
            raise _malformed(f"more than {MAX_OBJECTS} msgpack objects in one frame")

    def read_array(self, n: int, depth: int) -> list[Any]:
        self.check_count(n, 1, depth)
        read = self.read
        depth += 1
        return [read(depth) for _ in range(n)]

    def read_map(self, n: int, depth: int) -> dict[str, Any]:
        self.check_count(n, 2, depth)
        result: dict[str, Any] = {}
        read = self.read
        depth += 1
        for _ in range(n):
            key_at = self.pos
            key = read(depth)
            if type(key) is not str:
                raise _malformed(f"map key at offset {key_at} is {type(key).__name__}; only str keys are used")
            if key in result:
                raise _malformed(f"duplicate map key {key!r} at offset {key_at}")
            result[key] = read(depth)
        return result


def unpack(body: bytes | bytearray | memoryview, max_objects: int = MAX_OBJECTS) -> Any:
    """Decode exactly one msgpack value filling all of ``body``.

    ``bin`` values come back as memoryview slices of ``body`` (zero copy, so ``body``
    must not be mutated while they are in use); strings as ``str``, arrays as ``list``,
    maps as ``dict`` with ``str`` keys.
    Raises ``ProtocolError(MALFORMED_FRAME)`` for any defect, including trailing bytes.
    """
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    reader = _Reader(view, max_objects)
    value = reader.read(0)
    if reader.pos != reader.end:
        raise _malformed(f"{reader.end - reader.pos} trailing bytes after the msgpack value")
    return value
