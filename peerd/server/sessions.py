"""Server-side inference sessions and the KV cache budget they are charged against."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from peerd.model.stage import KVCache
from protocols import ErrorCode, ProtocolError

__all__ = ["CacheBudget", "ServerSession"]


class CacheBudget:
    """Counts KV cache tokens (batch x length) reserved by open sessions against a fixed limit.

    Sessions reserve their whole ``batch x max_length`` at open, so a session that was admitted can
    never fail later for lack of memory (no mid-generation surprises for the client).
    """

    def __init__(self, total_tokens: int, bytes_per_token: int) -> None:
        self.total_tokens = total_tokens
        self.bytes_per_token = bytes_per_token
        self.used_tokens = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

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
    writer: asyncio.StreamWriter | None = None  # to hand the session back with an error when draining
