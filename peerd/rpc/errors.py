"""The client's exception tree: one root, lower-layer errors mapped once at the boundary."""

from __future__ import annotations

from peerd.swarm.status import block_ranges
from protocols import ErrorCode

__all__ = [
    "NoRouteError",
    "PeerError",
    "PeerTimedOut",
    "PeerUnavailable",
    "PeerdClientError",
    "RequestTooLargeError",
    "SwarmBusyError",
    "SwarmConnectError",
    "is_busy",
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
    """Peers serve every block, but those of some blocks have no free KV cache now: retry later.

    A NoRouteError, so a caller that waits for a route (a session opening or failing over) keeps
    waiting on it; what differs is the advice: the swarm is full, not broken. The token figures are
    there when the client knows them (``shortfall.explain_no_route``), None when the planner raised.
    """

    def __init__(
        self, busy_blocks: list[int], needed_tokens: int | None = None, most_free_tokens: int | None = None
    ) -> None:
        self.needed_tokens = needed_tokens
        self.most_free_tokens = most_free_tokens
        room = "no room for a new session"
        if needed_tokens is not None:
            room = f"no room for a session of {needed_tokens} cache tokens"
            if most_free_tokens is not None:
                room += f" (most free on one peer: {most_free_tokens})"
        super().__init__(
            busy_blocks,
            f"the swarm is busy: the peers serving block(s) {block_ranges(busy_blocks)} have {room} right now; "
            "retry in a moment, ask for fewer tokens (--max-new-tokens), or add a peer for those blocks",
        )


class RequestTooLargeError(PeerdClientError):
    """The request is larger than this swarm (or the model) can ever take: retrying will not help."""

    def __init__(self, needed_tokens: int, limit_tokens: int, what: str) -> None:
        self.needed_tokens = needed_tokens
        self.limit_tokens = limit_tokens
        super().__init__(
            f"request too large: it needs a session of {needed_tokens} tokens (prompt + max_new_tokens), "
            f"but {what} at most {limit_tokens}; lower --max-new-tokens or shorten the prompt"
        )


class PeerUnavailable(PeerdClientError):
    """A peer could not be reached, dropped the stream, or timed out (the client routes around it)."""

    def __init__(self, peer_id: str, reason: str) -> None:
        self.peer_id = peer_id
        super().__init__(f"peer {peer_id[:16]}... unavailable: {reason}")


class PeerTimedOut(PeerUnavailable):
    """A peer sent nothing within the step's deadline (its stream may still be fine)."""


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


# answers of a peer that works but has no room for more now: busy, not broken
_NO_ROOM = frozenset({ErrorCode.CACHE_FULL, ErrorCode.TOO_MANY_SESSIONS, ErrorCode.OVERLOADED})


def is_busy(exc: BaseException) -> bool:
    """True when ``exc`` is a peer saying it is full (cache, sessions, queue) rather than failing."""
    return isinstance(exc, PeerError) and exc.code in _NO_ROOM
