"""HTTP routes a peer serves: Prometheus metrics and a readiness probe."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import generate_latest

from peerd.swarm.records import PeerState
from peerd.web.http import HttpResponse, Route

if TYPE_CHECKING:
    from peerd.peer import Peer

__all__ = ["peer_routes"]


def peer_routes(peer: Peer) -> dict[str, Route]:
    async def metrics() -> HttpResponse:
        if peer.dht is not None:
            peer.metrics.dht_peers.set(len(peer.dht.node.protocol.routing_table.uid_to_peer_id))
        return HttpResponse(generate_latest(peer.metrics.registry), "text/plain; version=0.0.4; charset=utf-8")

    async def healthz() -> HttpResponse:
        ok = peer.state is PeerState.ONLINE
        return HttpResponse(b"ok\n" if ok else b"not ready\n", status=200 if ok else 503)

    return {"/metrics": metrics, "/healthz": healthz}
