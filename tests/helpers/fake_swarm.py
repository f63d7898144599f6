"""An in-memory swarm for client unit tests: fake peers, a fake DHT view and a fake transport.

``FakeTransport`` stands in for ``peerd.rpc.transport.PeerClient`` and ``FakeDHT`` for
``peerd.swarm.dht.SwarmDHT`` (as a ``Router``'s ``BlockReader``), so ``Router``,
``InferenceSession`` and ``SpotChecker`` run without sockets, p2pd or torch models.

A fake peer's blocks are a toy computation with a real KV cache: block ``b`` maps the hidden states
at position ``t`` to ``x[t] + (b + 1) + 0.01 * sum(x[:t])``, so an output depends on every earlier
input of the session, and a replacement peer gives the same answers only if the session replayed
its history into it. ``reference(x, start, end)`` computes the honest answer for a whole sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import torch

from peerd.rpc.errors import PeerError, PeerUnavailable
from peerd.swarm.dht import BlockView
from peerd.swarm.records import PeerState, ServerRecord
from protocols import PROTOCOL_VERSION, Compression, ErrorCode, InfoResponse

MODEL_ID = "fake"
HIDDEN = 4


def reference(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The honest output of blocks [start, end) for a whole sequence ``hidden`` [b, n, h]."""
    x = hidden.float()
    for block in range(start, end):
        before = torch.cumsum(x, dim=1) - x  # sum of the earlier positions, per position
        x = x + (block + 1) + 0.01 * before
    return x


def record(peer_id: str, start: int, end: int, *, tps: float = 100.0, state: PeerState = PeerState.ONLINE):
    return ServerRecord(
        peer_id=peer_id, state=state, start=start, end=end, decode_tokens_per_s=tps, prefill_tokens_per_s=tps * 10,
        device="cpu", memory_total_bytes=1, memory_free_bytes=1, dtype="float32", cache_tokens_free=10_000,
        protocol_version=PROTOCOL_VERSION, package_version="0", public_name=peer_id,
    )  # fmt: skip


TRANSPORT_TIMEOUT_S = 30.0  # PeerClient's default read deadline


@dataclasses.dataclass
class FakePeer:
    """One peer: its record, and knobs to make it fail or lie."""

    record: ServerRecord
    fail_after_steps: int | None = None  # inference steps it answers before its streams break
    hang_after_steps: int | None = None  # inference steps it answers before it stops answering at all
    pauses_s: dict[int, float] = dataclasses.field(default_factory=dict)  # step number -> answered this late
    error: ErrorCode | None = None  # answer every request with this error code instead
    open_delay_s: float = 0.0  # how long opening a session on it takes (a round trip over a long link)
    lie: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied to every answer
    model_id: str = MODEL_ID
    quant: str | None = None  # what its `info` says about its weights (None: what its record says)
    steps: int = 0  # inference steps answered (all sessions)
    forwards: int = 0

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    def answer(self, full_input: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if self.error is not None:
            raise PeerError(self.peer_id, self.error, "refused (fake)")
        out = reference(full_input, start, end)
        return self.lie(out) if self.lie is not None else out


class FakeStream:
    """An open inference session on a fake peer: keeps the inputs it was sent (its KV cache)."""

    def __init__(self, peer: FakePeer, start: int, end: int, refusal: PeerError | None = None) -> None:
        self.peer, self.start, self.end = peer, start, end
        self.peer_id = peer.peer_id
        self.refusal = refusal  # an open sent unconfirmed that the peer refused: raised by the first step
        self.confirmed = refusal is None
        self.cache: torch.Tensor | None = None
        self.closed = False
        self.last_compute_ms = 0.0
        self.last_pushed = False  # fake peers never push (see tests/integration/test_push.py)

    async def step(
        self, hidden: torch.Tensor, position: int, timeout_s: float | None = None, *, step_id: int | None = None
    ) -> torch.Tensor:
        peer = self.peer
        if self.refusal is not None:
            raise self.refusal
        if self.closed or (peer.fail_after_steps is not None and peer.steps >= peer.fail_after_steps):
            raise PeerUnavailable(self.peer_id, "stream broke (fake)")
        if peer.hang_after_steps is not None and peer.steps >= peer.hang_after_steps:
            # a frozen peer: the answer never comes, so only the caller's deadline ends the wait
            try:
                async with asyncio.timeout(TRANSPORT_TIMEOUT_S if timeout_s is None else timeout_s):
                    await asyncio.Event().wait()
            except TimeoutError:
                raise PeerUnavailable(self.peer_id, f"no answer within {timeout_s}s (fake)") from None
        if pause_s := peer.pauses_s.get(peer.steps, 0.0):  # slow, not hung: busy with other sessions
            wait_s = TRANSPORT_TIMEOUT_S if timeout_s is None else timeout_s
            await asyncio.sleep(min(pause_s, wait_s))
            if pause_s > wait_s:
                raise PeerUnavailable(self.peer_id, f"no answer within {timeout_s}s (fake)")
        kept = self.cache[:, :position] if self.cache is not None else hidden[:, :0]
        self.cache = torch.cat([kept, hidden], dim=1)
        out = peer.answer(self.cache, self.start, self.end)[:, position:]
        peer.steps += 1
        return out

    async def close(self) -> None:
        self.closed = True


class FakeTransport:
    """``PeerClient``'s interface over fake peers; an unknown peer id is unreachable."""

    def __init__(self, peers: list[FakePeer], num_blocks: int) -> None:
        self.peers = {p.peer_id: p for p in peers}
        self.num_blocks = num_blocks
        self.opened: list[str] = []  # peer ids, in the order sessions were opened on them
        self.streams: list[FakeStream] = []  # every stream opened, closed ones included
        self.info_calls: list[str] = []  # peer ids asked for their info, in order
        self.confirms: list[bool] = []  # each open's ``confirm``: whether it waited for the peer's answer
        self.opening = 0  # opens in flight now
        self.most_opening = 0  # the most opens in flight at once so far
        self.addresses: dict[str, tuple[str, ...]] = {}  # what the router told it, from records
        self.timeout_s = TRANSPORT_TIMEOUT_S
        self.observer = None  # the router hooks in here (PeerClient reports forward/backward speeds)

    def learn_addresses(self, peer_id: str, addrs: object) -> None:
        self.addresses[peer_id] = tuple(addrs)  # type: ignore[call-overload]

    def _peer(self, peer_id: str) -> FakePeer:
        if peer_id not in self.peers:
            raise PeerUnavailable(peer_id, "unreachable (fake)")
        return self.peers[peer_id]

    async def info(self, peer_id: str) -> InfoResponse:
        self.info_calls.append(peer_id)
        peer = self._peer(peer_id)
        r = peer.record
        return InfoResponse(
            model_id=peer.model_id, block_start=r.start, block_end=r.end, num_blocks_total=self.num_blocks,
            dtype=r.dtype, max_batch_tokens=8192, max_session_length=2048, cache_tokens_free=10_000,
            cache_tokens_total=10_000, state="online", protocol_version=PROTOCOL_VERSION, package_version="0",
            public_name=peer_id, extra={"quant": r.quant if peer.quant is None else peer.quant},
        )  # fmt: skip

    async def forward(
        self, peer_id: str, hidden: torch.Tensor, start: int, end: int, compression: Compression = Compression.NONE
    ) -> torch.Tensor:
        peer = self._peer(peer_id)
        peer.forwards += 1
        return peer.answer(hidden, start, end)

    async def open_inference(
        self, peer_id: str, *, start: int, end: int, confirm: bool = True, **_: object
    ) -> FakeStream:
        """A session on the peer; one it refuses raises here, or (``confirm=False``, as the client
        opens routes) at the stream's first step, as a real peer's answer comes back then."""
        peer = self._peer(peer_id)
        self.confirms.append(confirm)
        self.opening += 1
        self.most_opening = max(self.most_opening, self.opening)
        try:
            await asyncio.sleep(peer.open_delay_s)
        finally:
            self.opening -= 1
        if peer.error is not None:
            if confirm:
                raise PeerError(peer_id, peer.error, "refused (fake)")
            self.streams.append(FakeStream(peer, start, end, refusal=PeerError(peer_id, peer.error, "refused (fake)")))
            return self.streams[-1]
        self.opened.append(peer_id)
        self.streams.append(FakeStream(peer, start, end))
        return self.streams[-1]


class FakeDHT:
    """The DHT as a ``Router`` reads it: every record of every peer, per block."""

    def __init__(self, peers: list[FakePeer], num_blocks: int) -> None:
        self.peers = peers
        self.num_blocks = num_blocks
        self.reads = 0
        self.delay_s = 0.0  # how long a read takes (it returns the records of when it started)
        self.error: Exception | None = None  # raised by reads instead, when set

    async def read_blocks(self, start: int = 0, end: int | None = None, *, timeout_s: float = 5.0) -> list[BlockView]:
        self.reads += 1
        end = self.num_blocks if end is None else end
        views = [
            BlockView(b, tuple(p.record for p in self.peers if p.record.start <= b < p.record.end))
            for b in range(start, end)
        ]
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return views
