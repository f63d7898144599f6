"""The event loop: peers join, place, rebalance and leave; clients open requests and fail over.

Time advances in ticks of ``tick_s``. Discrete events (a peer joining, re-checking, moving,
leaving, a crashed peer's record expiring, a client's failover) fire from a heap at their exact
times; between them, requests progress as a fluid (``sessions.py``). Everything random comes from
one seeded generator, so a seed gives the same run.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from peerd.sim.capacity import Capacity, cache_bound_tokens_per_s
from peerd.sim.clients import SimClient
from peerd.sim.config import SimConfig
from peerd.sim.sessions import Sessions
from peerd.sim.swarm import PeerPhase, SimPeer, SimSwarm
from peerd.sim.traffic import Request, Traffic

__all__ = ["SimResult", "Simulation"]

SAMPLE_S = 60.0  # one point of the time series per simulated minute


@dataclass
class SimResult:
    summary: dict[str, Any]
    series: dict[str, list[float]]


class Simulation(Traffic):
    """One run of ``config``; ``run()`` returns the summary and the per-minute series."""

    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.gen = np.random.default_rng(config.seed)
        self.swarm = SimSwarm(config, self.rng)
        self.sessions = Sessions(config)
        self.clients = [
            SimClient(self.swarm, float(self.gen.random()), float(self.gen.random()), self.rng, self.clock)
            for _ in range(config.clients)
        ]
        self.requests: dict[int, Request] = {}
        self.on_peer = np.zeros(0, dtype=np.int64)  # sessions holding a cache slot per peer
        self._events: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.capacity = Capacity(config)  # the bound's compute and KV cache capacities (capacity.py)
        self.now = 0.0
        self.arrival_rate = 0.0
        self.stats = {"requests": 0, "completed": 0, "failed": 0, "refusals": 0, "failovers": 0, "busy_waits": 0}
        self.stalls: list[float] = []
        self.request_s: list[float] = []  # open to last token of each completed generation
        self.series: dict[str, list[float]] = {
            k: []
            for k in (
                "t_s",
                "tokens_per_s",
                "bound_tokens_per_s",
                "gap_blocks",
                "failed",
                "stalled",
                "moves",
                "dht_msgs_per_peer_per_min",
                "peers",
                "cache_used",
                "route_hops",
            )
        }

    # --- events --------------------------------------------------------------------------------
    def at(self, when: float, kind: str, *args: Any) -> None:
        heapq.heappush(self._events, (when, next(self._seq), kind, args))

    def _fire(self, kind: str, args: tuple[Any, ...]) -> None:
        getattr(self, f"_on_{kind}")(*args)

    def _on_join(self, peer: SimPeer) -> None:
        # the daemon waits a random jitter so peers started together see each other
        self.at(self.now + self.rng.uniform(0, self.cfg.placement_jitter_s), "place", peer)

    def _on_place(self, peer: SimPeer) -> None:
        if peer.phase is PeerPhase.GONE:
            return
        choice = self.swarm.choose(peer)
        self.swarm.publish(peer, choice.start, choice.end, self.cfg.sessions_per_peer)
        self.at(self.now + self.cfg.placement_settle_s * self.rng.uniform(1.0, 1.5), "recheck", peer, 3)

    def _on_recheck(self, peer: SimPeer, left: int) -> None:
        if peer.phase is PeerPhase.GONE:
            return
        move = self.swarm.recheck(peer)
        if move is not None:
            self.swarm.publish(peer, move.start, move.end, self.cfg.sessions_per_peer)
        if left > 1:
            self.at(self.now + self.cfg.placement_settle_s * self.rng.uniform(1.0, 1.5), "recheck", peer, left - 1)
        else:
            self.at(self.now + peer.length * self.cfg.block_load_s, "online", peer)

    def _on_online(self, peer: SimPeer) -> None:
        if peer.phase is PeerPhase.GONE:
            return
        peer.phase = PeerPhase.ONLINE
        self.capacity.add(peer.decode_tps)
        self.swarm.refresh_record(peer, self.cfg.sessions_per_peer)
        self._schedule_rebalance(peer)

    def _schedule_rebalance(self, peer: SimPeer) -> None:
        if self.cfg.rebalance_period_s > 0:
            self.at(self.now + self.cfg.rebalance_period_s * self.rng.uniform(0.8, 1.2), "rebalance", peer)

    def _on_rebalance(self, peer: SimPeer) -> None:
        if peer.phase is not PeerPhase.ONLINE:
            return
        move = self.swarm.rebalance(peer)
        if move is None:
            self._schedule_rebalance(peer)
            return
        new_blocks = sum(1 for b in range(move.start, move.end) if not peer.start <= b < peer.end)
        self.at(self.now + new_blocks * self.cfg.block_load_s, "switch", peer, move.start, move.end)

    def _on_switch(self, peer: SimPeer, start: int, end: int) -> None:
        if peer.phase is not PeerPhase.ONLINE:
            return
        self.swarm.moves += 1
        self._hand_back(peer, crashed=False)  # its sessions are drained and handed back
        self.swarm.publish(peer, start, end, self.cfg.sessions_per_peer)
        self._schedule_rebalance(peer)

    def _on_leave(self, peer: SimPeer) -> None:
        if peer.phase is PeerPhase.GONE:
            return
        self._depart(peer, crashed=self.rng.random() < self.cfg.crash_fraction)
        # the next departure is the churn process's (_on_churn): a leave scheduling another leave
        # made every churn event start a chain of its own, so departures grew with time
        self.at(self.now, "join", self.swarm.new_peer(self.gen))  # churn keeps the swarm's size

    def _on_scripted(self, kind: str, idx: int) -> None:
        """A scripted event: a crash (SIGKILL), a graceful leave (SIGTERM) or a join of the next peer."""
        if kind == "join":
            self._on_join(self.swarm.new_peer(self.gen))
        elif self.swarm.peers[idx].phase is not PeerPhase.GONE:
            self._depart(self.swarm.peers[idx], crashed=kind == "crash")

    def _depart(self, peer: SimPeer, *, crashed: bool) -> None:
        if peer.phase is PeerPhase.ONLINE:
            self.capacity.add(peer.decode_tps, sign=-1)
        peer.phase = PeerPhase.GONE
        del self.swarm.not_gone[bisect.bisect_left(self.swarm.not_gone, peer.idx)]
        if crashed:  # the record stays until it expires: between 1 and 2 announce periods from now
            period = self.cfg.announce_period_s
            self.at(self.now + self.rng.uniform(period, 2 * period), "expire", peer)
        else:
            self.swarm.unpublish(peer)
        self._hand_back(peer, crashed=crashed)

    def _on_expire(self, peer: SimPeer) -> None:
        self.swarm.unpublish(peer)

    def _churn_gap_s(self) -> float:
        return 3600.0 / max(1e-9, self.cfg.churn_per_hour * self.cfg.peers)

    def _random_alive(self) -> SimPeer:
        """A uniform pick among the peers not gone of the last 4 x peers created."""
        alive = self.swarm.not_gone
        first = bisect.bisect_left(alive, len(self.swarm.peers) - 4 * self.cfg.peers)
        return self.swarm.peers[alive[first + self.rng.randrange(len(alive) - first)]]

    # --- the loop --------------------------------------------------------------------------------
    def run(self, progress: Any = None) -> SimResult:
        """Warm up (the first peers join), then simulate ``duration_s``; ``progress(done_fraction)``
        is called every simulated minute."""
        cfg, started = self.cfg, time.monotonic()
        for _ in range(cfg.peers):
            self.at(self.rng.uniform(0, cfg.warmup_s * 0.5), "join", self.swarm.new_peer(self.gen))
        if cfg.churn_per_hour > 0 and not cfg.script:
            self.at(cfg.warmup_s + self.gen.exponential(self._churn_gap_s()), "churn")
        for t_s, kind, idx in cfg.script:
            self.at(cfg.warmup_s + t_s, "scripted", kind, idx)
        end, ticks = cfg.warmup_s + cfg.duration_s, 0
        totals = {"delivered": 0.0, "bound": 0.0}
        window = {"delivered": 0.0, "bound": 0.0, "failed": 0.0}
        while self.now < end:
            self.now = cfg.tick_s * ticks
            ticks += 1
            while self._events and self._events[0][0] <= self.now:
                _, _, kind, args = heapq.heappop(self._events)
                self._fire(kind, args)
            if self.now < cfg.warmup_s:
                continue
            if self.arrival_rate == 0.0:
                self._refresh_idle_steps()
                self.arrival_rate = self._base_arrival_rate()
            self._announce_tick(ticks)
            if cfg.closed_sessions:
                self._refill()
            else:
                self._arrivals()
            delivered, done = self.sessions.advance(self.now, cfg.tick_s, len(self.swarm.peers))
            if cfg.observed_speeds and (self.now - cfg.warmup_s) % cfg.observe_period_s < cfg.tick_s:
                self._observe()
            for row in done:
                self._finish(int(row), failed=False)
            bound = min(self.capacity.compute(), self.capacity.cache(), self.sessions.demand())
            for acc in (totals, window):
                acc["delivered"] += delivered
                acc["bound"] += bound * cfg.tick_s
            if (self.now - cfg.warmup_s) % SAMPLE_S < cfg.tick_s and self.now > cfg.warmup_s:
                self._sample(window)
                self._refresh_idle_steps()
                if progress is not None:
                    progress((self.now - cfg.warmup_s) / cfg.duration_s)
        return SimResult(self._summary(totals, time.monotonic() - started), self.series)

    def _observe(self) -> None:
        """Each client folds the step times its sessions see now into its speed book (one sample per
        peer: the mean over its hops there), as the SDK's SpeedBook does on every step."""
        client, peer, rate = self.sessions.observed_steps(self.now)
        if not client.size:
            return
        keys, inverse = np.unique(client * len(self.swarm.peers) + peer, return_inverse=True)
        mean = np.bincount(inverse, weights=rate) / np.bincount(inverse)
        owners, peers = np.divmod(keys, len(self.swarm.peers))
        for c in np.unique(owners):
            mine = owners == c
            self.clients[int(c)].speeds.observe(peers[mine], mean[mine])

    def _on_churn(self) -> None:
        self._on_leave(self._random_alive())
        self.at(self.now + self.gen.exponential(self._churn_gap_s()), "churn")

    def _base_arrival_rate(self) -> float:
        """Requests/s that offer ``load`` x what the swarm can carry (compute and KV cache bound)."""
        cap = self.capacity
        self.capacity_at_start = {"compute_tokens_per_s": cap.compute(), "cache_tokens_per_s": cap.cache()}
        return self.cfg.load * cap.tokens_per_s() / cap.per_request_tokens()

    def _refresh_idle_steps(self) -> None:
        """The KV cache bound for the swarm as it is now (every simulated minute)."""
        view = self.swarm.table.snapshot()
        self.capacity.cache_tokens_per_s = cache_bound_tokens_per_s(view, self.clients, self.cfg)

    def _arrivals(self) -> None:
        cfg, rate = self.cfg, self.arrival_rate
        if cfg.spike_start_s <= self.now - cfg.warmup_s < cfg.spike_start_s + cfg.spike_duration_s:
            rate *= cfg.spike_factor
        for _ in range(int(self.gen.poisson(rate * cfg.tick_s))):
            self._on_arrive()

    def _refill(self) -> None:
        """Closed loop: open generations until ``closed_sessions`` are in flight (a new one as soon
        as one completes or fails, like a client looping over prompts)."""
        for _ in range(self.cfg.closed_sessions - len(self.requests)):
            self._on_arrive()

    def _announce_tick(self, tick: int) -> None:
        """Every peer re-announces each period: its records' stores, and a fresh free-cache figure
        (peers are spread over the period, one slice per tick)."""
        cfg = self.cfg
        slices = max(1, round(cfg.announce_period_s / cfg.tick_s))
        self.swarm.dht_stores += int(self.swarm.records_in_dht / slices)
        if self.on_peer.size < len(self.swarm.peers):
            self.on_peer = np.concatenate([self.on_peer, np.zeros(len(self.swarm.peers) - self.on_peer.size, np.int64)])
        for peer in self.swarm.peers[tick % slices :: slices]:
            if peer.in_dht and peer.phase is PeerPhase.ONLINE:
                free = max(0, cfg.sessions_per_peer - int(self.on_peer[peer.idx]))
                self.swarm.refresh_record(peer, free)

    def _dht_messages(self) -> float:
        """Messages so far: each get or store is one Kademlia lookup of about log2(N) hops plus the
        request itself (the model is in docs/scale.md)."""
        alive = max(2, sum(1 for p in self.swarm.peers if p.phase is not PeerPhase.GONE))
        return (self.swarm.dht_gets + self.swarm.dht_stores) * (math.ceil(math.log2(alive)) + 1)

    def _sample(self, window: dict[str, float]) -> None:
        cfg, s = self.cfg, self.series
        online = [p for p in self.swarm.peers if p.phase is PeerPhase.ONLINE]
        cover = np.zeros(cfg.num_blocks + 1)
        np.add.at(cover, [p.start for p in online], 1)
        np.add.at(cover, [p.end for p in online], -1)
        messages = self._dht_messages()
        previous = getattr(self, "_messages_before", 0.0)
        self._messages_before = messages
        s["t_s"].append(self.now - cfg.warmup_s)
        s["tokens_per_s"].append(window["delivered"] / SAMPLE_S)
        s["bound_tokens_per_s"].append(window["bound"] / SAMPLE_S)
        s["gap_blocks"].append(float((np.cumsum(cover)[:-1] == 0).sum()))
        s["failed"].append(float(self.stats["failed"]))
        s["stalled"].append(float(sum(1 for r in self.requests.values() if r.stalled_since is not None)))
        s["moves"].append(float(self.swarm.moves))
        s["dht_msgs_per_peer_per_min"].append((messages - previous) / max(1, len(online)) / (SAMPLE_S / 60))
        s["peers"].append(float(len(online)))
        # the KV cache slots held, as a share of the online peers' slots: near 1, opens wait for room
        slots = max(1, len(online) * cfg.sessions_per_peer)
        s["cache_used"].append(
            float(sum(int(self.on_peer[p.idx]) for p in online if p.idx < self.on_peer.size)) / slots
        )
        hops = [len(r.route) for r in self.requests.values() if r.route and not r.forward]
        s["route_hops"].append(float(np.mean(hops)) if hops else 0.0)
        window.update(delivered=0.0, bound=0.0, failed=0.0)

    def _summary(self, totals: dict[str, float], wall_s: float) -> dict[str, Any]:
        cfg, stats = self.cfg, self.stats
        ended = stats["completed"] + stats["failed"]
        minutes = cfg.duration_s / 60
        dht = self.series["dht_msgs_per_peer_per_min"]
        stalls = np.array(self.stalls) if self.stalls else np.zeros(1)
        return {
            "throughput_ratio_to_bound": totals["delivered"] / totals["bound"] if totals["bound"] else 0.0,
            "failed_request_fraction": stats["failed"] / ended if ended else 0.0,
            "p99_stall_s": float(np.percentile(stalls, 99)),
            "dht_messages_per_peer_per_min": float(np.mean(dht)) if dht else 0.0,
            "wall_s": wall_s,
            "tokens_per_s": totals["delivered"] / cfg.duration_s,
            "bound_tokens_per_s": totals["bound"] / cfg.duration_s,
            "requests": stats["requests"],
            "capacity_at_start": getattr(self, "capacity_at_start", {}),
            "completed": stats["completed"],
            "failed": stats["failed"],
            "refusals_cache_full": stats["refusals"],
            "busy_waits": stats["busy_waits"],
            "failovers": stats["failovers"],
            "median_stall_s": float(np.median(stalls)),
            "median_request_s": float(np.median(self.request_s)) if self.request_s else 0.0,
            "block_moves_per_hour": self.swarm.moves / (cfg.duration_s / 3600),
            "mean_gap_blocks": float(np.mean(self.series["gap_blocks"])) if self.series["gap_blocks"] else 0.0,
            "mean_cache_used": float(np.mean(self.series["cache_used"])) if self.series["cache_used"] else 0.0,
            "mean_route_hops": float(np.mean(self.series["route_hops"])) if self.series["route_hops"] else 0.0,
            "dht_records_read_per_peer_per_min": self.swarm.dht_records_read / max(1, cfg.peers) / minutes,
            "route_plans": sum(c.plans for c in self.clients),
            "config": dict(vars(cfg)),
        }
