"""The bounded msgpack codec: byte-identical to msgpack-python, and safe on hostile input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import ErrorCode, ProtocolError, _msgpack

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300)
)
# Maps have str keys only: that is the subset the protocol uses and the decoder accepts.
values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=20) | st.dictionaries(st.text(max_size=40), children, max_size=20),
    max_leaves=60,
)


def _normalise(value):
    """unpackb gives bytes and lists; our decoder gives memoryview for bin."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


@given(values)
def test_encoding_is_byte_identical_to_msgpack(value):
    assert _msgpack.packb(value) == msgpack.packb(value, use_bin_type=True)


@given(values)
def test_decoding_agrees_with_msgpack(value):
    body = msgpack.packb(value, use_bin_type=True)
    assert _normalise(_msgpack.unpack(body)) == msgpack.unpackb(body, raw=False)


@pytest.mark.parametrize(
    "value",
    [
        0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
        -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
        "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536,
        b"", b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536,
        [0] * 15, [0] * 16, [0] * 65535, {str(i): i for i in range(16)},
    ],
)  # fmt: skip
def test_width_boundaries(value):
    body = msgpack.packb(value, use_bin_type=True)
    assert _msgpack.packb(value) == body
    assert _normalise(_msgpack.unpack(body)) == value


def test_array32_and_map32():
    big = [0] * 65536  # more objects than the decoder's budget, so encode-only here
    assert _msgpack.packb(big) == msgpack.packb(big)
    wide = {str(i): None for i in range(65536)}
    assert _msgpack.packb(wide) == msgpack.packb(wide)


def test_accepts_non_canonical_widths():
    # Other encoders may use wider forms than needed: uint64 for 1, float32, str32, bin32.
    assert _msgpack.unpack(b"\xcf" + struct.pack(">Q", 1)) == 1
    assert _msgpack.unpack(b"\xca" + struct.pack(">f", 1.5)) == 1.5
    assert _msgpack.unpack(b"\xdb\x00\x00\x00\x02hi") == "hi"
    assert bytes(_msgpack.unpack(b"\xc6\x00\x00\x00\x01z")) == b"z"
    assert _msgpack.unpack(b"\xdf\x00\x00\x00\x01\xa1k\xdd\x00\x00\x00\x00") == {"k": []}


def test_bin_is_a_zero_copy_view():
    body = bytearray(msgpack.packb({"d": b"x" * 1000}))
    decoded = _msgpack.unpack(body)
    body[-1] = ord("y")
    assert bytes(decoded["d"][-1:]) == b"y"


def test_large_bins_are_passed_through_not_copied():
    payload = memoryview(bytearray(1 << 20))
    chunks, size = _msgpack.pack_chunks({"data": payload})
    assert any(chunk is payload or (isinstance(chunk, memoryview) and chunk.obj is payload.obj) for chunk in chunks)
    assert size == len(b"".join(chunks))


def _refused(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        _msgpack.unpack(body)
    assert info.value.code is ErrorCode.MALFORMED_FRAME
    return info.value


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "truncated"),
        (b"\xc1", "0xc1"),
        (b"\xd4\x01\x00", "ext"),
        (b"\xc7\x01\x05x", "ext"),
        (b"\xa2h", "truncated"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (b"\xc0\xc0", "trailing"),
        (b"\x81\x01\x02", "key"),
        (b"\x82\xa1a\x01\xa1a\x02", "duplicate"),
        (b"\xdd\xff\xff\xff\xff", "entries"),  # an array declaring 4 billion items in 5 bytes
        (b"\xdf\xff\xff\xff\xff", "entries"),
        (b"\xc6\xff\xff\xff\xff", "truncated"),  # a 4 GiB bin header with no payload
    ],
)
def test_refuses_malformed(body, why):
    assert why in str(_refused(body))


def test_depth_is_bounded():
    nested = b"\x91" * _msgpack.MAX_DEPTH + b"\xc0"
    assert _msgpack.unpack(nested) is not None
    assert "deeper" in str(_refused(b"\x91" * (_msgpack.MAX_DEPTH + 1) + b"\xc0"))
    # Far deeper than Python's recursion limit: refused early, not RecursionError.
    _refused(b"\x91" * 100_000 + b"\xc0")


def test_object_count_is_bounded():
    # A frame full of one-byte nils must not become tens of millions of list slots.
    many = b"\xdd" + struct.pack(">I", 1_000_000) + b"\xc0" * 1_000_000
    assert "objects" in str(_refused(many))
    fits = b"\xdd" + struct.pack(">I", 1000) + b"\xc0" * 1000
    assert _msgpack.unpack(fits) == [None] * 1000


def test_encoder_refuses_what_decoder_would():
    with pytest.raises(TypeError):
        _msgpack.packb({1: 2})
    with pytest.raises(TypeError):
        _msgpack.packb(object())
    with pytest.raises(ValueError):
        _msgpack.packb(2**64)
    with pytest.raises(ValueError):
        _msgpack.packb(_nested(_msgpack.MAX_DEPTH + 1))
    assert _msgpack.packb(_nested(_msgpack.MAX_DEPTH)) == b"\x91" * _msgpack.MAX_DEPTH + b"\xc0"


def _nested(depth: int):
    value = None
    for _ in range(depth):
        value = [value]
    return value


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_error(body):
    try:
        _msgpack.unpack(body)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED_FRAME


@settings(max_examples=50)
@given(values, st.data())
def test_truncated_values_are_refused(value, data):
    body = _msgpack.packb(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
    _refused(body[:cut])
