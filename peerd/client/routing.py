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

import heapq
import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from peerd.rpc.errors import NoRouteError
from peerd.swarm.records import PeerState, ServerRecord, latest_per_peer
from peerd.swarm.views import BlockView, records_of

__all__ = [
    "ROUTE_SPREAD",
    "Span",
    "hop_rate",
    "missing_blocks",
    "plan_inference_route",
    "plan_load_balanced_route",
    "servers_by_peer",
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
    scale = _cost_factors(usable, reserved, min_cache_tokens, rng, spread)
    hops = [
        _Hop(
            r,
            max(r.start, start),
            min(r.end, end),
            rtt_ms.get(r.peer_id, DEFAULT_HOP_MS) * f,
            1e3 / max(1e-6, speeds.get(r.peer_id, r.decode_tokens_per_s)) * f,
        )
        for r, f in zip(usable, scale, strict=True)
    ]
    back = _shortest_paths([h for h in hops if h.lo < h.hi], start, end)
    if end not in back and start != end:
        missing = missing_blocks({r.peer_id: r for r in usable}, start, end)
        raise NoRouteError(missing or list(range(start, end)))
    route: list[Span] = []
    node: _Node = end
    while node != start:
        entered: _Node = node
        while not isinstance(back[entered], int):  # walk back inside the hop to where it was entered
            entered = back[entered]
        assert isinstance(node, int) and isinstance(entered, tuple)
        prev = back[entered]
        assert isinstance(prev, int)
        route.append(Span(hops[entered[0]].record.peer_id, prev, node, hops[entered[0]].record))
        node = prev
    route.reverse()
    return route


def _cost_factors(
    usable: Sequence[ServerRecord],
    reserved: Mapping[str, int],
    min_cache_tokens: int,
    rng: random.Random | None,
    spread: float,
) -> list[float]:
    """Per peer, 1 + spread x U**w with U uniform on [0, 1) and w its cache headroom over the mean.

    A peer with w times the mean headroom draws a factor of 1 + spread / (w + 1) on average: a
    nearly full peer is often passed over for a near-equal one with room, an empty fast one rarely.
    All 1.0 without an rng (the plain fastest route, deterministic).
    """
    if rng is None or spread <= 0 or not usable:
        return [1.0] * len(usable)
    headroom = [r.cache_tokens_free - reserved.get(r.peer_id, 0) - min_cache_tokens + 1 for r in usable]
    mean = sum(headroom) / len(headroom)
    return [1.0 + spread * rng.random() ** (h / mean) for h in headroom]


@dataclass(frozen=True)
class _Hop:
    record: ServerRecord
    lo: int  # the blocks of [start, end) it can run: [lo, hi)
    hi: int
    hop_ms: float
    per_block_ms: float


# A node is a block boundary (int) or (hop index, boundary): inside that hop, blocks done up to there.
_Node = int | tuple[int, int]


def _shortest_paths(hops: Sequence[_Hop], start: int, end: int) -> dict[_Node, _Node]:
    """Dijkstra from boundary ``start``; returns each reached node's predecessor.

    Riding peer P from boundary s to e costs P's hop plus (e - s) x its per-block time. Instead of
    one edge per (s, e) pair -- O(L^2) per peer, which made a plan over thousands of peers take
    seconds -- the graph enters P (hop + one block), steps inside P one block at a time and may
    leave at any boundary for free: O(L) per peer, and every path costs exactly the same.
    """
    entries: dict[int, list[int]] = {}
    for index, hop in enumerate(hops):
        for s in range(hop.lo, hop.hi):
            entries.setdefault(s, []).append(index)
    best: dict[_Node, float] = {start: 0.0}
    back: dict[_Node, _Node] = {}
    tie = itertools.count()
    heap: list[tuple[float, int, _Node]] = [(0.0, next(tie), start)]

    def relax(node: _Node, cost: float, prev: _Node) -> None:
        if cost < best.get(node, float("inf")):
            best[node], back[node] = cost, prev
            heapq.heappush(heap, (cost, next(tie), node))

    while heap:
        cost, _, node = heapq.heappop(heap)
        if node == end:
            break
        if cost > best.get(node, float("inf")):
            continue
        if isinstance(node, int):
            for index in entries.get(node, ()):
                relax((index, node + 1), cost + hops[index].hop_ms + hops[index].per_block_ms, node)
        else:
            index, boundary = node
            relax(boundary, cost, node)
            if boundary < hops[index].hi:
                relax((index, boundary + 1), cost + hops[index].per_block_ms, node)
    return back


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
    per token) takes to cross the uplink the peer published, if it did.
    """
    observed = observed_tps or {}

    def weight(record: ServerRecord, block: int) -> float:
        if record.peer_id in observed:
            return observed[record.peer_id]
        return hop_rate(record, min(record.end, end) - block, bytes_per_token)

    rng = rng or random.Random()
    banned = set(banned)
    usable = [r for r in servers.values() if r.peer_id not in banned and r.prefill_tokens_per_s > 0]
    route: list[Span] = []
    block = start
    while block < end:
        candidates: Sequence[ServerRecord] = [r for r in usable if r.start <= block < r.end]
        if not candidates:
            raise NoRouteError(missing_blocks({r.peer_id: r for r in usable}, start, end))
        record = rng.choices(candidates, weights=[weight(r, block) for r in candidates])[0]
        stop = min(record.end, end)
        route.append(Span(record.peer_id, block, stop, record))
        block = stop
    return route
