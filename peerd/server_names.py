"""Stream protocol names shared by server and client (the client must not import server code)."""

from __future__ import annotations

__all__ = ["STREAM_NAMES"]

STREAM_NAMES = {
    "info": "peerd/info/1",
    "forward": "peerd/forward/1",
    "backward": "peerd/backward/1",
    "inference": "peerd/inference/1",
}
