"""The client's view of the swarm and every routing decision made from it.

A :class:`Router` owns what a client knows about other peers: the latest online record of each
(a DHT read, read again in the background after ``view_refresh_s``), the bans, which peers' ``info`` has confirmed their
records (vetting), and measured RTTs. From these it plans routes (``peerd.client.routing``).
Sessions, spot checks and the training pipeline take a Router and a transport (``PeerClient``),
never the whole ``SwarmClient``, so each can be tested with in-memory fakes of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from peerd.client.bans import LIAR_BAN_S, BanList
from peerd.client.claims import SpeedBook
from peerd.client.reservations import CacheBook
from peerd.client.routing import (
    ROUTE_SPREAD,
    Span,
    plan_inference_route,
    plan_load_balanced_route,
    servers_by_peer,
)
from peerd.client.shortfall import explain_no_route
from peerd.model.quant import PRECISION_BITS, precision_bits
from peerd.rpc.errors import NoRouteError, PeerError, PeerUnavailable, RequestTooLargeError, is_busy
from peerd.rpc.rtt import RttProbe
from peerd.rpc.transport import PeerClient
from peerd.swarm.dht import BlockView
from peerd.swarm.records import ServerRecord
from protocols import PROTOCOL_VERSION, InfoResponse

__all__ = ["UNREACHABLE_RTT_MS", "BlockReader", "Router"]

OBSERVED_EWMA = 0.5  # weight of the newest forward/backward in a peer's observed throughput
UNREACHABLE_RTT_MS = 10_000.0  # the planning cost of a hop to a peer that did not answer a probe
VIEW_REFRESH_S = 5.0  # a view older than this is read again in the background (Router.servers)
INFO_REUSE_S = 10.0  # an RTT probe's `info` answer vets its peer if a route uses it within this long
VIEW_TTL_S = 60.0  # ... and one older than this before it is used (records expire in about 2 periods)

logger = logging.getLogger(__name__)


class BlockReader(Protocol):
    """Where block records come from: ``peerd.swarm.dht.SwarmDHT`` (or an in-memory fake in tests)."""

    async def read_blocks(
        self, start: int = 0, end: int | None = None, *, timeout_s: float = 5.0
    ) -> list[BlockView]: ...


class Router:
    """DHT view, bans, peer vetting, RTTs and route planning for one client of one model."""

    def __init__(
        self,
        dht: BlockReader,
        peers: PeerClient,
        *,
        model_id: str,
        num_blocks: int,
        dht_timeout_s: float = 5.0,
        route_wait_s: float = 30.0,
        view_ttl_s: float = VIEW_TTL_S,
        view_refresh_s: float = VIEW_REFRESH_S,
        allowed_peers: Iterable[str] | None = None,
        bans: BanList | None = None,
        rtt: RttProbe | None = None,
        min_precision: str | None = None,
        route_spread: float = ROUTE_SPREAD,
        rng: random.Random | None = None,
    ) -> None:
        self.dht = dht
        self.peers = peers
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.dht_timeout_s = dht_timeout_s
        self.route_wait_s = route_wait_s
        # a view older than view_refresh_s is used while a new one is read in the background; one
        # older than view_ttl_s is read again before it is used
        self.view_ttl_s = view_ttl_s
        self.view_refresh_s = view_refresh_s
        self._allowed_peers: frozenset[str] | None = None
        self.allowed_peers = frozenset(allowed_peers) if allowed_peers is not None else None  # the setter
        self._min_precision: str | None = None
        self.min_precision = min_precision  # checked by the setter
        self.bans = bans or BanList()
        # the RTT probe is an `info` round trip: its answer also vets the peer if used soon (check_peer)
        self._infos: dict[str, tuple[float, InfoResponse]] = {}
        self.rtt = rtt or RttProbe(self._probe_info)
        self.rtts_ms: dict[str, float] = {}  # measured client <-> peer round trips, for planning
        self._rtt_read_at: dict[str, float] = {}  # the probe time each value of rtts_ms came from
        self._servers: dict[str, ServerRecord] = {}
        self._servers_at = 0.0
        self._view_read_started = 0.0  # when the read that gave ``_servers`` began
        self._view_task: asyncio.Task[None] | None = None  # a background read (view_refresh_s)
        self._vetted: dict[str, tuple[int, int, str, str]] = {}  # peer -> record fields its `info` confirmed
        self.observed_tps: dict[str, float] = {}  # peer -> block-tokens/s this client got from it
        self.speeds = SpeedBook()  # inference steps: observed decode speeds, and what planning believes
        # sessions are spread over near-fastest routes (routing.py), not all sent to the fastest one
        self.route_spread = route_spread
        self.rng = rng or random.Random()
        self.cache_book = CacheBook()  # cache this client's sessions took that records do not show yet
        peers.observer = self.observe

    # --- the view ----------------------------------------------------------------------------------

    async def servers(self, refresh: bool = False) -> dict[str, ServerRecord]:
        """Online peers by id: a DHT view at most ``view_ttl_s`` old (``refresh``: read now).

        A view older than ``view_refresh_s`` is still used, and a new one is read in the background
        for the next call: a DHT read takes several round trips (190-370 ms over 50 ms links), and
        a session open that waited for it paid them in its time to first token every few seconds.
        A peer that left meanwhile fails at open and is routed around; one that joined is seen a
        read later.
        """
        age = self.view_age_s
        if refresh or not self._servers or age > self.view_ttl_s:
            await self._read_view()
        elif age > self.view_refresh_s and (self._view_task is None or self._view_task.done()):
            self._view_task = asyncio.create_task(self._read_view_in_background())
        return self._servers

    @property
    def view_age_s(self) -> float:
        """Seconds since the view in use was read (inf before the first read)."""
        return time.monotonic() - self._servers_at if self._servers_at else math.inf

    async def _read_view(self) -> None:
        started = time.monotonic()
        views = await self.dht.read_blocks(timeout_s=self.dht_timeout_s)
        if started < self._view_read_started:
            return  # a read begun later already replaced the view (a background read that took long)
        servers = servers_by_peer(views)
        # a peer of another protocol major cannot read our frames (nor we its): during an upgrade
        # a mixed swarm routes each client through the peers of its own major only
        servers = {p: r for p, r in servers.items() if r.protocol_version[0] == PROTOCOL_VERSION[0]}
        if self.allowed_peers is not None:
            servers = {p: r for p, r in servers.items() if p in self.allowed_peers}
        if self._min_precision is not None:
            least = PRECISION_BITS[self._min_precision]
            servers = {p: r for p, r in servers.items() if precision_bits(r.dtype, r.quant) >= least}
        for peer_id, record in servers.items():
            self.peers.learn_addresses(peer_id, record.addrs)  # peers behind NAT: their relay circuit
        self._servers = servers
        self._servers_at = time.monotonic()
        self._view_read_started = started

    async def _read_view_in_background(self) -> None:
        try:
            await self._read_view()
        except Exception as exc:  # the DHT slow or unreachable: keep the view, the next call tries again
            logger.info("background DHT read failed (%s); still planning from a view %.0fs old", exc, self.view_age_s)

    async def close(self) -> None:
        """Stop background reads and probes (the client is closing)."""
        tasks = [t for t in (self._view_task, self.rtt.background) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def allowed_peers(self) -> frozenset[str] | None:
        """Private swarm: use only these peers (None = any peer the DHT lists)."""
        return self._allowed_peers

    @allowed_peers.setter
    def allowed_peers(self, peer_ids: frozenset[str] | None) -> None:
        self._allowed_peers = peer_ids
        self._servers_at = 0.0  # the next view is filtered anew, before it is used

    @property
    def min_precision(self) -> str | None:
        """Route only through peers whose weights are stored in at least this precision (None: any)."""
        return self._min_precision

    @min_precision.setter
    def min_precision(self, precision: str | None) -> None:
        if precision is not None and precision not in PRECISION_BITS:
            raise ValueError(f"min_precision must be one of {', '.join(PRECISION_BITS)}, got {precision!r}")
        self._min_precision = precision
        self._servers_at = 0.0  # the next view is filtered anew, before it is used

    def known_records(self) -> Mapping[str, ServerRecord]:
        """The records of the last view read (no DHT access)."""
        return self._servers

    # --- bans --------------------------------------------------------------------------------------

    def ban(self, peer_id: str, reason: str = "", duration_s: float | None = None) -> None:
        duration = self.bans.ban(peer_id, duration_s)
        logger.info("banned peer %s for %.0fs: %s", peer_id[:16], duration, reason)

    def route_around(self, peer_id: str, exc: PeerUnavailable | PeerError) -> None:
        """Plan around a peer that failed a request: one that refused a session for lack of room (cache,
        sessions, queue: ``is_busy``) is counted full until its next announce (``CacheBook.mark_full``),
        so a user who then finds no route is told the swarm is busy; any other failure bans it."""
        if is_busy(exc):
            self.cache_book.mark_full(peer_id)
            logger.info("peer %s is out of cache: %s", peer_id[:16], exc)
        else:
            self.ban(peer_id, reason=str(exc))

    def banned(self) -> set[str]:
        return self.bans.banned()

    def succeeded(self, peer_id: str) -> None:
        """``peer_id`` served a request: its earlier failures stop counting (see BanList)."""
        self.bans.succeeded(peer_id)

    # --- vetting -----------------------------------------------------------------------------------

    async def check_peer(self, span: Span) -> None:
        """Before first using a peer, ask its ``info`` and compare with its DHT record (cached).

        A record is signed by its owner, but only the peer knows what it really loaded: a peer
        whose own answer disagrees with what it announced (another model or model size, or blocks it
        does not serve) is announcing falsely -- to attract traffic it cannot serve, or to see
        activations -- and is banned for a long time. Raises PeerUnavailable after banning it.
        """
        record = span.record
        claimed = (record.start, record.end, record.dtype, record.quant)
        if self._vetted.get(span.peer_id) == claimed:
            return
        probed = self._infos.pop(span.peer_id, None)  # a new client's first route probed it just now
        if probed is not None and time.monotonic() - probed[0] < INFO_REUSE_S:
            info = probed[1]
        else:
            info = await self.peers.info(span.peer_id)
        wrong_model = info.model_id != self.model_id or info.num_blocks_total != self.num_blocks
        problems = []
        if wrong_model:
            problems.append(f"serves {info.model_id!r} with {info.num_blocks_total} blocks")
        if (info.block_start, info.block_end) != (record.start, record.end):
            problems.append(f"serves blocks {info.block_start}:{info.block_end}, announced {record.start}:{record.end}")
        if info.dtype != record.dtype and record.dtype:
            problems.append(f"computes in {info.dtype}, announced {record.dtype}")
        quant = info.extra.get("quant", "none")
        if quant != record.quant:  # a peer that hides its quantization would pass a --min-precision filter
            problems.append(f"stores weights as {quant!r}, announced {record.quant!r}")
        if problems:
            reason = "info disagrees with its DHT record: " + "; ".join(problems)
            # A peer that is moving its blocks announces the new range within one period, so a range
            # mismatch gets an ordinary ban (it may be stale); another model is never innocent.
            self.ban(span.peer_id, reason=reason, duration_s=LIAR_BAN_S if wrong_model else None)
            raise PeerUnavailable(span.peer_id, reason)
        self._vetted[span.peer_id] = claimed

    async def _probe_info(self, peer_id: str) -> InfoResponse:
        """An RTT probe's round trip; its answer is kept for ``INFO_REUSE_S`` to vet the peer."""
        info = await self.peers.info(peer_id)
        now = time.monotonic()
        for old in [p for p, (at, _) in self._infos.items() if now - at >= INFO_REUSE_S]:
            del self._infos[old]
        self._infos[peer_id] = (now, info)
        return info

    # --- RTTs and planning -------------------------------------------------------------------------

    async def measure_rtts(self, peer_ids: Sequence[str]) -> None:
        """Measure RTT to candidate peers whose measurement is missing or stale (see ``RttProbe``).

        Each hop of an inference route is a client <-> peer round trip, so these RTTs are the
        network part of a route's per-token cost. An unreachable peer gets a prohibitive RTT.
        """
        measured = await self.rtt.rtts_ms(peer_ids, stale_in_background=True)
        for peer_id, rtt in measured.items():
            at = self.rtt.measured_at(peer_id)
            # only new probes update the planning RTTs: a peer not probed yet keeps the default hop
            # cost, and a value set here by hand (tests force equal RTTs) stays until the next probe
            if at is None or self._rtt_read_at.get(peer_id) == at:
                continue
            self._rtt_read_at[peer_id] = at
            self.rtts_ms[peer_id] = UNREACHABLE_RTT_MS if rtt is None else rtt

    async def plan_inference(
        self, start: int, end: int, cache_tokens: int, refresh: bool = False, *, last_view: bool = False
    ) -> list[Span]:
        """A near-lowest-latency route for [start, end) with room for ``cache_tokens`` (see routing.py):
        drawn among routes at most ``1 + route_spread`` times the fastest's cost, counting the cache
        this client's open sessions took (``cache_book``) against each peer's record.

        ``last_view`` plans from the last view read, however old, without touching the DHT: a
        failover's first try, because a DHT read can wait seconds on the very node that just hung
        (it is a DHT node too), and the last view usually lists other replicas already.
        """
        servers = self._servers if last_view and self._servers else await self.servers(refresh=refresh)
        banned = self.banned()
        await self.measure_rtts([p for p in servers if p not in banned])
        # a peer whose per-session cap is below the session refuses it at any load: not a candidate
        fitting = {p: r for p, r in servers.items() if not 0 < r.session_tokens_max < cache_tokens}
        return plan_inference_route(
            fitting,
            start,
            end,
            banned=banned,
            min_cache_tokens=cache_tokens,
            rtt_ms=self.rtts_ms,
            decode_tps=self.speeds.planning_speeds(servers),
            reserved_tokens=self.cache_book.taken(),
            rng=self.rng,
            spread=self.route_spread,
        )

    def explain_no_route(
        self, start: int, end: int, max_length: int, batch_size: int = 1
    ) -> NoRouteError | RequestTooLargeError:
        """Why the last view has no route for such a session: no peer, too large, or busy (shortfall.py)."""
        return explain_no_route(
            self._servers,
            start,
            end,
            max_length=max_length,
            batch_size=batch_size,
            banned=self.banned(),
            reserved_tokens=self.cache_book.taken(),
        )

    def has_alternative(self, span: Span, cache_tokens: int) -> bool:
        """True if the last view has a route for ``span``'s blocks without its peer (no DHT read)."""
        try:
            plan_inference_route(
                self._servers,
                span.start,
                span.end,
                banned=self.banned() | {span.peer_id},
                min_cache_tokens=cache_tokens,
                reserved_tokens=self.cache_book.taken(),
            )
        except NoRouteError:
            return False
        return True

    async def plan_load_balanced(
        self,
        start: int,
        end: int,
        *,
        rng: random.Random,
        refresh: bool = False,
        exclude: Iterable[str] = (),
        servers: Mapping[str, ServerRecord] | None = None,
        bytes_per_token: int = 0,
    ) -> list[Span]:
        """A throughput-weighted route for [start, end) avoiding banned and ``exclude`` peers (routing.py);
        ``bytes_per_token``: the size of the answers per token, to weigh peers' uplinks."""
        if servers is None or refresh:
            servers = await self.servers(refresh=refresh)
        return plan_load_balanced_route(
            servers,
            start,
            end,
            banned=self.banned() | set(exclude),
            rng=rng,
            observed_tps=self.observed_tps,
            bytes_per_token=bytes_per_token,
        )

    def observe(self, peer_id: str, block_tokens: int, elapsed_s: float) -> None:
        """A forward/backward answered: fold its speed (block-tokens per wall second) into the peer's
        running estimate, which load-balanced routing uses instead of the claimed number."""
        if block_tokens <= 0 or elapsed_s <= 0:
            return
        rate = block_tokens / elapsed_s
        previous = self.observed_tps.get(peer_id)
        self.observed_tps[peer_id] = rate if previous is None else (1 - OBSERVED_EWMA) * previous + OBSERVED_EWMA * rate

    async def wait_for_route(self, timeout_s: float | None = None) -> list[Span]:
        """Poll the DHT until a full route exists (or raise NoRouteError after ``timeout_s``)."""
        deadline = time.monotonic() + (self.route_wait_s if timeout_s is None else timeout_s)
        while True:
            try:
                return await self.plan_inference(0, self.num_blocks, 1, refresh=True)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)
