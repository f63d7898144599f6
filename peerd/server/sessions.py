"""Server-side inference sessions, the KV cache budget they are charged against, and who gets it.

Cache is the one resource a client holds between requests, so it is what a squatter goes for: open
sessions, ask for the longest length, then sit on them. Identities are free, so per-client counters
alone cannot stop that; the rules below make held cache cost work instead:

* a session reserves cache in chunks of :data:`CHUNK_TOKENS` positions as it actually grows (its
  tensors grow with it), never ``batch x max_length`` up front, so holding cache takes steps;
* one session may hold at most :data:`SESSION_SHARE` of the budget;
* when an open or a growth does not fit, the peer evicts sessions that did not step for
  ``evict_idle_s``, or that hold more than :data:`HOARD_RATIO` cache tokens per token they processed
  recently (a keepalive does not count for much), never one mid-step; those holding the most cache
  per recent token go first, and get ``CACHE_FULL`` (retryable: the client's failover replays
  elsewhere or here). An idle session thus keeps its cache only while nobody needs it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from peerd.model.stage import KVCache
from peerd.server.metrics import PeerMetrics
from protocols import Compression, ErrorCode, ProtocolError

__all__ = [
    "CHUNK_TOKENS",
    "SESSION_SHARE",
    "CacheBudget",
    "PushLink",
    "ServerSession",
    "SessionTable",
    "chunked_length",
]

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 128  # positions reserved (and allocated) at a time as a session grows
SESSION_SHARE = 0.25  # most of the budget one session may hold (at least one chunk)
ACTIVITY_HALF_LIFE_S = 5.0  # how fast a session's recent-token count fades when it stops stepping
# Under pressure, a session holding more than this many cache tokens per recently processed token
# may be evicted even if it steps now and then: a keepalive does not earn cache, only work does.
# Recent tokens fade with a 5 s half-life (a mean life of 7.2 s), so holding one 128-token chunk
# takes about 1.1 tokens/s of steps, and holding 2048 tokens about 18 tokens/s (or a prefill of
# that size every few seconds).
HOARD_RATIO = 16.0
# an opened session's first step is on its way: it is not evicted before this share of evict_idle_s
FRESH_GRACE_SHARE = 0.25


class CacheBudget:
    """Counts KV cache tokens (batch x length) reserved by open sessions against a fixed limit."""

    def __init__(self, total_tokens: int, bytes_per_token: int) -> None:
        self.total_tokens = total_tokens
        self.bytes_per_token = bytes_per_token
        self.used_tokens = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

    @property
    def session_cap_tokens(self) -> int:
        """The most one session may hold: a share of the budget, never less than one chunk."""
        return max(CHUNK_TOKENS, int(SESSION_SHARE * self.total_tokens))

    def reserve(self, tokens: int) -> None:
        """Reserve ``tokens`` or raise CACHE_FULL (retryable: another peer may have room)."""
        if tokens > self.free_tokens:
            raise ProtocolError(
                ErrorCode.CACHE_FULL,
                f"KV cache full: session needs {tokens} tokens, {self.free_tokens} of {self.total_tokens} free",
            )
        self.used_tokens += tokens

    def release(self, tokens: int) -> None:
        self.used_tokens = max(0, self.used_tokens - tokens)


def chunked_length(needed: int, max_length: int) -> int:
    """Cache positions to hold ``needed`` tokens: rounded up to a chunk, capped at ``max_length``."""
    return min(max_length, CHUNK_TOKENS * math.ceil(max(1, needed) / CHUNK_TOKENS))


@dataclass(frozen=True, slots=True)
class PushLink:
    """A session's neighbours on its client's route (see protocols/push.py, InferenceLink)."""

    prev_peer: str = ""
    next_peer: str = ""
    next_session_id: bytes = b""


@dataclass
class ServerSession:
    """One client's inference session on this peer; it lives exactly as long as its stream."""

    session_id: bytes
    owner: str  # remote peer id
    start: int  # absolute block range this session runs
    end: int
    batch_size: int
    max_length: int
    cache: KVCache
    reserved_tokens: int
    length: int = 0  # tokens currently in the cache (the next append position)
    steps: int = 0
    last_active: float = field(default_factory=time.monotonic)
    writer: asyncio.StreamWriter | None = None  # to hand the session back with an error (drain, eviction)
    busy: bool = False  # a step is being validated, computed or answered: never evicted then
    evicted: bool = False
    recent_tokens: float = 0.0  # batch x tokens stepped, fading with ACTIVITY_HALF_LIFE_S
    response_compression: Compression = Compression.NONE  # of its answers (and pushed outputs)
    link: PushLink | None = None  # its neighbours on the client's route, if the client linked it (push.py)
    push_from: str = ""  # peer id of the push stream bound to it (one per predecessor at a time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, from the client or pushed

    def stepped(self, tokens: int, now: float) -> None:
        self.recent_tokens = self.activity(now) + tokens
        self.last_active = now

    def activity(self, now: float) -> float:
        return self.recent_tokens * float(0.5 ** (max(0.0, now - self.last_active) / ACTIVITY_HALF_LIFE_S))

    def hoarding(self, now: float) -> float:
        """Cache held per recently processed token: who is evicted first."""
        return self.reserved_tokens / (1.0 + self.activity(now))


SendError = Callable[[asyncio.StreamWriter, ProtocolError], Awaitable[None]]


class SessionTable:
    """The open sessions of one peer, their owners' counts, and the cache budget they share."""

    def __init__(self, budget: CacheBudget, metrics: PeerMetrics, send_error: SendError, evict_idle_s: float) -> None:
        self.budget = budget
        self.metrics = metrics
        self.send_error = send_error
        self.evict_idle_s = evict_idle_s
        self.sessions: dict[bytes, ServerSession] = {}
        # sessions per owner, counted from admission (before the cache is allocated) to close
        self.owner_sessions: collections.Counter[str] = collections.Counter()
        self.opening: set[bytes] = set()  # session ids admitted whose cache is being allocated
        self.no_sessions = asyncio.Event()  # set whenever no session is open (drain waits on it)
        self.no_sessions.set()
        self.evictions = 0

    def may_evict(self, s: ServerSession, now: float) -> bool:
        """Idle for ``evict_idle_s``, or holding over HOARD_RATIO x its recent tokens, or opened and
        never stepped for FRESH_GRACE_S; and not mid-step."""
        if s.busy or s.evicted:
            return False
        idle_s = now - s.last_active
        if s.steps == 0:
            return idle_s >= FRESH_GRACE_SHARE * self.evict_idle_s
        return idle_s >= self.evict_idle_s or s.hoarding(now) > HOARD_RATIO

    def available_tokens(self) -> int:
        """Free tokens plus those of sessions that would be evicted for a newcomer: what is announced."""
        now = time.monotonic()
        return self.budget.free_tokens + sum(
            s.reserved_tokens for s in self.sessions.values() if self.may_evict(s, now)
        )

    def evictable(self, now: float) -> list[ServerSession]:
        """Sessions that may be evicted now, the worst hoarders first."""
        idle = [s for s in self.sessions.values() if self.may_evict(s, now)]
        return sorted(idle, key=lambda s: s.hoarding(now), reverse=True)

    async def reserve(self, tokens: int) -> None:
        """Reserve ``tokens`` of cache, evicting idle hoarders if that makes room; else CACHE_FULL."""
        if tokens > self.budget.free_tokens:
            now = time.monotonic()
            victims, freed = [], self.budget.free_tokens
            for session in self.evictable(now):
                if freed >= tokens:
                    break
                victims.append(session)
                freed += session.reserved_tokens
            if freed >= tokens:  # evict only when it is enough: never for nothing
                for session in victims:
                    await self.evict(session, now)
        self.budget.reserve(tokens)

    async def make_session_room(self, max_sessions: int) -> None:
        """At the session cap, evict the worst idle hoarder so that a new session can open."""
        if len(self.sessions) + len(self.opening) >= max_sessions:
            now = time.monotonic()
            worst = self.evictable(now)
            if worst:
                await self.evict(worst[0], now)

    async def evict(self, session: ServerSession, now: float) -> None:
        session.evicted = True
        error = ProtocolError(
            ErrorCode.CACHE_FULL,
            f"session evicted: it held {session.reserved_tokens} cache tokens and was idle for "
            f"{now - session.last_active:.1f}s while others needed the cache; reopen it here or elsewhere",
        )
        self.evictions += 1
        self.close(session)
        if session.writer is not None:
            # one write of a whole frame: never interleaves with a step result (the session is not busy)
            await self.send_error(session.writer, error)
            session.writer.close()

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for open sessions to end, then hand the rest back with DRAINING."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.no_sessions.wait(), timeout_s)
        error = ProtocolError(ErrorCode.DRAINING, "peer is leaving the swarm; continue the session on another peer")
        # Operators (and the drain tests) read which way drain went: this line is its outcome.
        if self.sessions:
            logger.info("drain: handing %d session(s) back to their clients", len(self.sessions))
        else:
            logger.info("drain: every session finished in time")
        for session in list(self.sessions.values()):
            if session.writer is not None:
                # one write of a whole frame: never interleaves with a step result on the same stream
                await self.send_error(session.writer, error)
                session.writer.close()
            self.close(session)

    def close(self, session: ServerSession) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.budget.release(session.reserved_tokens)
            self.release_owner(session.owner)
        self.update_gauges()

    def release_owner(self, owner: str) -> None:
        self.owner_sessions[owner] -= 1
        if self.owner_sessions[owner] <= 0:
            del self.owner_sessions[owner]

    def update_gauges(self) -> None:
        if self.sessions:
            self.no_sessions.clear()
        else:
            self.no_sessions.set()
        self.metrics.sessions_active.set(len(self.sessions))
        self.metrics.cache_used.set(self.budget.used_tokens * self.budget.bytes_per_token)
