"""Cache admission on a peer: chunked reservations, the per-session share, and who is evicted."""

from __future__ import annotations

import time

import pytest
import torch

from peerd.model.stage import KVCache
from peerd.server.metrics import PeerMetrics
from peerd.server.sessions import CHUNK_TOKENS, CacheBudget, ServerSession, SessionTable, chunked_length
from protocols import ErrorCode, ProtocolError


def test_reservations_grow_a_chunk_at_a_time_up_to_the_session_length() -> None:
    assert chunked_length(1, 2048) == CHUNK_TOKENS
    assert chunked_length(CHUNK_TOKENS + 1, 2048) == 2 * CHUNK_TOKENS
    assert chunked_length(2000, 2048) == 2048
    assert chunked_length(5, 32) == 32
    assert CacheBudget(8192, 1).session_cap_tokens == 2048  # a quarter of the budget
    assert CacheBudget(100, 1).session_cap_tokens == CHUNK_TOKENS  # never under one chunk


def _session(
    table: SessionTable, name: str, reserved: int, *, idle_s: float, steps: int, tokens: float
) -> ServerSession:
    cache = KVCache(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1))
    s = ServerSession(name.encode(), name, 0, 1, 1, 2048, cache, reserved, steps=steps)
    s.last_active, s.recent_tokens = time.monotonic() - idle_s, tokens
    table.sessions[s.session_id] = s
    table.owner_sessions[name] += 1
    table.budget.used_tokens += reserved
    return s


async def _no_writer(*_: object) -> None:
    raise AssertionError("sessions without a stream are never written to")


async def test_under_pressure_the_worst_hoarder_goes_first_and_only_when_that_makes_room() -> None:
    table = SessionTable(CacheBudget(1024, 1), PeerMetrics(), _no_writer, evict_idle_s=2.0)
    worker = _session(table, "worker", 512, idle_s=0.0, steps=50, tokens=200.0)  # busy decoding: safe
    keepalive = _session(table, "keepalive", 256, idle_s=1.0, steps=5, tokens=2.0)  # 256 held for ~2 tokens
    idle = _session(table, "idle", 128, idle_s=3.0, steps=9, tokens=20.0)  # idle past evict_idle_s
    fresh = _session(table, "fresh", 128, idle_s=0.1, steps=0, tokens=0.0)  # its first step is coming
    assert table.available_tokens() == 256 + 128
    with pytest.raises(ProtocolError) as refused:
        await table.reserve(600)  # more than every evictable session holds: nobody is evicted for nothing
    assert refused.value.code == ErrorCode.CACHE_FULL and table.evictions == 0
    await table.reserve(200)
    assert keepalive.evicted and not idle.evicted  # the keepalive holds more per recent token
    assert not worker.evicted and not fresh.evicted and table.budget.used_tokens == 1024 - 256 + 200
