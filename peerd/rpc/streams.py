"""Stream protocol names by RPC verb, from the protocol spec (shared by server and client), and
the bounded drain both sides use after writing a frame."""

from __future__ import annotations

import asyncio

from protocols import STREAM_BACKWARD, STREAM_FORWARD, STREAM_INFERENCE, STREAM_INFO, STREAM_PUSH

__all__ = ["STREAM_NAMES", "drain_within"]

STREAM_NAMES = {
    "info": STREAM_INFO,
    "forward": STREAM_FORWARD,
    "backward": STREAM_BACKWARD,
    "inference": STREAM_INFERENCE,
    "push": STREAM_PUSH,
}


async def drain_within(writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """``writer.drain()``, raising TimeoutError after ``timeout_s`` if the peer stops reading.

    A decode step's frame is small: the socket usually takes it whole on ``write``, and then
    ``drain`` cannot block (it only reports a lost connection), so no deadline is set up for it
    (an ``asyncio.timeout`` costs a timer handle per call, on every hop at both ends).
    """
    transport = getattr(writer, "transport", None)  # None: an in-memory writer (tests, fuzzing)
    if transport is not None and not transport.get_write_buffer_size():
        await writer.drain()
        return
    async with asyncio.timeout(timeout_s):
        await writer.drain()
