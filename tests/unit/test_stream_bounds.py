"""The policy of peerd/server/bounds.py: frame bytes per client and in all, stream caps, idle eviction."""

from __future__ import annotations

import pytest

from peerd.server.bounds import FrameBytes, StreamGate
from protocols import ErrorCode, ProtocolError

MIB = 1 << 20


class _Writer:
    """The two calls the gate makes on a stream writer, recorded (an in-memory stream end)."""

    def __init__(self) -> None:
        self.closed = False
        self.written = b""

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def test_frame_bytes_cap_per_client_and_in_total_and_small_frames_are_free() -> None:
    frames = FrameBytes(per_peer_bytes=128 * MIB, total_bytes=192 * MIB)
    a1 = frames.reserve("a", 64 * MIB)
    frames.reserve("a", 64 * MIB)
    with pytest.raises(ProtocolError) as exc:
        frames.reserve("a", 64 * MIB)
    assert exc.value.code == ErrorCode.OVERLOADED
    frames.reserve("b", 64 * MIB)
    with pytest.raises(ProtocolError):
        frames.reserve("c", 64 * MIB)  # "c" has nothing, but the total is spent
    assert frames.reserve("c", 4096) == 0  # a decode step's frame still passes
    frames.release("a", a1)
    frames.reserve("c", 64 * MIB)
    assert frames.total == 192 * MIB and frames.refusals == 2


def test_streams_capped_per_client_then_idle_ones_of_the_largest_holder_closed_first() -> None:
    gate = StreamGate(max_streams=4, max_streams_per_peer=3, frames=FrameBytes(MIB, MIB))
    hog = [_Writer() for _ in range(4)]
    tickets = [gate.admit("hog", w) for w in hog]
    assert tickets[3] is None and hog[3].closed and hog[3].written  # over its own cap: refused with a frame
    assert tickets[0] is not None
    tickets[0].idle = False  # it sent a request: not idle any more
    busy = gate.admit("other", _Writer())
    assert busy is not None and gate.open == 4
    honest = _Writer()
    assert gate.admit("honest", honest) is not None  # full: the hog's oldest idle stream makes room
    assert hog[1].closed and not hog[0].closed and gate.open == 4 and gate.evictions == 1
    assert tickets[1] is not None
    gate.release(tickets[1])  # its handler ends later: a no-op
    assert gate.open == 4
