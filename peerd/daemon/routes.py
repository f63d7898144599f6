"""HTTP routes a peer serves: Prometheus metrics, a readiness probe, the swarm health page and its JSON.

``/``                the health page (static HTML/JS/CSS shipped in ``peerd/web/static``; no build step,
                     nothing fetched from elsewhere, so it works on an offline LAN)
``/api/v1/swarm``    what the page shows, as JSON: this peer, and per model the peers in the DHT,
                     per-block coverage and gaps (``peerd.swarm.status.status_from_views``) plus RTTs
``/metrics``         Prometheus text format, from this peer's own registry
``/healthz``         200 while the peer is online, 503 otherwise (container health checks)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from hivemind.p2p import P2P
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peerd import __version__
from peerd.config import PeerConfig
from peerd.daemon.capacity import Capacity, Hardware
from peerd.daemon.reachability import Reachability
from peerd.daemon.relaying import Relaying
from peerd.model.config import ModelConfig
from peerd.model.stage import Stage
from peerd.rpc.rtt import RTT_TIMEOUT_S, RttProbe
from peerd.rpc.speedprobe import SPEED_TIMEOUT_S, SpeedProbe, forward_one_token
from peerd.rpc.transport import PeerClient
from peerd.server.handlers import BlockServicer
from peerd.server.metrics import PeerMetrics
from peerd.server.runtime import ComputeRuntime
from peerd.swarm.dht import SwarmDHT
from peerd.swarm.records import PeerState
from peerd.swarm.status import status_from_views
from peerd.web.view import SwarmView

__all__ = ["API_CACHE_S", "DHT_READ_TIMEOUT_S", "peer_app", "refresh_peer_gauges", "swarm_document"]

logger = logging.getLogger(__name__)
Endpoint = Callable[[Request], Awaitable[Response]]

API_CACHE_S = 2.0  # page refreshes and several viewers share one DHT read per this many seconds
METRICS_VIEW_MAX_AGE_S = 10.0  # a scrape may show a swarm view this old (scrapes are 15 s apart)
DHT_READ_TIMEOUT_S = 3.0
# the text format generate_latest writes; Prometheus 2.x and 3.x both accept it
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The page only loads its own files and calls its own API: say so, so a hostile peer name can
# never pull in script from elsewhere even if the page had an escaping bug.
_PAGE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
)


class ServingPeer(Protocol):
    """What the routes read from a peer (``peerd.daemon.peer.Peer`` has it): state, parts, config."""

    @property
    def peer_id(self) -> str: ...
    @property
    def config(self) -> PeerConfig: ...
    @property
    def model_config(self) -> ModelConfig: ...
    @property
    def state(self) -> PeerState: ...
    @property
    def reachability(self) -> Reachability: ...
    @property
    def relaying(self) -> Relaying | None: ...
    @property
    def metrics(self) -> PeerMetrics: ...
    @property
    def p2p(self) -> P2P | None: ...
    @property
    def dht(self) -> SwarmDHT | None: ...
    @property
    def stage(self) -> Stage | None: ...
    @property
    def servicer(self) -> BlockServicer | None: ...
    @property
    def hardware(self) -> Hardware | None: ...
    @property
    def capacity(self) -> Capacity | None: ...
    @property
    def runtime(self) -> ComputeRuntime | None: ...
    @property
    def http_port(self) -> int | None: ...


_STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _static(name: str) -> Response:
    body = resources.files("peerd.web").joinpath("static", name).read_bytes()
    return Response(body, media_type=_STATIC_TYPES[name], headers=dict(_PAGE_HEADERS))


class _NoStore:
    """Every answer: never cached (it is live state) and never sniffed as another type."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control"]
                headers += [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def refresh_peer_gauges(peer: ServingPeer) -> None:
    """Set the gauges that are read from the peer rather than tracked as events."""
    m = peer.metrics
    m.set_state(peer.state.value)
    m.set_reach(peer.reachability.reach)
    if peer.runtime is not None:
        m.queue_depth.set(peer.runtime.queued)
    service = peer.relaying.service if peer.relaying is not None else None
    if service is not None:
        m.relay_streams.set(service.open_streams)
        m.relay_reservations.set(len(service.reservations))
    if peer.stage is not None:
        m.set_blocks(peer.stage.start, peer.stage.end)
        # with the cache gauge this gives the daemon's own overhead: resident - weights - cache
        m.weights.set(peer.stage.weight_bytes)  # as stored: int8/nf4/int4 weights and their scales
    if peer.servicer is not None:
        budget = peer.servicer.budget
        m.cache_limit.set(budget.total_tokens * budget.bytes_per_token)
        m.cache_used.set(budget.used_tokens * budget.bytes_per_token)
        m.sessions_active.set(len(peer.servicer.sessions))
        m.sessions_limit.set(peer.servicer.limits.max_sessions)
    if peer.capacity is not None:
        m.set_throughput(peer.capacity.decode_tokens_per_s, peer.capacity.prefill_tokens_per_s)
    if peer.dht is not None:
        m.dht_peers.set(peer.dht.routing_table_size())
    m.set_identity(
        peer_id=peer.peer_id,
        name=peer.config.public_name,
        model=peer.config.model_id,
        swarm=peer.config.swarm,
        version=__version__,
        device=peer.hardware.device if peer.hardware is not None else peer.config.device,
        dtype=str(peer.stage.dtype).removeprefix("torch.") if peer.stage is not None else "",
        quant=peer.stage.quant if peer.stage is not None else peer.config.quant,
    )


def _self_summary(peer: ServingPeer) -> dict[str, Any]:
    return {
        "peer_id": peer.peer_id,
        "name": peer.config.public_name,
        "state": peer.state.value,
        "version": __version__,
        "model_id": peer.config.model_id,
        "swarm": peer.config.swarm,
        "blocks": [peer.stage.start, peer.stage.end] if peer.stage is not None else None,
        "http_port": peer.http_port,
    }


async def swarm_document(
    peer: ServingPeer, rtt: RttProbe | None = None, speed: SpeedProbe | None = None
) -> dict[str, Any]:
    """Read the DHT now and build the ``/api/v1/swarm`` document (one model: the one this peer serves).

    ``speed``: time one token through every other online peer, shown as ``observed_tokens_per_s``
    beside the claimed ``decode_tokens_per_s`` (None: not measured).

    ``models`` is a list so that the page and API stay the same once a daemon can see several.
    """
    if peer.dht is None:
        raise RuntimeError("peer has not joined the swarm yet")
    views = await peer.dht.read_blocks(timeout_s=DHT_READ_TIMEOUT_S)
    status = status_from_views(peer.config.model_id, peer.model_config.num_layers, views)
    status["swarm"] = peer.config.swarm
    others = [p["peer_id"] for p in status["peers"] if p["state"] == "online" and p["peer_id"] != peer.peer_id]
    rtts = await rtt.rtts_ms(others) if rtt is not None else {}
    spans = {p["peer_id"]: (p["start"], p["end"]) for p in status["peers"] if p["peer_id"] in others}
    observed = await speed.tokens_per_s(spans) if speed is not None else {}
    for p in status["peers"]:
        p["self"] = p["peer_id"] == peer.peer_id
        p["rtt_ms"] = 0.0 if p["self"] else rtts.get(p["peer_id"])
        p["observed_tokens_per_s"] = observed.get(p["peer_id"])
        # an online record of a peer that does not answer: crashed (its record lingers until it
        # expires) or not reachable from here. None: not probed yet, or not online.
        probed = rtt is not None and p["peer_id"] in rtts and rtt.measured_at(p["peer_id"]) is not None
        p["reachable"] = True if p["self"] else (p["rtt_ms"] is not None if probed else None)
    return {"generated_at": time.time(), "self": _self_summary(peer), "models": [status]}


def peer_app(peer: ServingPeer) -> ASGIApp:
    """The peer's HTTP app; each peer gets its own swarm cache and RTT probe (nothing global)."""
    rtt: RttProbe | None = None
    speed: SpeedProbe | None = None
    if peer.p2p is not None:
        # the same info RPC a client uses
        info_client = PeerClient(peer.p2p, peer.config.model_id, timeout_s=RTT_TIMEOUT_S, client_name="peerd-health")
        rtt = RttProbe(info_client.info)
        # and the same forward RPC: what the page calls observed is what any client would see
        forward_client = PeerClient(
            peer.p2p, peer.config.model_id, timeout_s=SPEED_TIMEOUT_S, client_name="peerd-health"
        )
        speed = SpeedProbe(forward_one_token(forward_client, peer.model_config.hidden_size))

    async def read() -> dict[str, Any]:
        return await swarm_document(peer, rtt, speed)

    async def read_unprobed() -> dict[str, Any]:
        return await swarm_document(peer, rtt)

    view = SwarmView(read, max_age_s=API_CACHE_S)
    # scrapes never probe speeds: Prometheus would make every peer probe every other one all day,
    # and probe forwards would show in the peers' own token counters
    metrics_view = SwarmView(read_unprobed, max_age_s=API_CACHE_S)

    async def metrics(_: Request) -> Response:
        refresh_peer_gauges(peer)
        if peer.dht is not None:
            try:
                doc = await metrics_view.get(max_age_s=METRICS_VIEW_MAX_AGE_S)
            except Exception:  # a DHT hiccup must not fail the scrape of everything else
                logger.warning("swarm view for /metrics failed", exc_info=True)
            else:
                model = doc["models"][0]
                peer.metrics.set_swarm_view(
                    model["num_blocks"], model["peers"], [c["peers"] for c in model["coverage"]]
                )
        return Response(generate_latest(peer.metrics.registry), headers={"content-type": METRICS_CONTENT_TYPE})

    async def healthz(_: Request) -> Response:
        ok = peer.state is PeerState.ONLINE
        return Response(b"ok\n" if ok else b"not ready\n", status_code=200 if ok else 503, media_type="text/plain")

    async def api_swarm(_: Request) -> Response:
        if peer.dht is None:
            return Response(b'{"error": "not joined yet"}\n', status_code=503, media_type="application/json")
        doc = await view.get()
        return Response(json.dumps(doc).encode(), media_type="application/json")

    def static(name: str) -> Endpoint:
        response = _static(name)  # read once: the files are small and never change while running

        async def serve(_: Request) -> Response:
            return response

        return serve

    paths: dict[str, Endpoint] = {
        "/": static("index.html"),
        "/index.html": static("index.html"),
        "/static/app.js": static("app.js"),
        "/static/style.css": static("style.css"),
        "/static/favicon.svg": static("favicon.svg"),
        "/favicon.ico": static("favicon.svg"),
        "/api/v1/swarm": api_swarm,
        "/metrics": metrics,
        "/healthz": healthz,
    }
    return _NoStore(Starlette(routes=[Route(path, endpoint, methods=["GET"]) for path, endpoint in paths.items()]))
