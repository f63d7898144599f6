"""Stream protocol names by RPC verb, from the protocol spec (shared by server and client)."""

from __future__ import annotations

from protocols import STREAM_BACKWARD, STREAM_FORWARD, STREAM_INFERENCE, STREAM_INFO, STREAM_PUSH

__all__ = ["STREAM_NAMES"]

STREAM_NAMES = {
    "info": STREAM_INFO,
    "forward": STREAM_FORWARD,
    "backward": STREAM_BACKWARD,
    "inference": STREAM_INFERENCE,
    "push": STREAM_PUSH,
}
