"""Route planning: which peers carry a request through blocks [start, end), as a chain of spans.

Inference routes minimise expected per-token latency: a shortest path over block boundaries
(nodes 0..N, an edge s -> e for every live peer hosting [s, e)), where an edge costs the peer's
compute time for those blocks (from its advertised per-block throughput) plus one network hop.
Dijkstra is exact here because all costs are positive.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from peerd.rpc.errors import NoRouteError
from peerd.swarm.dht import BlockView, records_of
from peerd.swarm.records import PeerState, ServerRecord, latest_per_peer

__all__ = ["Span", "hop_rate", "missing_blocks", "plan_inference_route", "plan_load_balanced_route", "servers_by_peer"]

DEFAULT_HOP_MS = 2.0  # cost of one hop to a peer whose RTT we have not measured


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
) -> list[Span]:
    """Fastest chain of spans covering [start, end) for one-token steps; raises NoRouteError.

    ``decode_tps`` overrides a peer's per-block decode speed (the client's own measurement, or a
    capped claim); without an entry, the record's claim is used.
    """
    banned = set(banned)
    rtt_ms = rtt_ms or {}
    speeds = decode_tps or {}
    usable = [
        r
        for r in servers.values()
        if r.peer_id not in banned and r.cache_tokens_free >= min_cache_tokens and r.decode_tokens_per_s > 0
    ]
    # edges[s] = list of (e, cost_ms, record)
    edges: dict[int, list[tuple[int, float, ServerRecord]]] = {}
    for record in usable:
        lo, hi = max(record.start, start), min(record.end, end)
        per_block_ms = 1e3 / max(1e-6, speeds.get(record.peer_id, record.decode_tokens_per_s))
        hop_ms = rtt_ms.get(record.peer_id, DEFAULT_HOP_MS)
        for s in range(lo, hi):
            for e in range(s + 1, hi + 1):
                edges.setdefault(s, []).append((e, hop_ms + (e - s) * per_block_ms, record))
    best: dict[int, float] = {start: 0.0}
    back: dict[int, tuple[int, ServerRecord]] = {}
    tie = itertools.count()
    heap = [(0.0, next(tie), start)]
    while heap:
        cost, _, node = heapq.heappop(heap)
        if node == end:
            break
        if cost > best.get(node, float("inf")):
            continue
        for e, edge_cost, record in edges.get(node, ()):
            total = cost + edge_cost
            if total < best.get(e, float("inf")):
                best[e] = total
                back[e] = (node, record)
                heapq.heappush(heap, (total, next(tie), e))
    if end not in back and start != end:
        missing = missing_blocks({r.peer_id: r for r in usable}, start, end)
        raise NoRouteError(missing or list(range(start, end)))
    route: list[Span] = []
    node = end
    while node != start:
        prev, record = back[node]
        route.append(Span(record.peer_id, prev, node, record))
        node = prev
    route.reverse()
    return route


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
