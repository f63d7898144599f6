"""Requests from the simulated clients: open on a planned route, fail over, finish or fail.

A refused open (``CACHE_FULL``) counts that peer full and plans the route again, as the SDK does
(a new session's whole route; a failed hop's blocks). A
peer that drains (a graceful stop or a move) hands its sessions back at once; a crashed one is
noticed only when the step deadline (``crash_detect_s``) passes. Then the client re-plans just
that hop's blocks, without the failed peer, on its last view; a request that finds no route for
``failover_timeout_s`` fails.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peerd.client.reservations import BUSY_WAIT_S, busy_backoff_s
from peerd.client.routing import Span
from peerd.rpc.errors import NoRouteError, SwarmBusyError
from peerd.sim.clients import SimClient
from peerd.sim.config import SimConfig
from peerd.sim.sessions import Sessions
from peerd.sim.swarm import SimPeer, SimSwarm

__all__ = ["Request", "Traffic"]

MAX_REFUSALS = 8  # opens refused with CACHE_FULL before a request waits for the next view


@dataclass
class Request:
    client: SimClient
    forward: bool
    route: list[tuple[Span, SimPeer, float]] = field(default_factory=list)
    banned: set[str] = field(default_factory=set)
    stalled_since: float | None = None  # no progress since (waiting for a route or a failover)
    failed_hop: int | None = None  # the hop being replaced, or None for the whole route
    busy_waits: int = 0  # re-plans after SwarmBusyError so far (the SDK's backoff)
    opened_at: float = 0.0


class Traffic:
    """The request half of the simulation (``Simulation`` adds the peers' events and the loop)."""

    cfg: SimConfig
    rng: random.Random
    gen: np.random.Generator
    swarm: SimSwarm
    sessions: Sessions
    clients: list[SimClient]
    requests: dict[int, Request]
    on_peer: np.ndarray
    now: float
    stats: dict[str, int]
    stalls: list[float]
    request_s: list[float]

    def at(self, when: float, kind: str, *args: Any) -> None:
        raise NotImplementedError

    def clock(self) -> float:
        """Simulated time: what the clients' cache books read."""
        return self.now

    def _on_arrive(self) -> None:
        client = self.rng.choice(self.clients)
        forward = self.rng.random() < self.cfg.forward_fraction
        tokens = self.cfg.forward_tokens if forward else self.cfg.session_tokens
        row = self.sessions.open(
            tokens, 1.0 / self.cfg.prefill_gain if forward else 1.0, self.clients.index(client), forward
        )
        self.requests[row] = Request(client, forward, stalled_since=self.now, opened_at=self.now)
        self.stats["requests"] += 1
        self._route_or_wait(row)

    def _plan(self, request: Request, start: int, end: int) -> list[Span]:
        if request.forward:
            return request.client.plan_forward(request.banned)
        return request.client.plan(start, end, self.cfg.session_tokens, request.banned)

    def _route_or_wait(self, row: int) -> None:
        """Find (part of) a route for ``row``; wait for the next tick if there is none yet."""
        request = self.requests[row]
        request.client.refresh(self.now)
        hop = request.failed_hop
        first, last = 0, self.cfg.num_blocks
        if hop is not None and not request.forward:  # only the failed hop's blocks are re-planned
            first, last = request.route[hop][0].start, request.route[hop][0].end
        try:
            spans = self._open_spans(request, first, last)
        except SwarmBusyError:
            self._wait(row, request, busy=self.cfg.busy_wait)
            return
        except NoRouteError:
            self._wait(row, request, busy=False)
            return
        if spans is None:  # MAX_REFUSALS refused opens: wait for the next tick
            self._wait(row, request, busy=False)
        else:
            self._install(row, request, spans)

    def _open_spans(self, request: Request, first: int, last: int) -> list[Span] | None:
        """Open a route over [first, last) as the SDK does: a span refused with ``CACHE_FULL`` marks
        its peer full and the whole range is planned again (``InferenceSession.open`` for a new
        session, ``_replace_one`` for a failed hop's blocks). None after MAX_REFUSALS refusals."""
        for _ in range(MAX_REFUSALS):
            spans = self._plan(request, first, last)
            full = next((s for s in spans if self.on_peer[int(s.peer_id[1:])] >= self.cfg.sessions_per_peer), None)
            if full is None:
                return spans
            self.stats["refusals"] += 1  # CACHE_FULL: the SDK counts it full (Router.route_around)
            if self.cfg.busy_wait:
                request.client.book.mark_full(full.peer_id)
            else:  # before: banned for the request
                request.banned.add(full.peer_id)
        return None

    def _wait(self, row: int, request: Request, *, busy: bool) -> None:
        """No route yet: an open or a failover that found the blocks served but full backs off for
        up to BUSY_WAIT_S (the SDK's ``_first_route`` and ``_replace_one``); anything else retries
        each tick for ``failover_timeout_s``; then the request fails."""
        assert request.stalled_since is not None
        limit = max(self.cfg.failover_timeout_s, BUSY_WAIT_S) if busy else self.cfg.failover_timeout_s
        if self.now - request.stalled_since >= limit:
            self._finish(row, failed=True)
        elif busy:
            self.stats["busy_waits"] += 1
            self.at(self.now + busy_backoff_s(request.busy_waits, self.rng), "retry", row)
            request.busy_waits += 1
        else:
            self.at(self.now + self.cfg.tick_s, "retry", row)

    def _install(self, row: int, request: Request, spans: list[Span]) -> None:
        hops = [(s, self.swarm.peers[int(s.peer_id[1:])], request.client.rtt[s.peer_id]) for s in spans]
        for _, peer, _ in request.route:
            self.on_peer[peer.idx] -= 1
        hop = request.failed_hop
        if not request.forward:  # the SDK's session: its cache book follows the hops it holds
            for span, _, _ in request.route if hop is None else request.route[hop : hop + 1]:
                request.client.book.release(span.peer_id, self.cfg.session_tokens)
            for span in spans:
                request.client.book.take(span.peer_id, self.cfg.session_tokens)
        if hop is not None and not request.forward:
            hops = [*request.route[:hop], *hops, *request.route[hop + 1 :]]
        request.route, request.failed_hop, request.busy_waits = hops, None, 0
        for _, peer, _ in hops:
            self.on_peer[peer.idx] += 1
        self.sessions.set_route(row, hops, forward=request.forward)
        self.sessions.resume_at[row] = self.now
        if request.stalled_since is not None:
            self.stalls.append(self.now - request.stalled_since)
            request.stalled_since = None

    def _on_retry(self, row: int) -> None:
        # a request handed back twice has two retries pending; the first may have routed it already
        if row in self.requests and self.requests[row].stalled_since is not None:
            self._route_or_wait(row)

    def _hand_back(self, peer: SimPeer, *, crashed: bool) -> None:
        """Every request with a hop on ``peer`` stops and fails over after the detection delay."""
        delay = self.cfg.crash_detect_s if crashed else self.cfg.handover_s
        for row in self.sessions.on_peer(peer.idx):
            request = self.requests[int(row)]
            hop = next(i for i, (_, p, _) in enumerate(request.route) if p is peer)
            # a second hop failing while the first is being replaced: re-plan the whole route
            request.failed_hop = hop if request.stalled_since is None else None
            request.banned.add(peer.peer_id)
            if request.stalled_since is None:
                request.stalled_since = self.now
            self.sessions.resume_at[row] = np.inf
            self.stats["failovers"] += 1
            self.at(self.now + delay, "retry", int(row))

    def _finish(self, row: int, *, failed: bool) -> None:
        request = self.requests.pop(row)
        for span, peer, _ in request.route:
            self.on_peer[peer.idx] -= 1
            if not request.forward:
                request.client.book.release(span.peer_id, self.cfg.session_tokens)
        if failed and request.stalled_since is not None:
            self.stalls.append(self.now - request.stalled_since)
        self.sessions.active[row] = False
        self.sessions.peer[row] = -1
        self.stats["failed" if failed else "completed"] += 1
        if not failed and not request.forward:
            self.request_s.append(self.now - request.opened_at)
