"""Route planning: which peers carry a request through blocks [start, end), as a chain of spans.

Inference routes minimise expected per-token latency: a shortest path over block boundaries
(nodes 0..N, an edge s -> e for every live peer hosting [s, e)), where an edge costs the peer's
compute time for those blocks (from its advertised per-block throughput) plus one network hop.
Dijkstra is exact here because all costs are positive.

Every client runs this planner on nearly the same view, and a record's free cache is up to one
announce period old; planned deterministically, new sessions from every client pile onto the same
fastest peers until those refuse with ``CACHE_FULL`` (the swarm simulator showed it: docs/scale.md).
So a client passes ``spread`` and an ``rng``: each peer's costs are scaled by its own random
factor in [1, 1 + spread], drawn small more often for peers with more free cache, and the route is
the fastest under those costs -- never more than ``1 + spread`` times the fastest route's cost.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from peerd.rpc.errors import NoRouteError, SwarmBusyError
from peerd.swarm.records import PeerState, ServerRecord, latest_per_peer
from peerd.swarm.views import BlockView, records_of

__all__ = [
    "ROUTE_SPREAD",
    "BalancedTable",
    "LaidOut",
    "RouteTable",
    "Span",
    "cost_factors",
    "hop_rate",
    "missing_blocks",
    "plan_balanced_over_table",
    "plan_inference_route",
    "plan_load_balanced_route",
    "plan_over_table",
    "servers_by_peer",
    "spread_draws",
]

DEFAULT_HOP_MS = 2.0  # cost of one hop to a peer whose RTT we have not measured
ROUTE_SPREAD = 0.25  # clients accept routes up to this much slower than the fastest, to spread load


@dataclass(frozen=True)
class Span:
    """One hop of a route: ``peer_id`` runs blocks [start, end)."""

    peer_id: str
    start: int
    end: int
    record: ServerRecord

    def __str__(self) -> str:
        name = self.record.public_name or self.peer_id[:12]
        return f"{name}[{self.start}:{self.end}]"


def servers_by_peer(views: Iterable[BlockView]) -> dict[str, ServerRecord]:
    """Latest online record per peer id (a peer's records for its blocks are identical)."""
    return latest_per_peer(records_of(views), lambda r: r.state is PeerState.ONLINE)


def missing_blocks(servers: Mapping[str, ServerRecord], start: int, end: int, banned: Iterable[str] = ()) -> list[int]:
    banned = set(banned)
    covered: set[int] = set()
    for record in servers.values():
        if record.peer_id not in banned:
            covered.update(range(record.start, record.end))
    return [b for b in range(start, end) if b not in covered]


def plan_inference_route(
    servers: Mapping[str, ServerRecord],
    start: int,
    end: int,
    *,
    banned: Iterable[str] = (),
    min_cache_tokens: int = 0,
    rtt_ms: Mapping[str, float] | None = None,
    decode_tps: Mapping[str, float] | None = None,
    reserved_tokens: Mapping[str, int] | None = None,
    rng: random.Random | None = None,
    spread: float = 0.0,
) -> list[Span]:
    """Fastest chain of spans covering [start, end) for one-token steps; raises NoRouteError.

    ``decode_tps`` overrides a peer's per-block decode speed (the client's own measurement, or a
    capped claim); without an entry, the record's claim is used. ``reserved_tokens``: cache this
    client took on a peer since its record was written (``CacheBook``), subtracted from the
    record's free cache. With ``rng`` and ``spread`` > 0 the route is drawn among near-fastest
    ones (see the module docstring): its cost is at most ``1 + spread`` times the fastest's.
    """
    banned = set(banned)
    rtt_ms = rtt_ms or {}
    speeds = decode_tps or {}
    reserved = reserved_tokens or {}
    usable = [
        r
        for r in servers.values()
        if r.peer_id not in banned
        and r.cache_tokens_free - reserved.get(r.peer_id, 0) >= min_cache_tokens
        and r.decode_tokens_per_s > 0
    ]
    table = RouteTable(
        start=np.array([r.start for r in usable], dtype=np.int64),
        end=np.array([r.end for r in usable], dtype=np.int64),
        hop_ms=np.array([rtt_ms.get(r.peer_id, DEFAULT_HOP_MS) for r in usable], dtype=np.float64),
        per_block_ms=np.array(
            [1e3 / max(1e-6, speeds.get(r.peer_id, r.decode_tokens_per_s)) for r in usable], dtype=np.float64
        ),
        headroom_tokens=np.array(
            [r.cache_tokens_free - reserved.get(r.peer_id, 0) - min_cache_tokens for r in usable], dtype=np.float64
        ),
    )
    uniforms = None if rng is None or spread <= 0 else np.array([rng.random() for _ in usable])
    chain = plan_over_table(table, start, end, uniforms=uniforms, spread=spread)
    if chain is None:
        missing = missing_blocks({r.peer_id: r for r in usable}, start, end)
        live = {r.peer_id: r for r in servers.values() if r.peer_id not in banned and r.decode_tokens_per_s > 0}
        unserved = missing_blocks(live, start, end)
        if missing and not unserved:
            raise SwarmBusyError(missing)  # served, but full: worth waiting for (reservations.busy_backoff_s)
        raise NoRouteError(unserved or missing or list(range(start, end)))
    return [Span(usable[i].peer_id, s, e, usable[i]) for i, s, e in chain]


@dataclass(frozen=True)
class RouteTable:
    """The candidate peers of one plan as arrays, one entry per peer: the blocks [start, end) it
    hosts, its hop cost and per-block compute time (ms), and its free cache beyond what the session
    needs (tokens; only the spread reads it). ``plan_inference_route`` builds one from records; the
    swarm simulator keeps its own and calls ``plan_over_table`` directly, so both plan alike."""

    start: np.ndarray
    end: np.ndarray
    hop_ms: np.ndarray
    per_block_ms: np.ndarray
    headroom_tokens: np.ndarray


class LaidOut(Protocol):
    """What ``plan_over_table`` needs of a layout kept across plans (``chain_index.ChainLayout``)."""

    def fastest_chain(
        self, hop_ms: np.ndarray, per_block_ms: np.ndarray, start: int, end: int
    ) -> list[tuple[int, int, int]] | None: ...


class Hosting(Protocol):
    """What ``plan_balanced_over_table`` needs of a layout kept across plans (``ChainLayout``)."""

    def hosting(self, block: int) -> np.ndarray: ...


def plan_over_table(
    table: RouteTable,
    start: int,
    end: int,
    *,
    uniforms: np.ndarray | None = None,
    spread: float = 0.0,
    usable: np.ndarray | None = None,
    layout: LaidOut | None = None,
) -> list[tuple[int, int, int]] | None:
    """The fastest chain over ``table``'s peers (only where ``usable``, a boolean mask, if given) as
    (peer index, start, end) spans, or None if some block has no peer. With ``uniforms`` (one
    uniform draw in [0, 1) per peer) and ``spread`` > 0, each peer's costs are scaled by
    ``cost_factors``: the route is drawn among near-fastest ones. ``layout``: a
    ``chain_index.ChainLayout(table.start, table.end)`` kept by a caller that plans many times over
    the same peers (the same routes)."""
    if layout is not None:
        ok = (table.start < table.end) if usable is None else usable & (table.start < table.end)
        hop_ms, per_block_ms = table.hop_ms, table.per_block_ms
        if uniforms is not None and spread > 0 and ok.any():
            pool = table.headroom_tokens if usable is None else table.headroom_tokens[usable]
            scale = np.ones(ok.size)
            scale[ok] = cost_factors(table.headroom_tokens[ok], uniforms[ok], spread, float(pool.mean()))
            hop_ms, per_block_ms = hop_ms * scale, per_block_ms * scale
        return layout.fastest_chain(np.where(ok, hop_ms, np.inf), per_block_ms, start, end)
    lo = np.maximum(table.start, start)
    hi = np.minimum(table.end, end)
    index = np.flatnonzero(lo < hi if usable is None else usable & (lo < hi))
    hop_ms, per_block_ms = table.hop_ms[index], table.per_block_ms[index]
    if uniforms is not None and spread > 0 and index.size:
        # the headroom is weighed against the mean over every usable peer, not only these blocks'
        pool = table.headroom_tokens if usable is None else table.headroom_tokens[usable]
        scale = cost_factors(table.headroom_tokens[index], uniforms[index], spread, float(pool.mean()))
        hop_ms, per_block_ms = hop_ms * scale, per_block_ms * scale
    chain = _fastest_chain(lo[index], hi[index], hop_ms, per_block_ms, start, end)
    return None if chain is None else [(int(index[i]), s, e) for i, s, e in chain]


def cost_factors(
    headroom_tokens: np.ndarray, uniforms: np.ndarray, spread: float, mean_headroom_tokens: float
) -> np.ndarray:
    """Per peer, 1 + spread x U**w with U uniform on [0, 1) and w its cache headroom (+1) over the
    mean headroom (+1) of the usable peers.

    A peer with w times the mean headroom draws a factor of 1 + spread / (w + 1) on average: a
    nearly full peer is often passed over for a near-equal one with room, an empty fast one rarely.
    """
    return 1.0 + spread * spread_draws(headroom_tokens, uniforms, mean_headroom_tokens)


def spread_draws(headroom_tokens: np.ndarray, uniforms: np.ndarray, mean_headroom_tokens: float) -> np.ndarray:
    """``cost_factors`` without the spread: U**w (the factor is 1 + spread x this)."""
    draws: np.ndarray = uniforms ** ((headroom_tokens + 1.0) / (mean_headroom_tokens + 1.0))
    return draws


def _fastest_chain(
    lo: np.ndarray, hi: np.ndarray, hop_ms: np.ndarray, per_block_ms: np.ndarray, start: int, end: int
) -> list[tuple[int, int, int]] | None:
    """Cheapest cover of [start, end) by rides [s, e) within [lo, hi) costing hop + (e - s) x per_block.

    Every ride moves forward in block order, so a dynamic programme over the boundaries in order is
    exact (no Dijkstra needed): after block b, the cheapest way to have done it on peer p either
    continues p's ride from block b - 1 or enters p at b from the cheapest route to boundary b, and
    the cheapest route to boundary b + 1 ends on the best such ride. The state is one entry per
    (peer, block it hosts) pair, laid out peer by peer so that a pair's predecessor is the entry
    before it; each block's step touches only its own pairs. A plan over 10,000 peers takes
    milliseconds, where one heap operation per pair took a second.
    """
    length = hi - lo
    if not length.size:
        return None
    peer_of = np.repeat(np.arange(lo.size), length)  # pair -> peer, peer by peer
    block_of = np.arange(peer_of.size) - np.repeat(np.cumsum(length) - length - lo, length)
    order = np.argsort(block_of.astype(np.int32), kind="stable")  # by block; within a block, by peer index
    bounds = np.searchsorted(block_of[order], np.arange(start, end + 1))
    cost = np.full(peer_of.size, np.inf)  # cheapest route that has done the pair's block on its peer
    entry = np.zeros(peer_of.size, dtype=np.int64)  # where that ride entered its peer
    best = 0.0  # cheapest route to the current boundary
    ends: list[tuple[int, int]] = []  # per boundary after start: (peer, where its ride was entered)
    for block in range(start, end):
        pairs = order[bounds[block - start] : bounds[block - start + 1]]
        if not pairs.size:
            return None
        peers = peer_of[pairs]
        enter = best + hop_ms[peers]
        cont = np.where(lo[peers] < block, cost[pairs - 1], np.inf)  # the same peer did block - 1
        cost[pairs] = np.minimum(enter, cont) + per_block_ms[peers]
        entry[pairs] = np.where(enter < cont, block, entry[pairs - 1])
        k = int(pairs[int(np.argmin(cost[pairs]))])
        best = float(cost[k])
        ends.append((int(peer_of[k]), int(entry[k])))
    return _walk_back(ends, start, end)


def _walk_back(ends: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    """The chain [(peer, first block, end block), ...] from the DP's best (peer, entry) per boundary."""
    chain: list[tuple[int, int, int]] = []
    boundary = end
    while boundary > start:
        peer, entered = ends[boundary - 1 - start]
        chain.append((peer, entered, boundary))
        boundary = entered
    chain.reverse()
    return chain


def hop_rate(record: ServerRecord, blocks: int, bytes_per_token: int) -> float:
    """Block-tokens per second a hop over ``blocks`` of ``record``'s blocks is expected to give:
    its claimed compute, plus sending back ``bytes_per_token`` per token over its published uplink."""
    compute_s = blocks / record.prefill_tokens_per_s  # per token, all of the hop's blocks
    transfer_s = bytes_per_token / record.uplink_bytes_per_s if record.uplink_bytes_per_s > 0 else 0.0
    return blocks / (compute_s + transfer_s)


def plan_load_balanced_route(
    servers: Mapping[str, ServerRecord],
    start: int,
    end: int,
    *,
    banned: Iterable[str] = (),
    rng: random.Random | None = None,
    observed_tps: Mapping[str, float] | None = None,
    bytes_per_token: int = 0,
) -> list[Span]:
    """A route for forward/backward batches, each hop drawn in proportion to throughput.

    Walks from ``start``: among live peers hosting the current block, picks one with probability
    proportional to its throughput and rides it as far as it goes. Load spreads across replicas
    instead of piling onto the single fastest peer. The throughput is what this client *observed*
    from the peer (``observed_tps``: block-tokens per second of wall time, network included, so a
    peer on a slow uplink is drawn rarely for large batches) where it has measured it, and the
    record's claimed prefill throughput until then, slowed by the time its answer (``bytes_per_token``
    per token) takes to cross the uplink the peer published, if it did (``hop_rate``).
    """
    observed = observed_tps or {}
    banned = set(banned)
    usable = [r for r in servers.values() if r.peer_id not in banned and r.prefill_tokens_per_s > 0]
    table = BalancedTable(
        start=np.array([r.start for r in usable], dtype=np.int64),
        end=np.array([r.end for r in usable], dtype=np.int64),
        prefill_tps=np.array([r.prefill_tokens_per_s for r in usable], dtype=np.float64),
        uplink_bytes_per_s=np.array([r.uplink_bytes_per_s for r in usable], dtype=np.float64),
        observed_tps=np.array([observed.get(r.peer_id, np.nan) for r in usable], dtype=np.float64),
    )
    chain = plan_balanced_over_table(table, start, end, rng=rng or random.Random(), bytes_per_token=bytes_per_token)
    if chain is None:
        raise NoRouteError(missing_blocks({r.peer_id: r for r in usable}, start, end))
    return [Span(usable[i].peer_id, s, e, usable[i]) for i, s, e in chain]


@dataclass(frozen=True)
class BalancedTable:
    """Candidates of a load-balanced route as arrays, one entry per peer: hosted blocks [start, end),
    claimed prefill tokens/s per block, published uplink (0: unknown) and this client's observed
    block-tokens/s (NaN where not measured)."""

    start: np.ndarray
    end: np.ndarray
    prefill_tps: np.ndarray
    uplink_bytes_per_s: np.ndarray
    observed_tps: np.ndarray


def plan_balanced_over_table(
    table: BalancedTable,
    start: int,
    end: int,
    *,
    rng: random.Random,
    bytes_per_token: int = 0,
    usable: np.ndarray | None = None,
    layout: Hosting | None = None,
) -> list[tuple[int, int, int]] | None:
    """``plan_load_balanced_route`` over arrays (only peers where ``usable``, if given): (peer index,
    start, end) spans, or None if some block has no peer. ``layout``: a
    ``chain_index.ChainLayout(table.start, table.end)`` kept across plans, which lists each block's
    hosts without a pass over every peer (the same routes)."""
    ok = table.prefill_tps > 0 if usable is None else usable & (table.prefill_tps > 0)
    transfer_s = np.divide(
        bytes_per_token,
        table.uplink_bytes_per_s,
        out=np.zeros(table.uplink_bytes_per_s.size),
        where=table.uplink_bytes_per_s > 0,
    )
    chain: list[tuple[int, int, int]] = []
    block = start
    while block < end:
        if layout is None:
            candidates = np.flatnonzero(ok & (table.start <= block) & (block < table.end))
        else:  # the block's hosts, in ascending order as flatnonzero gives them
            hosts = layout.hosting(block)
            candidates = hosts[ok[hosts]]
        if not candidates.size:
            return None
        blocks = np.minimum(table.end[candidates], end) - block
        claimed = blocks / (blocks / table.prefill_tps[candidates] + transfer_s[candidates])  # hop_rate
        observed = table.observed_tps[candidates]
        cumulative = np.cumsum(np.where(np.isnan(observed), claimed, observed))
        # as random.choices draws: one uniform, the first cumulative weight above it
        pick = int(np.searchsorted(cumulative, rng.random() * float(cumulative[-1]), side="right"))
        peer = int(candidates[min(pick, candidates.size - 1)])
        stop = min(int(table.end[peer]), end)
        chain.append((peer, block, stop))
        block = stop
    return chain
