"""Dial-back: ask a peer "can you open a connection to me?", and answer that question for others.

libp2p's own AutoNAT only judges public addresses, so on a LAN, in a test network or behind
carrier-grade NAT it never decides, and auto-relay never starts. Dial-back is our answer: at
start-up a peer asks the peers it joins through to try one TCP connection to its listening port at
the address they see it at. Only that observed address is ever dialled (never one the asker names),
so nobody can use peers to probe third parties; concurrency is bounded per service.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from hivemind.p2p import P2P, PeerID

from peerd.swarm.addresses import tcp_connect
from protocols import (
    STREAM_DIALBACK,
    DialBackRequest,
    DialBackResult,
    ErrorCode,
    ProtocolError,
    decode_message,
    encode_frame,
    error_from_exception,
    expect_message,
    raise_if_error,
    read_frame,
)

__all__ = ["DIAL_TIMEOUT_S", "DialBackService", "ask_dial_back", "observed_host"]

DIAL_TIMEOUT_S = 3.0  # a home NAT drops the SYN: no answer within this means "not reachable"
MAX_DIALBACK_FRAME_BYTES = 4096
READ_TIMEOUT_S = 5.0


def observed_host(addr: object) -> str | None:
    """The IP a stream came from (its multiaddr's ip4/ip6), or None for a relayed stream."""
    parts = str(addr).split("/")
    if "p2p-circuit" in parts or len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    return parts[2]


class DialBackService:
    """Serves ``peerd/dialback/1``: one TCP dial to the asker's observed address per request.

    At most ``max_concurrent`` dials run at once and one per asking peer; more are refused with
    OVERLOADED (retryable), so a flood of requests cannot turn this peer into a SYN cannon.
    """

    def __init__(self, *, max_concurrent: int = 8, dial_timeout_s: float = DIAL_TIMEOUT_S) -> None:
        self.dial_timeout_s = dial_timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._asking: set[str] = set()

    async def handle(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asker = str(stream_info.peer_id)
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    body = await read_frame(reader, MAX_DIALBACK_FRAME_BYTES)
                request = expect_message(decode_message(body, MAX_DIALBACK_FRAME_BYTES), DialBackRequest)
                if asker in self._asking or self._slots.locked():
                    raise ProtocolError(ErrorCode.OVERLOADED, "dial-back busy; ask again later")
                self._asking.add(asker)
                try:
                    async with self._slots:
                        result = await self._dial(stream_info.addr, request.port)
                finally:
                    self._asking.discard(asker)
                writer.write(encode_frame(result))
            except ProtocolError as exc:
                writer.write(encode_frame(error_from_exception(exc)))
            await writer.drain()
            # let the asker read the answer and close first: closing with bytes in flight can reset it
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(2.0):
                    await reader.read()
        except (OSError, TimeoutError, ConnectionError):
            pass  # the asker went away; nothing to tell it
        finally:
            writer.close()

    async def _dial(self, addr: object, port: int) -> DialBackResult:
        host = observed_host(addr)
        if host is None:
            return DialBackResult(reachable=False, observed="")
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return DialBackResult(await tcp_connect(host, port, self.dial_timeout_s) == "ok", shown)


async def ask_dial_back(p2p: P2P, peer_id: str, port: int, timeout_s: float = DIAL_TIMEOUT_S + 5.0) -> DialBackResult:
    """Ask ``peer_id`` to dial us back at ``port``; raises on any failure (network, refusal)."""
    async with asyncio.timeout(timeout_s):
        _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), STREAM_DIALBACK)
        try:
            writer.write(encode_frame(DialBackRequest(port=port)))
            await writer.drain()
            body = await read_frame(reader, MAX_DIALBACK_FRAME_BYTES)
            return expect_message(raise_if_error(decode_message(body, MAX_DIALBACK_FRAME_BYTES)), DialBackResult)
        finally:
            writer.close()
