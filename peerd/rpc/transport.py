"""Client side of the four stream protocols, with every lower-layer failure mapped once.

Each call opens a libp2p stream, sends ``Hello`` + the request back to back (no extra round trip),
and reads the answer under a deadline. Stream errors, timeouts and garbage become
:class:`PeerUnavailable`; an ``Error`` frame becomes :class:`PeerError` with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import torch
from hivemind.p2p import P2P, PeerID

from peerd.rpc.errors import PeerError, PeerTimedOut, PeerUnavailable
from peerd.rpc.hoptrace import HopTracer
from peerd.rpc.inference import InferenceStream
from peerd.rpc.p2pd import daemon_multiaddr
from peerd.rpc.relayed import open_via_relay, relay_of
from peerd.rpc.streams import STREAM_NAMES, drain_within
from peerd.rpc.tensors import from_wire, to_wire
from protocols import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    BackwardRequest,
    BackwardResponse,
    Compression,
    Error,
    ForwardRequest,
    ForwardResponse,
    Hello,
    InferenceOpen,
    InfoRequest,
    InfoResponse,
    Message,
    ProtocolError,
    expect_message,
    frame_parts,
    read_message,
    write_parts,
)

__all__ = ["InferenceStream", "PeerClient"]

M = TypeVar("M", bound=Message)
DIAL_TIMEOUT_S = 5.0  # connecting to a peer at its record's addresses (relayed: two hops)

logger = logging.getLogger(__name__)


class PeerClient:
    """Speaks to peers of one model over the client's own P2P instance."""

    def __init__(self, p2p: P2P, model_id: str, *, timeout_s: float = 30.0, client_name: str = "peerd-client") -> None:
        self.p2p = p2p
        self.model_id = model_id
        self.timeout_s = timeout_s
        self._hello = Hello(PROTOCOL_VERSION, model_id, client_name)
        # how to dial each peer, from its DHT record (learn_addresses): a peer behind NAT is only
        # reachable through the relay circuit its record names, which libp2p routing never learns
        self._addresses: dict[str, tuple[str, ...]] = {}
        self._dialled: set[str] = set()
        # how the last stream to each peer went: "direct", or "relay <relay peer id>" (peerd's relay)
        self.paths: dict[str, str] = {}
        self._circuits: set[str] = set()  # relayed peers we dialled through their libp2p circuit
        self._background: set[asyncio.Task[bool]] = set()
        # told (peer id, block-tokens, wall seconds) of every forward/backward answered: the speed a
        # client actually gets from a peer, network included (the Router weighs routes by it)
        self.observer: Callable[[str, int, float], None] | None = None
        self.tracer: HopTracer | None = None  # records inference steps' checkpoints (benchmarks, tests)

    def _observed(self, peer_id: str, hidden: torch.Tensor, blocks: int, started: float) -> None:
        if self.observer is not None:
            tokens = hidden.shape[0] * hidden.shape[1] if hidden.dim() >= 2 else 1
            self.observer(peer_id, tokens * blocks, time.perf_counter() - started)

    def learn_addresses(self, peer_id: str, addrs: Sequence[str]) -> None:
        """Dial ``peer_id`` at ``addrs`` (best first) before the next stream to it."""
        if tuple(addrs) != self._addresses.get(peer_id, ()):
            self._addresses[peer_id] = tuple(addrs)
            self._dialled.discard(peer_id)

    async def dial(self, peer_id: str) -> None:
        """Connect to ``peer_id`` at its learned addresses now (opening a stream does this itself)."""
        await self._dial(peer_id)

    async def _dial(self, peer_id: str) -> None:
        addrs = self._addresses.get(peer_id)
        if not addrs or peer_id in self._dialled:
            return
        if await self._connect(peer_id, addrs):
            self._dialled.add(peer_id)

    async def _connect(self, peer_id: str, addrs: Sequence[str]) -> bool:
        try:
            async with asyncio.timeout(min(self.timeout_s, DIAL_TIMEOUT_S)):
                await self.p2p._client.connect(PeerID.from_base58(peer_id), [daemon_multiaddr(a) for a in addrs])
            return True
        except Exception as exc:  # the stream open below may still find the peer; it reports failure
            logger.debug("dialling %s at %s failed: %s", peer_id, addrs, exc)
            return False

    async def _relays_to_use(self, peer_id: str) -> list[tuple[str, str]]:
        """The relays to reach ``peer_id`` through: those of its record if it is behind NAT and
        we have no direct connection to it (hole punching may have made one)."""
        addrs = self._addresses.get(peer_id, ())
        relays = [r for r in (relay_of(a) for a in addrs) if r is not None]
        if not relays or len(relays) < len(addrs):
            return []
        for info in await self.p2p.list_peers():
            if str(info.peer_id) == peer_id and any("p2p-circuit" not in str(a) for a in info.addrs):
                return []
        return relays

    def _invite_hole_punch(self, peer_id: str) -> None:
        """Connect to a relayed peer through its libp2p circuit, once and in the background.

        No data goes that way (libp2p's circuits are reset after 128 KiB), but an inbound relayed
        connection is what makes the peer's p2pd try hole punching (DCUtR); where the internet lets
        it through, the next stream finds a direct connection and skips the relay.
        """
        if peer_id in self._circuits:
            return
        self._circuits.add(peer_id)
        task = asyncio.create_task(self._connect(peer_id, self._addresses.get(peer_id, ())))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Cancel background dials (the P2P instance itself belongs to the caller)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _open(self, peer_id: str, rpc: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        relays = await self._relays_to_use(peer_id)
        if not relays:
            names_relays = any(relay_of(a) for a in self._addresses.get(peer_id, ()))
            if peer_id in self._circuits and not names_relays:
                # its record no longer names relays: drop our circuit connection to it, or libp2p
                # would see "connected" and send this stream over a circuit limited to 128 KiB
                self._circuits.discard(peer_id)
                with contextlib.suppress(Exception):
                    await self.p2p._client.disconnect(PeerID.from_base58(peer_id))
            await self._dial(peer_id)
            _, reader, writer = await self.p2p.call_binary_stream_handler(
                PeerID.from_base58(peer_id), STREAM_NAMES[rpc]
            )
            self.paths[peer_id] = "direct"
            return reader, writer
        self._invite_hole_punch(peer_id)
        failure: Exception | None = None
        for relay, relay_maddr in relays:
            if relay not in self._dialled and await self._connect(relay, [relay_maddr.removesuffix(f"/p2p/{relay}")]):
                self._dialled.add(relay)
            try:
                opened = await open_via_relay(self.p2p, relay, peer_id, STREAM_NAMES[rpc])
                self.paths[peer_id] = f"relay {relay}"
                return opened
            except Exception as exc:
                self._dialled.discard(relay)
                failure = exc
        assert failure is not None  # the loop ran at least once
        raise failure

    @asynccontextmanager
    async def _stream(self, peer_id: str, rpc: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await self._open(peer_id, rpc)
        except TimeoutError:
            self._dialled.discard(peer_id)
            raise PeerUnavailable(peer_id, f"could not open a {rpc} stream within {self.timeout_s:.0f}s") from None
        except Exception as exc:
            self._dialled.discard(peer_id)
            raise PeerUnavailable(peer_id, f"could not open a {rpc} stream: {exc}") from exc
        try:
            yield reader, writer
        finally:
            writer.close()

    async def _send(self, peer_id: str, writer: asyncio.StreamWriter, *msgs: Message) -> None:
        await self._write(peer_id, writer, frame_parts(msgs))

    async def _write(self, peer_id: str, writer: asyncio.StreamWriter, parts: list[bytes | memoryview]) -> None:
        try:
            write_parts(writer, parts)
            await drain_within(writer, self.timeout_s)
        except (OSError, ConnectionError, TimeoutError) as exc:
            raise PeerUnavailable(peer_id, f"send failed: {exc!r}") from exc

    async def _receive(
        self, peer_id: str, reader: asyncio.StreamReader, expected: type[M], timeout_s: float | None = None
    ) -> M:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                msg = await read_message(reader, DEFAULT_MAX_FRAME_BYTES)
        except TimeoutError:
            raise PeerTimedOut(peer_id, f"no answer within {timeout_s:.1f}s") from None
        except EOFError:
            raise PeerUnavailable(peer_id, "stream closed") from None
        except ProtocolError as exc:
            raise PeerUnavailable(peer_id, f"sent a malformed frame: {exc}") from exc
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            raise PeerUnavailable(peer_id, f"stream broke: {exc!r}") from exc
        try:
            return expect_message(msg, expected)
        except ProtocolError as exc:
            if isinstance(msg, Error):  # the peer's own answer: it refused, and says why
                raise PeerError(peer_id, exc.code, exc.message) from None
            raise PeerUnavailable(peer_id, f"answered out of turn: {exc.message}") from None

    async def info(self, peer_id: str, padding_bytes: int = 0) -> InfoResponse:
        """The peer's description; ``padding_bytes`` of filler ride along to time an upload."""
        async with self._stream(peer_id, "info") as (reader, writer):
            await self._send(peer_id, writer, self._hello, InfoRequest(bytes(padding_bytes)))
            return await self._receive(peer_id, reader, InfoResponse)

    async def forward(
        self,
        peer_id: str,
        hidden: torch.Tensor,
        start: int,
        end: int,
        compression: Compression = Compression.NONE,
    ) -> torch.Tensor:
        started = time.perf_counter()
        async with self._stream(peer_id, "forward") as (reader, writer):
            request = ForwardRequest(to_wire(hidden, compression), start, end, response_compression=compression)
            await self._send(peer_id, writer, self._hello, request)
            out = from_wire((await self._receive(peer_id, reader, ForwardResponse)).hidden)
        self._observed(peer_id, hidden, end - start, started)
        return out

    async def backward(
        self,
        peer_id: str,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        compression: Compression = Compression.NONE,
    ) -> torch.Tensor:
        started = time.perf_counter()
        async with self._stream(peer_id, "backward") as (reader, writer):
            request = BackwardRequest(
                to_wire(hidden, compression),
                to_wire(grad_output, compression),
                start,
                end,
                response_compression=compression,
            )
            await self._send(peer_id, writer, self._hello, request)
            grad = from_wire((await self._receive(peer_id, reader, BackwardResponse)).grad_input)
        self._observed(peer_id, hidden, 2 * (end - start), started)  # backward recomputes the forward
        return grad

    async def open_inference(
        self,
        peer_id: str,
        *,
        session_id: bytes,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        compression: Compression = Compression.NONE,
        confirm: bool = True,
    ) -> InferenceStream:
        """Open a session stream; the caller must ``close()`` the returned stream.

        ``confirm=False`` returns as soon as the request is written, without waiting a round trip
        for the peer's ``inference_opened``: the stream's first result reads it first, and a refusal
        (a full peer, blocks not served) is raised there (``InferenceStream.confirmed`` says which).
        """
        cm = self._stream(peer_id, "inference")
        reader, writer = await cm.__aenter__()
        try:
            opening = InferenceOpen(session_id, start, end, max_length, batch_size, response_compression=compression)
            await self._send(peer_id, writer, self._hello, opening)
            stream = InferenceStream(self, peer_id, session_id, reader, writer, cm, compression, confirmed=False)
            if confirm:
                await stream.confirm()
        except BaseException:
            await cm.__aexit__(None, None, None)
            raise
        return stream

    async def open_stream(self, peer_id: str, rpc: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A bare stream of protocol ``rpc`` to ``peer_id``, dialled as every other (the caller
        speaks on it and closes its writer); PeerUnavailable if it cannot be opened in time."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._open(peer_id, rpc)
        except Exception as exc:
            self._dialled.discard(peer_id)
            raise PeerUnavailable(peer_id, f"could not open a {rpc} stream: {exc!r}") from exc
