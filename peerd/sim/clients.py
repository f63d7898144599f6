"""Simulated clients: each reads the DHT view (cached ``view_ttl_s``, as the SDK's Router does),
measures RTTs and plans with the SDK's own route planners."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from peerd.client.claims import CLAIM_CAP_FACTOR, EWMA, MIN_SAMPLES
from peerd.client.pruned_chains import PrunedChains
from peerd.client.reservations import CacheBook
from peerd.client.routing import BalancedTable, RouteTable, Span, plan_balanced_over_table, plan_over_table
from peerd.rpc.errors import NoRouteError, SwarmBusyError
from peerd.sim.swarm import SimSwarm

__all__ = ["RttTable", "SimClient"]

# Below this many peers in a view, PrunedChains' upkeep costs more than it saves (measured: 100 and
# 1,000 peers ran 10-15% slower with it, 10,000 faster): plan over the shared layout of the view.
PRUNE_FROM_PEERS = 4000
ROOMY_SESSIONS = 3  # a peer with room for this many more sessions may set other peers aside (PrunedChains)


class RttTable(Mapping[str, float]):
    """A client's measured RTT (ms) to every peer, read by id without building a dict per plan."""

    def __init__(self, swarm: SimSwarm, x: float, y: float) -> None:
        self.swarm, self.x, self.y = swarm, x, y
        self._ms = np.zeros(0)

    def _grow(self) -> None:
        peers = self.swarm.peers[len(self._ms) :]
        cfg = self.swarm.config
        dist = np.hypot([p.x - self.x for p in peers], [p.y - self.y for p in peers])
        ms = cfg.rtt_base_ms + cfg.rtt_span_ms * dist
        fixed = [i for i, p in enumerate(peers) if p.rtt_ms is not None]  # scripted peers
        ms[fixed] = [peers[i].rtt_ms for i in fixed]
        self._ms = np.concatenate([self._ms, ms])

    def array(self, size: int) -> np.ndarray:
        """RTTs (ms) to peers 0..size-1."""
        if size > len(self._ms):
            self._grow()
        return self._ms[:size]

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


class ObservedSpeeds:
    """The SDK's ``SpeedBook`` (peerd/client/claims.py) over arrays indexed by peer: the same EWMA,
    sample count and claim cap (its constants, imported), so that planning thousands of peers does
    not build a dict of records per plan. ``tests/unit/test_sim.py`` checks both agree."""

    def __init__(self) -> None:
        self.tps = np.zeros(0)  # per block, one-token steps, as this client timed them
        self.samples = np.zeros(0, dtype=np.int64)
        self.version = 0  # bumped by every observe: planning speeds may have changed

    def _grow(self, size: int) -> None:
        if size > self.tps.size:
            self.tps = np.concatenate([self.tps, np.zeros(size - self.tps.size)])
            self.samples = np.concatenate([self.samples, np.zeros(size - self.samples.size, dtype=np.int64)])

    def observe(self, peers: np.ndarray, tokens_per_s: np.ndarray) -> None:
        """One timed step per entry; ``peers`` must not repeat (average repeats first)."""
        if peers.size:
            self._grow(int(peers.max()) + 1)
        self.version += 1
        first = self.samples[peers] == 0
        self.tps[peers] = np.where(first, tokens_per_s, (1 - EWMA) * self.tps[peers] + EWMA * tokens_per_s)
        self.samples[peers] += 1

    @staticmethod
    def claim_cap(claims: np.ndarray, listed: np.ndarray) -> float:
        """The cap on unmeasured claims: CLAIM_CAP_FACTOR x the median claim listed in the view."""
        listed_claims = np.sort(claims[listed & (claims > 0)])
        return CLAIM_CAP_FACTOR * float(listed_claims[(listed_claims.size - 1) // 2]) if listed_claims.size else 0.0

    def planning_speeds(self, claims: np.ndarray, listed: np.ndarray, cap: float | None = None) -> np.ndarray:
        """``SpeedBook.planning_speeds`` for the peers ``listed`` in the view (others: their claim);
        ``cap``: ``claim_cap(claims, listed)`` if the caller kept it for this view."""
        self._grow(claims.size)
        cap = self.claim_cap(claims, listed) if cap is None else cap
        measured = self.samples[: claims.size] >= MIN_SAMPLES
        return np.where(measured, self.tps[: claims.size], np.minimum(claims, cap))


class SimClient:
    """One client process: its location, its cached DHT view and its cache book. It plans with the
    SDK's planners over arrays (``plan_over_table``, ``plan_balanced_over_table``: what
    ``plan_inference_route`` and ``plan_load_balanced_route`` run on the records they are given);
    inference routes go through ``PrunedChains``, which returns ``plan_over_table``'s routes faster
    and is rebuilt whenever the view or the speed book changes."""

    def __init__(self, swarm: SimSwarm, x: float, y: float, rng: random.Random, clock: Callable[[], float]) -> None:
        self.swarm = swarm
        self.rtt = RttTable(swarm, x, y)
        self.rng = rng
        self.gen = np.random.default_rng(rng.getrandbits(64))  # the spread's uniform draws
        self.book = CacheBook(hold_s=swarm.config.announce_period_s, clock=clock, on_change=self._book_changed)
        self._reserved = np.zeros(0)  # per peer index: what the book holds on it (its on_change keeps it)
        self.speeds = ObservedSpeeds()
        self.view = swarm.table.snapshot()
        self._chains: PrunedChains | None = None  # the planner's index for this view and speed book
        self._chains_at = (-1, -1)  # (view version, speed book version) it was built for
        self._cap: float | None = None  # the claim cap for this view
        self._step = np.zeros(0)  # _per_block_ms() for (view version, speed book version) _step_at
        self._step_at = (-1, -1)
        self._view_at = -1e18
        self._view_version = -1
        self._listed, self._listed_at = np.zeros(0, dtype=bool), -2  # _serving(), and the view it is of
        self.plans = 0

    def refresh(self, now: float) -> None:
        """Re-read the DHT if the cached view is older than ``view_ttl_s``."""
        if now - self._view_at < self.swarm.config.view_ttl_s:
            return
        self._view_at = now
        self.swarm.count_full_read()
        if self.swarm.version != self._view_version:
            self._view_version = self.swarm.version
            self.view = self.swarm.table.snapshot()
            self._cap = None

    def _serving(self) -> np.ndarray:
        """The peers of this view that serve at all (computed once per view; do not modify)."""
        if self._listed_at != self._view_version:
            self._listed, self._listed_at = self.view.visible & (self.view.decode_tps > 0), self._view_version
        return self._listed

    def _usable(self, banned: set[str]) -> np.ndarray:
        usable = self._serving().copy()
        for peer_id in banned:
            idx = int(peer_id[1:])
            if idx < usable.size:
                usable[idx] = False
        return usable

    def _spans(
        self, chain: list[tuple[int, int, int]] | None, start: int, end: int, live: np.ndarray | None = None
    ) -> list[Span]:
        """Spans of ``chain``; for None, SwarmBusyError if the ``live`` peers (full ones included)
        cover [start, end), as ``plan_inference_route`` raises, else NoRouteError."""
        if chain is None:
            if live is not None:
                cover = np.zeros(self.swarm.config.num_blocks + 1, dtype=np.int64)
                np.add.at(cover, self.view.start[live], 1)
                np.add.at(cover, self.view.end[live], -1)
                if (np.cumsum(cover)[start:end] > 0).all():
                    raise SwarmBusyError(list(range(start, end)))
            raise NoRouteError(list(range(start, end)))
        peers = self.swarm.peers
        return [Span(peers[i].peer_id, s, e, self.swarm.record_of(i)) for i, s, e in chain]

    def plan(self, start: int, end: int, cache_tokens: int, banned: set[str]) -> list[Span]:
        """The SDK's inference route (``Router.plan_inference``) on this client's view."""
        cfg, view = self.swarm.config, self.view
        self.plans += 1
        headroom = self._headroom(cache_tokens)
        uniforms = self.gen.random(view.size) if cfg.route_spread > 0 else None
        live = self._usable(banned)
        usable = live & (headroom >= 0)
        if view.size < PRUNE_FROM_PEERS:
            table = RouteTable(view.start, view.end, self.rtt.array(view.size), self._per_block_ms(), headroom)
            layout = self.swarm.layout(view)
            chain = plan_over_table(
                table, start, end, uniforms=uniforms, spread=cfg.route_spread, usable=usable, layout=layout
            )
        else:
            chain = self._index(headroom).plan(headroom, start, end, uniforms=uniforms, usable=usable)
        return self._spans(chain, start, end, live)

    def _headroom(self, cache_tokens: int) -> np.ndarray:
        """Free cache per peer beyond ``cache_tokens``: its record's, less what this client's cache
        book holds on it."""
        headroom = self.view.cache_tokens_free - cache_tokens
        if self.swarm.config.cache_book:
            self.book.expire()  # what taken() would drop first; the totals arrive through _book_changed
            reserved = self._reserved[: self.view.size]  # peers created after this view are not in it
            headroom[: reserved.size] -= reserved
        return headroom

    def _book_changed(self, peer_id: str, tokens: int) -> None:
        idx = self.swarm.index_of[peer_id]
        if idx >= self._reserved.size:
            self._reserved = np.concatenate(
                [self._reserved, np.zeros(max(idx + 1, 2 * self._reserved.size) - self._reserved.size)]
            )
        self._reserved[idx] = tokens

    def _index(self, headroom: np.ndarray) -> PrunedChains:
        """``plan_over_table`` over this view with this client's RTTs and planning speeds, kept until
        either changes (a DHT read, or new observations in the speed book). Only peers with room for
        a few more sessions now (``headroom``) are used to set others aside: plans until the next
        rebuild will rarely find them full."""
        key = (self._view_version, self.speeds.version)
        if self._chains is None or self._chains_at != key:
            view = self.view
            self._chains = PrunedChains(
                view.start,
                view.end,
                self.rtt.array(view.size),
                self._per_block_ms(),
                # a peer full in this view stays full for every plan of it (the book only subtracts)
                self._serving() & (view.cache_tokens_free >= self.swarm.config.session_tokens),
                spread=self.swarm.config.route_spread,
                layout=self.swarm.layout(view),
                dominators_from=headroom >= ROOMY_SESSIONS * self.swarm.config.session_tokens,
                previous=self._chains,  # peer i is peer i in every view: its still valid lists carry over
                reuse_pools=self._chains_at[0] == self._view_version,  # only the speed book changed
            )
            self._chains_at = key
        return self._chains

    def _per_block_ms(self) -> np.ndarray:
        """Per peer, the planner's compute cost of one block (ms), from the planning speeds; kept until
        the view or the speed book changes."""
        key = (self._view_version, self.speeds.version)
        if self._step_at != key:
            self._step = 1e3 / np.maximum(1e-6, self._planning_speeds())
            self._step_at = key
        return self._step

    def _planning_speeds(self) -> np.ndarray:
        if not self.swarm.config.observed_speeds:
            return self.view.decode_tps
        if self._cap is None:
            self._cap = self.speeds.claim_cap(self.view.decode_tps, self.view.visible)
        return self.speeds.planning_speeds(self.view.decode_tps, self.view.visible, self._cap)

    def plan_forward(self, banned: set[str]) -> list[Span]:
        """The SDK's load-balanced route for a forward batch (no measured speeds: claims only)."""
        cfg, view = self.swarm.config, self.view
        self.plans += 1
        table = BalancedTable(
            start=view.start,
            end=view.end,
            prefill_tps=view.decode_tps * cfg.prefill_gain,
            uplink_bytes_per_s=view.uplink_bytes_per_s,
            observed_tps=np.full(view.size, np.nan),
        )
        usable = self._usable(banned)
        chain = plan_balanced_over_table(
            table,
            0,
            cfg.num_blocks,
            rng=self.rng,
            bytes_per_token=cfg.hidden_bytes_per_token,
            usable=usable,
            layout=self.swarm.layout(view),
        )
        return self._spans(chain, 0, cfg.num_blocks)
