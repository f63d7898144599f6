"""Framing: incremental and asyncio readers agree, and hostile streams fail cleanly."""

from __future__ import annotations

import asyncio
import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import (
    DEFAULT_MAX_FRAME_BYTES,
    Compression,
    Error,
    ErrorCode,
    ForwardResponse,
    FrameDecoder,
    Hello,
    InferenceClose,
    InferenceOpen,
    InferenceStep,
    InfoRequest,
    ProtocolError,
    decode_array,
    decode_message,
    encode_array,
    encode_frame,
    encode_message,
    read_message,
    write_message,
)

HIDDEN = np.arange(2 * 3 * 16, dtype=np.float32).reshape(2, 3, 16) / 7
SAMPLES = [
    Hello(protocol_version=(1, 0), model_id="m", client_name="c"),
    InfoRequest(),
    InferenceOpen(session_id=b"abc", start=0, end=4, max_length=64, batch_size=2),
    InferenceStep(hidden=encode_array(HIDDEN), position=0, step_id=0),
    InferenceStep(hidden=encode_array(HIDDEN, compression=Compression.BLOCKWISE8), position=3, step_id=1),
    ForwardResponse(hidden=encode_array(np.arange(6, dtype=np.int64)), request_id=9),
    Error(code=302, message="busy", retryable=True),
    InferenceClose(),
]
STREAM = b"".join(encode_frame(m) for m in SAMPLES)


def test_frame_is_header_plus_body():
    for msg in SAMPLES:
        frame = encode_frame(msg)
        body = encode_message(msg)
        assert frame == struct.pack(">I", len(body)) + body
        assert decode_message(frame[4:]) == msg


@settings(max_examples=100)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_frame_decoder_any_split(cuts):
    decoder = FrameDecoder()
    got = []
    points = [0, *sorted(cuts), len(STREAM)]
    for a, b in itertools.pairwise(points):
        got += decoder.feed(STREAM[a:b])
    decoder.eof()
    assert got == SAMPLES
    assert decoder.buffered_bytes == 0


def test_frame_decoder_byte_by_byte():
    decoder = FrameDecoder()
    got = [m for i in range(len(STREAM)) for m in decoder.feed(STREAM[i : i + 1])]
    assert got == SAMPLES


def test_decoded_tensors_survive_later_feeds():
    decoder = FrameDecoder()
    (first,) = decoder.feed(encode_frame(SAMPLES[3]))
    decoder.feed(STREAM)
    np.testing.assert_array_equal(decode_array(first.hidden), HIDDEN)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def _read_all(data: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
    """Read messages until EOFError; return (messages, the terminating exception)."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    got = []
    while True:
        try:
            got.append(await read_message(reader, max_frame_bytes))
        except (EOFError, ProtocolError) as exc:
            return got, exc


def test_read_message_reads_a_stream_and_ends_with_eof():
    got, end = _run(_read_all(STREAM))
    assert got == SAMPLES
    assert type(end) is EOFError


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_truncated_streams(data):
    cut = data.draw(st.integers(0, len(STREAM) - 1))
    boundaries = {0}
    for msg in SAMPLES:
        boundaries.add(max(boundaries) + len(encode_frame(msg)))
    got, end = _run(_read_all(STREAM[:cut]))
    assert got == SAMPLES[: len(got)]
    if cut in boundaries:
        assert type(end) is EOFError
    else:
        assert isinstance(end, ProtocolError) and end.code is ErrorCode.MALFORMED_FRAME
    decoder = FrameDecoder()
    assert decoder.feed(STREAM[:cut]) == got
    if cut in boundaries:
        decoder.eof()
    else:
        with pytest.raises(ProtocolError) as info:
            decoder.eof()
        assert info.value.code is ErrorCode.MALFORMED_FRAME


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda b: STREAM[:40] + b, st.binary(max_size=100)))
def test_arbitrary_bytes_raise_only_protocol_error_or_eof(data):
    max_frame = 1024
    got, end = _run(_read_all(data, max_frame))
    assert isinstance(end, EOFError | ProtocolError)
    decoder = FrameDecoder(max_frame)
    try:
        decoder.feed(data)
        decoder.eof()
    except ProtocolError:
        pass
    for msg in got:  # whatever was accepted is a valid, re-encodable message
        encode_frame(msg)


def test_header_over_the_limit_is_refused_before_reading_the_body():
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(b"\xff\xff\xff\xff")  # claims 4 GiB; no body and no EOF follow
        with pytest.raises(ProtocolError) as info:
            await asyncio.wait_for(read_message(reader, max_frame_bytes=1 << 20), timeout=1)
        return info.value

    error = asyncio.run(main())
    assert error.code is ErrorCode.FRAME_TOO_LARGE
    decoder = FrameDecoder(max_frame_bytes=1 << 20)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"\xff\xff\xff\xff")
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(ProtocolError):  # the decoder stays failed: it cannot resynchronise
        decoder.feed(encode_frame(InfoRequest()))


def test_frame_decoder_returns_good_messages_before_raising():
    decoder = FrameDecoder()
    bad = struct.pack(">I", 1) + b"\xc1"
    assert decoder.feed(encode_frame(InfoRequest()) + bad) == [InfoRequest()]
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"")
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_limits_on_encode_and_decode():
    msg = InferenceStep(hidden=encode_array(np.zeros(1024, dtype=np.float32)), position=0, step_id=0)
    body = encode_message(msg)
    with pytest.raises(ProtocolError) as info:
        encode_frame(msg, max_frame_bytes=len(body) - 1)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert encode_frame(msg, max_frame_bytes=len(body))
    with pytest.raises(ProtocolError) as info:
        decode_message(body, max_frame_bytes=len(body) - 1)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(ProtocolError) as info:
        decode_message(b"")
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_zero_length_frame_is_malformed():
    got, end = _run(_read_all(b"\0\0\0\0"))
    assert got == [] and isinstance(end, ProtocolError) and end.code is ErrorCode.MALFORMED_FRAME


class _MemoryWriter:
    """The two StreamWriter methods write_message uses, recording what was written."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.drained = 0

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        self.drained += 1


def test_write_message_then_read_message():
    async def main():
        writer = _MemoryWriter()
        for msg in SAMPLES:
            await write_message(writer, msg)  # type: ignore[arg-type]
        assert writer.drained == len(SAMPLES)
        return await _read_all(bytes(writer.data))

    got, end = _run(main())
    assert got == SAMPLES and type(end) is EOFError


def test_large_tensor_round_trip():
    big = np.arange(4 * 1024 * 1024, dtype=np.float32).reshape(1, 4096, 1024)  # 16 MiB
    frame = encode_frame(ForwardResponse(hidden=encode_array(big)))
    (msg,) = FrameDecoder().feed(frame)
    decoded = decode_array(msg.hidden)
    np.testing.assert_array_equal(decoded, big)
    # No copy on decode: the array is a view of the frame body.
    view = decode_message(memoryview(frame)[4:])
    assert np.shares_memory(decode_array(view.hidden), np.frombuffer(frame, dtype=np.uint8))


def test_large_frame_read_in_pieces_as_it_arrives_and_a_cut_names_how_far_it_got():
    big = np.arange(3 * 1024 * 1024, dtype=np.float32).reshape(1, 3072, 1024)  # 12 MiB: read in 1 MiB pieces
    frame = encode_frame(ForwardResponse(hidden=encode_array(big)))

    async def dribble(data: bytes, eof: bool):
        reader = asyncio.StreamReader()

        async def feed():
            for at in range(0, len(data), 300_001):  # odd sizes, so pieces and arrivals never line up
                reader.feed_data(data[at : at + 300_001])
                await asyncio.sleep(0)
            if eof:
                reader.feed_eof()

        feeder = asyncio.create_task(feed())
        try:
            return await read_message(reader)
        finally:
            await feeder

    msg = _run(dribble(frame, eof=False))
    np.testing.assert_array_equal(decode_array(msg.hidden), big)
    with pytest.raises(ProtocolError) as info:
        _run(dribble(frame[: len(frame) // 2], eof=True))
    assert info.value.code is ErrorCode.MALFORMED_FRAME
    assert f"{len(frame) // 2 - 4} of {len(frame) - 4} bytes" in str(info.value)
