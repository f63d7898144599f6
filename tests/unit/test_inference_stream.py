"""InferenceStream over an in-memory wire: an open sent without waiting is confirmed by the first result."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peerd.rpc.errors import PeerError, PeerUnavailable
from peerd.rpc.inference import InferenceStream
from peerd.rpc.tensors import to_wire
from peerd.rpc.transport import PeerClient
from protocols import (
    Compression,
    Error,
    ErrorCode,
    FrameDecoder,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    encode_frame,
)

SESSION = bytes(16)


class _Writer:
    """The client's end of a stream: keeps what is written, or fails like a stream the peer reset."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.decoder = FrameDecoder()
        self.sent: list[object] = []

    def write(self, data: bytes) -> None:
        if self.broken:
            raise ConnectionResetError("stream reset by the peer")
        self.sent += self.decoder.feed(bytes(data))

    async def drain(self) -> None:
        pass


def _stream(answers: list[object], *, confirmed: bool, broken: bool = False) -> tuple[InferenceStream, _Writer]:
    client = object.__new__(PeerClient)  # only its framed send and receive are used
    client.timeout_s, client.tracer = 2.0, None
    reader = asyncio.StreamReader()
    for message in answers:
        reader.feed_data(encode_frame(message))  # type: ignore[arg-type]
    writer = _Writer(broken)
    stream = InferenceStream(
        client,
        "peer",
        SESSION,
        reader,
        writer,
        object(),
        Compression.NONE,
        confirmed=confirmed,  # type: ignore[arg-type]
    )
    return stream, writer


def _result(step_id: int) -> InferenceStepResult:
    return InferenceStepResult(to_wire(torch.ones(1, 1, 4)), step_id)


async def test_an_unconfirmed_stream_reads_the_peers_opened_before_its_first_result() -> None:
    stream, writer = _stream([InferenceOpened(SESSION, 64), _result(1), _result(2)], confirmed=False)
    assert not stream.confirmed
    out = await stream.step(torch.zeros(1, 1, 4), 0)
    assert torch.equal(out, torch.ones(1, 1, 4)) and stream.confirmed
    await stream.step(torch.zeros(1, 1, 4), 1)  # confirmed once: the next result is read directly
    assert [type(m) for m in writer.sent] == [InferenceStep, InferenceStep]


async def test_a_confirmed_stream_takes_an_opened_in_place_of_a_result_as_out_of_turn() -> None:
    stream, _ = _stream([InferenceOpened(SESSION, 64)], confirmed=True)
    with pytest.raises(PeerUnavailable, match="out of turn"):
        await stream.step(torch.zeros(1, 1, 4), 0)


async def test_a_refused_open_is_raised_by_the_first_step_as_the_peers_own_error() -> None:
    refusal = Error(int(ErrorCode.CACHE_FULL), "no cache left for this session")
    stream, _ = _stream([refusal], confirmed=False)
    with pytest.raises(PeerError) as info:
        await stream.step(torch.zeros(1, 1, 4), 0)
    assert info.value.code is ErrorCode.CACHE_FULL and not stream.confirmed


async def test_a_step_written_after_the_peer_refused_and_closed_reports_the_refusal_not_the_reset() -> None:
    """The peer said why and closed the stream before the step was written: the write fails, and
    the reason is read from what the peer sent, so a full peer is not taken for a dead one."""
    refusal = Error(int(ErrorCode.CACHE_FULL), "no cache left for this session")
    stream, _ = _stream([refusal], confirmed=False, broken=True)
    with pytest.raises(PeerError) as info:
        await stream.step(torch.zeros(1, 1, 4), 0)
    assert info.value.code is ErrorCode.CACHE_FULL
    confirmed, _ = _stream([], confirmed=True, broken=True)
    with pytest.raises(PeerUnavailable, match="send failed"):
        await confirmed.step(torch.zeros(1, 1, 4), 0)
