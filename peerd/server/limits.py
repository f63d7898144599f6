"""What one peer accepts from its clients: request sizes, sessions, deadlines, per-client shares."""

from __future__ import annotations

from dataclasses import dataclass

from peerd.config import PeerConfig
from protocols import DEFAULT_MAX_FRAME_BYTES

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """What one peer accepts; advertised through ``info`` so clients can plan within it."""

    max_frame_bytes: int
    max_batch_tokens: int
    max_session_length: int
    max_sessions: int
    request_timeout_s: float
    session_idle_timeout_s: float
    # Per remote peer id (libp2p-authenticated, so one client cannot spend another's share); the
    # defaults are PeerConfig's, the one place operator-facing defaults are written:
    max_sessions_per_peer: int = PeerConfig.max_sessions_per_peer  # open inference sessions of one client
    max_inflight_per_peer: int = PeerConfig.max_inflight_per_peer  # concurrent info/forward/backward streams
    evict_idle_s: float = PeerConfig.evict_idle_s  # idle sessions may be evicted after this long
    max_streams: int = PeerConfig.max_streams  # open streams, all clients (peerd/server/bounds.py)
    max_streams_per_peer: int = PeerConfig.max_streams_per_peer
    # declared bytes of frames being received: two whole frames per client, 512 MiB in all
    max_partial_frame_bytes_per_peer: int = 2 * DEFAULT_MAX_FRAME_BYTES
    max_partial_frame_bytes: int = 512 << 20

    @classmethod
    def from_config(cls, config: PeerConfig, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Limits:
        """The limits a peer configured with ``config`` enforces."""
        return cls(
            max_frame_bytes=max_frame_bytes,
            max_batch_tokens=config.max_batch_tokens,
            max_session_length=config.max_session_length,
            max_sessions=config.max_sessions,
            request_timeout_s=config.request_timeout_s,
            session_idle_timeout_s=config.session_idle_timeout_s,
            max_sessions_per_peer=config.max_sessions_per_peer,
            max_inflight_per_peer=config.max_inflight_per_peer,
            evict_idle_s=config.evict_idle_s,
            max_streams=config.max_streams,
            max_streams_per_peer=config.max_streams_per_peer,
            max_partial_frame_bytes_per_peer=2 * max_frame_bytes,
        )
