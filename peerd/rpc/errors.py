"""The client's exception tree: one root, lower-layer errors mapped once at the boundary."""

from __future__ import annotations

from peerd.swarm.status import block_ranges
from protocols import ErrorCode

__all__ = [
    "NoRouteError",
    "PeerError",
    "PeerUnavailable",
    "PeerdClientError",
    "SwarmBusyError",
    "SwarmConnectError",
    "worth_failover",
]


class PeerdClientError(Exception):
    """Root of every error the client SDK raises."""


class SwarmConnectError(PeerdClientError):
    """Could not join the swarm (bad initial peers, network down, DHT bootstrap failed)."""


class NoRouteError(PeerdClientError):
    """Some blocks have no live peer, so the model cannot be covered right now."""

    def __init__(self, missing_blocks: list[int], message: str | None = None) -> None:
        self.missing_blocks = missing_blocks
        spans = block_ranges(missing_blocks)
        super().__init__(
            message
            or f"no live peer serves block(s) {spans}; start a peer with `peerd run --blocks ...` for them "
            "or wait for one to join"
        )


class SwarmBusyError(NoRouteError):
    """Every peer serving some blocks is out of KV cache for a new session right now (the blocks are
    served, so waiting helps: sessions close and free their cache)."""

    def __init__(self, busy_blocks: list[int]) -> None:
        spans = block_ranges(busy_blocks)
        super().__init__(
            busy_blocks,
            f"every peer serving block(s) {spans} is out of cache for a new session; retry in a few seconds, "
            "use a shorter max_length, or start a peer for those blocks",
        )


class PeerUnavailable(PeerdClientError):
    """A peer could not be reached, dropped the stream, or timed out (the client routes around it)."""

    def __init__(self, peer_id: str, reason: str) -> None:
        self.peer_id = peer_id
        super().__init__(f"peer {peer_id[:16]}... unavailable: {reason}")


class PeerError(PeerdClientError):
    """A peer answered with a protocol error frame."""

    def __init__(self, peer_id: str, code: ErrorCode, message: str) -> None:
        self.peer_id = peer_id
        self.code = code
        super().__init__(f"peer {peer_id[:16]}... answered [{code.name} {int(code)}] {message}")

    @property
    def retryable(self) -> bool:
        """True when another peer may succeed where this one failed."""
        return self.code.retryable


# Codes that are not retryable as such (asking the same peer again would fail the same way) but
# mean "this peer cannot serve that" rather than "your request is wrong": a peer that just moved
# its blocks answers BLOCKS_NOT_SERVED until its new record reaches us, and one serving another
# model answers WRONG_MODEL. Another peer may well succeed.
_NOT_HERE = frozenset({ErrorCode.BLOCKS_NOT_SERVED, ErrorCode.WRONG_MODEL})


def worth_failover(exc: PeerUnavailable | PeerError) -> bool:
    """True when another peer may succeed where this one failed: the one failover policy.

    Every client path (inference sessions, stateless forward, training) asks this before banning
    a peer and trying elsewhere; False means the request itself is at fault, so it is raised.
    """
    if isinstance(exc, PeerUnavailable):
        return True
    return exc.retryable or exc.code in _NOT_HERE
