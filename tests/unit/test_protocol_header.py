"""Frame v2: the msgpack header's limits, the payload table, zero-copy decode and scatter writes."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import numpy as np
import pytest

from protocols import (
    MAX_HEADER_BYTES,
    MAX_PAYLOADS,
    MAX_STRING_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    ForwardRequest,
    Hello,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    ProtocolError,
    decode_array,
    decode_message,
    encode_array,
    encode_message,
    frame_parts,
    pack_body,
    write_message,
    write_parts,
)

VERSION = list(PROTOCOL_VERSION)
DATA = np.arange(8, dtype=np.float32).tobytes()
TENSOR = {"dtype": "float32", "shape": [1, 1, 8], "compression": "none", "data": 0}


def _code_of(body: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode_message(body)
    return info.value.code


def _step_body(**changes) -> dict:
    return {"hidden": TENSOR, "position": 0, "step_id": 0, **changes}


def test_layout_is_header_length_then_msgpack_header_then_raw_payloads():
    array = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    body = encode_message(InferenceStep(encode_array(array), position=4, step_id=1))
    (header_size,) = struct.unpack_from(">I", body)
    header = msgpack.unpackb(body[4 : 4 + header_size])
    assert header["v"] == VERSION and header["t"] == "inference_step"
    assert header["b"]["hidden"] == {"dtype": "float32", "shape": [2, 3, 8], "compression": "none", "data": 0}
    assert header["p"] == [array.nbytes]
    assert body[4 + header_size :] == array.tobytes()  # the payload is the raw values, outside msgpack


def test_control_messages_have_no_payload_table():
    header = msgpack.unpackb(encode_message(Hello(PROTOCOL_VERSION, "m"))[4:])
    assert "p" not in header


def test_decoded_tensors_are_views_of_the_body():
    body = bytearray(pack_body({"v": VERSION, "t": "inference_step", "b": _step_body(), "p": [len(DATA)]}, [DATA]))
    msg = decode_message(body)
    assert isinstance(msg, InferenceStep)
    values = decode_array(msg.hidden)
    body[-4:] = np.float32(99).tobytes()  # writing the frame shows through: no copy was made
    assert values[0, 0, 7] == 99


def test_payloads_must_fill_the_body_exactly():
    envelope = {"v": VERSION, "t": "inference_step", "b": _step_body()}
    assert isinstance(decode_message(pack_body({**envelope, "p": [len(DATA)]}, [DATA])), InferenceStep)
    for lengths, payload in (([len(DATA)], DATA + b"x"), ([len(DATA) + 1], DATA), ([], DATA), ([-1, 33], DATA)):
        assert _code_of(pack_body({**envelope, "p": lengths}, [payload])) is ErrorCode.MALFORMED_FRAME
    assert _code_of(pack_body({**envelope, "p": "32"}, [DATA])) is ErrorCode.MALFORMED_FRAME
    too_many = [0] * (MAX_PAYLOADS + 1)
    assert _code_of(pack_body({**envelope, "p": too_many}, [])) is ErrorCode.MALFORMED_FRAME


def test_payload_references_are_checked():
    def step(tensor):
        return pack_body(
            {"v": VERSION, "t": "inference_step", "b": _step_body(hidden=tensor), "p": [len(DATA)]}, [DATA]
        )

    for bad in (1, -1, True, "0", None, [0]):
        assert _code_of(step({**TENSOR, "data": bad})) is ErrorCode.BAD_TENSOR
    assert _code_of(step({**TENSOR, "data": DATA})) is ErrorCode.BAD_TENSOR  # version 1's inline bin
    assert _code_of(step({**TENSOR, "shape": [1, 1, 9]})) is ErrorCode.BAD_TENSOR  # length from dtype x shape
    padding = pack_body({"v": VERSION, "t": "info_request", "b": {"padding": 3}, "p": [4]}, [b"abcd"])
    assert _code_of(padding) is ErrorCode.INVALID_MESSAGE


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"\xc1", ErrorCode.MALFORMED_FRAME),  # never used in msgpack
        (b"\x81\xa1v\xd4\x01\x00", ErrorCode.MALFORMED_FRAME),  # ext types are not used
        (b"\x82\xa1v\x92\x02\x00\xa1v\x92\x02\x00", ErrorCode.MALFORMED_FRAME),  # a repeated key
        (b"\x81\xc4\x01v\x92\x02\x00", ErrorCode.MALFORMED_FRAME),  # a bin key
        (b"\x81\x01\x02", ErrorCode.MALFORMED_FRAME),  # an int key
        (b"\x81\xa1v\x92\x02", ErrorCode.MALFORMED_FRAME),  # truncated
        (b"\x80\xc0", ErrorCode.MALFORMED_FRAME),  # trailing bytes inside the header
        (b"\xa2\xff\xfe", ErrorCode.MALFORMED_FRAME),  # invalid UTF-8
        (b"\xdd\xff\xff\xff\xff", ErrorCode.MALFORMED_FRAME),  # an array of 4 G entries
        (b"\x91" * 2000 + b"\xc0", ErrorCode.MALFORMED_FRAME),  # deeper than msgpack's stack
    ],
)
def test_bad_headers_are_malformed(header, code):
    assert _code_of(struct.pack(">I", len(header)) + header) is code


@pytest.mark.parametrize(
    "value",
    [
        "x" * (MAX_STRING_BYTES + 1),  # max_str_len
        b"x" * (MAX_STRING_BYTES + 1),  # max_bin_len
        list(range(4097)),  # max_array_len
        {str(i): i for i in range(4097)},  # max_map_len
    ],
)
def test_per_type_limits_of_the_header(value):
    body = pack_body({"v": VERSION, "t": "info_response", "b": {"extra": {"k": value}}})
    assert _code_of(body) is ErrorCode.MALFORMED_FRAME


def test_header_cap_bounds_the_object_count():
    # 65536 one-byte objects fit exactly; one more byte is over the cap, refused before parsing
    fits = b"\xdc\xff\xff" + b"\xc0" * (MAX_HEADER_BYTES - 3)
    assert _code_of(struct.pack(">I", len(fits)) + fits) is ErrorCode.MALFORMED_FRAME  # parsed: a list, not a map
    over = fits + b"\xc0"
    assert _code_of(struct.pack(">I", len(over)) + over) is ErrorCode.FRAME_TOO_LARGE
    # a valid message can still be too big for the header: the sender refuses it
    extra = {str(i): "x" * 4000 for i in range(20)}
    info_response = InfoResponse("m", 0, 1, 1, "float32", 1, 1, 1, 1, "online", PROTOCOL_VERSION, "0", "p", extra)
    with pytest.raises(ProtocolError) as info:
        frame_parts([info_response])
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE and "header" in info.value.message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x00\x00\x00", "shorter than its 4-byte header length"),
        (b"\x00\x00\x00\x00\x80", "header length 0"),
        (b"\x00\x00\x00\x09\x80", "header length 9 does not fit"),
    ],
)
def test_header_length_must_fit_the_body(body, why):
    with pytest.raises(ProtocolError) as info:
        decode_message(body)
    assert info.value.code is ErrorCode.MALFORMED_FRAME and why in info.value.message


def test_a_version_1_frame_is_refused_by_its_version():
    v1 = msgpack.packb({"v": [1, 0], "t": "hello", "b": {"protocol_version": [1, 0], "model_id": "m"}})
    with pytest.raises(ProtocolError) as info:
        decode_message(v1)
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION and "1.0" in info.value.message
    assert _code_of(b"\x81\xa1t\xa1x") is ErrorCode.MALFORMED_FRAME  # a bare map without a version


def test_blob_fields_travel_as_payloads():
    padding = bytes(range(256)) * 4096  # 1 MiB: far over the header's bin limit
    parts = frame_parts([InfoRequest(padding=padding)])
    assert sum(len(part) for part in parts) < len(padding) + 128
    assert decode_message(b"".join(parts)[4:]) == InfoRequest(padding=padding)


def test_large_payloads_are_sent_from_the_tensors_own_memory():
    big = np.ones((1, 64, 1024), dtype=np.float32)  # 256 KiB: over the coalescing threshold
    small = np.ones((1, 1, 1024), dtype=np.float32)  # 4 KiB: copied into the header piece
    parts = frame_parts([ForwardRequest(encode_array(big), 0, 1)])
    assert len(parts) == 2 and np.shares_memory(np.frombuffer(parts[1], dtype=np.float32), big)
    parts = frame_parts([Hello(PROTOCOL_VERSION, "m"), InferenceStep(encode_array(small), 0, 0)])
    assert len(parts) == 1  # hello and a decode step: one write


class _RecordingWriter:
    def __init__(self) -> None:
        self.writes: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        pass


def test_write_parts_writes_each_piece_without_joining():
    big = np.arange(1 << 18, dtype=np.float32).reshape(1, 256, 1024)  # 1 MiB
    msg = ForwardRequest(encode_array(big), 0, 1)
    writer = _RecordingWriter()
    size = write_parts(writer, frame_parts([msg]))  # type: ignore[arg-type]
    assert len(writer.writes) == 2 and writer.writes[1].obj is not None
    assert np.shares_memory(np.frombuffer(writer.writes[1], dtype=np.float32), big)
    frame = b"".join(bytes(part) for part in writer.writes)
    assert size == len(frame) and decode_message(frame[4:]) == msg
    asyncio.run(write_message(writer, msg))  # type: ignore[arg-type]
    assert len(writer.writes) == 4
