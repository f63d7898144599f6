"""Simulated clients: each reads the DHT view (cached ``view_ttl_s``, as the SDK's Router does),
measures RTTs and plans with the SDK's own route planners."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from peerd.client.reservations import CacheBook
from peerd.client.routing import Span, plan_inference_route, plan_load_balanced_route
from peerd.sim.swarm import SimSwarm
from peerd.swarm.records import ServerRecord

__all__ = ["RttTable", "SimClient"]


class RttTable(Mapping[str, float]):
    """A client's measured RTT (ms) to every peer, read by id without building a dict per plan."""

    def __init__(self, swarm: SimSwarm, x: float, y: float) -> None:
        self.swarm, self.x, self.y = swarm, x, y
        self._ms = np.zeros(0)

    def _grow(self) -> None:
        peers = self.swarm.peers[len(self._ms) :]
        cfg = self.swarm.config
        dist = np.hypot([p.x - self.x for p in peers], [p.y - self.y for p in peers])
        self._ms = np.concatenate([self._ms, cfg.rtt_base_ms + cfg.rtt_span_ms * dist])

    def ms(self, idx: int) -> float:
        if idx >= len(self._ms):
            self._grow()
        return float(self._ms[idx])

    def __getitem__(self, peer_id: str) -> float:
        return self.ms(int(peer_id[1:]))

    def get(self, peer_id: str, default: float | None = None) -> float:  # type: ignore[override]
        return self.ms(int(peer_id[1:]))

    def __iter__(self) -> Iterator[str]:
        return (p.peer_id for p in self.swarm.peers)

    def __len__(self) -> int:
        return len(self.swarm.peers)


class SimClient:
    """One client process: its location, its cached DHT view and the route it planned on that view."""

    def __init__(self, swarm: SimSwarm, x: float, y: float, rng: random.Random, clock: Callable[[], float]) -> None:
        self.swarm = swarm
        self.rtt = RttTable(swarm, x, y)
        self.rng = rng
        self.book = CacheBook(hold_s=swarm.config.announce_period_s, clock=clock)
        self.servers: dict[str, ServerRecord] = {}
        self._view_at = -1e18
        self._view_version = -1
        self._route: list[Span] | None = None
        self.plans = 0

    def refresh(self, now: float) -> None:
        """Re-read the DHT if the cached view is older than ``view_ttl_s``."""
        if now - self._view_at < self.swarm.config.view_ttl_s:
            return
        self._view_at = now
        self.swarm.count_full_read()
        if self.swarm.version != self._view_version:
            self._view_version = self.swarm.version
            self.servers = self.swarm.view()
            self._route = None

    def plan(self, start: int, end: int, cache_tokens: int, banned: set[str]) -> list[Span]:
        """The SDK's inference route. Without spread or reservations the plan is a function of the
        view, so a client that plans twice on one view reuses it (what keeps 10,000 peers fast)."""
        cfg = self.swarm.config
        fixed = cfg.route_spread <= 0 and not cfg.cache_book
        whole = start == 0 and end == cfg.num_blocks and not banned
        if fixed and whole and self._route is not None:
            return self._route
        self.plans += 1
        route = plan_inference_route(
            self.servers,
            start,
            end,
            banned=banned,
            min_cache_tokens=cache_tokens,
            rtt_ms=self.rtt,
            reserved_tokens=self.book.taken() if cfg.cache_book else None,
            rng=self.rng,
            spread=cfg.route_spread,
        )
        if fixed and whole:
            self._route = route
        return route

    def plan_forward(self, banned: set[str]) -> list[Span]:
        self.plans += 1
        cfg = self.swarm.config
        return plan_load_balanced_route(
            self.servers, 0, cfg.num_blocks, banned=banned, rng=self.rng, bytes_per_token=cfg.hidden_bytes_per_token
        )
