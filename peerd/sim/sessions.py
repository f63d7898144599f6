"""Requests in flight as arrays, advanced as a fluid each tick.

A generation session makes one token step at a time through its route: per token it pays, on
every hop, the client's RTT to that peer plus the peer's compute for the hop's blocks, stretched
by the peer's load. Continuous batching lets a peer run ``batch_gain`` sessions' steps for the cost
of one; beyond that its sessions share it (processor sharing), which is the queueing the model has.
A forward batch is the same with prefill speed and the answer's transfer over the peer's uplink.
"""

from __future__ import annotations

import numpy as np

from peerd.client.routing import Span
from peerd.sim.config import SimConfig
from peerd.sim.swarm import SimPeer

__all__ = ["Sessions"]


class Sessions:
    """Fixed-width arrays of sessions (a row each); free rows are reused."""

    def __init__(self, config: SimConfig, rows: int = 1024) -> None:
        self.config = config
        self.hops = min(8, config.num_blocks)  # columns: widened when a route has more hops
        self.peer = np.full((rows, self.hops), -1, dtype=np.int64)
        self.rtt_s = np.zeros((rows, self.hops))
        self.cost_s = np.zeros((rows, self.hops))  # single-session compute seconds per token on the hop
        self.span_start = np.zeros((rows, self.hops), dtype=np.int64)
        self.span_end = np.zeros((rows, self.hops), dtype=np.int64)
        self.left = np.zeros(rows)  # tokens still to produce
        self.weight = np.zeros(rows)  # decode-equivalent work of one token (forward tokens are cheaper)
        self.ideal = np.zeros(rows)  # tokens/s on its first route with no load: the bound's demand
        self.resume_at = np.zeros(rows)  # no progress before this time (a failover in progress)
        self.active = np.zeros(rows, dtype=bool)
        self.client = np.zeros(rows, dtype=np.int64)  # which client opened it (its speed book observes it)
        self.forward = np.zeros(rows, dtype=bool)
        self.load = np.ones(0)  # per peer: how stretched its compute is (>= 1), damped across ticks

    def _grow(self) -> None:
        for name in (
            "peer",
            "rtt_s",
            "cost_s",
            "span_start",
            "span_end",
            "left",
            "weight",
            "ideal",
            "resume_at",
            "active",
            "client",
            "forward",
        ):
            old = getattr(self, name)
            fill = -1 if name == "peer" else 0
            new = np.full((old.shape[0] * 2, *old.shape[1:]), fill, dtype=old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    def _widen(self, hops: int) -> None:
        """Room for routes of ``hops`` hops (never more than the blocks)."""
        wider = min(self.config.num_blocks, max(hops, 2 * self.hops))
        for name in ("peer", "rtt_s", "cost_s", "span_start", "span_end"):
            old = getattr(self, name)
            new = np.full((old.shape[0], wider), -1 if name == "peer" else 0, dtype=old.dtype)
            new[:, : self.hops] = old
            setattr(self, name, new)
        self.hops = wider

    def open(self, tokens: int, weight: float, client: int = 0, forward: bool = False) -> int:
        free = np.flatnonzero(~self.active)
        if free.size == 0:
            self._grow()
            free = np.flatnonzero(~self.active)
        row = int(free[0])
        self.active[row] = True
        self.peer[row] = -1
        self.left[row], self.weight[row], self.ideal[row], self.resume_at[row] = tokens, weight, 0.0, 0.0
        self.client[row], self.forward[row] = client, forward
        return row

    def set_route(self, row: int, spans: list[tuple[Span, SimPeer, float]], *, forward: bool) -> None:
        """Hops of ``row``: (span, its peer, the client's RTT to it in ms)."""
        cfg = self.config
        if len(spans) > self.hops:
            self._widen(len(spans))
        self.peer[row] = -1
        self.rtt_s[row] = 0.0
        self.cost_s[row] = 0.0
        for hop, (span, peer, rtt_ms) in enumerate(spans):
            blocks = span.end - span.start
            self.peer[row, hop] = peer.idx
            self.span_start[row, hop], self.span_end[row, hop] = span.start, span.end
            if forward:  # one batch of forward_tokens: the RTT is paid once per batch
                self.rtt_s[row, hop] = rtt_ms / 1e3 / cfg.forward_tokens
                self.cost_s[row, hop] = blocks / (peer.decode_tps * cfg.prefill_gain)
                self.rtt_s[row, hop] += cfg.hidden_bytes_per_token / peer.uplink_bytes_per_s
            else:
                self.rtt_s[row, hop] = rtt_ms / 1e3
                self.cost_s[row, hop] = blocks / peer.decode_tps
        step_s = float(self.rtt_s[row].sum() + self.cost_s[row].sum())
        if self.ideal[row] == 0.0:
            self.ideal[row] = 1.0 / step_s

    def advance(self, now: float, dt: float, num_peers: int) -> tuple[float, np.ndarray]:
        """Progress every running session by ``dt``; returns (decode-equivalent tokens, finished rows)."""
        if self.load.size < num_peers:
            self.load = np.concatenate([self.load, np.ones(num_peers - self.load.size)])
        run = np.flatnonzero(self.active & (self.resume_at <= now) & (self.peer[:, 0] >= 0))
        if run.size == 0:
            self.load[:] = 1.0
            return 0.0, np.zeros(0, dtype=np.int64)
        peer = self.peer[run]
        valid = peer >= 0
        cost = self.cost_s[run]
        step = self.rtt_s[run].sum(axis=1) + (cost * self.load[np.where(valid, peer, 0)] * valid).sum(axis=1)
        rate = 1.0 / step
        work = (rate[:, None] * cost)[valid]
        busy = np.bincount(peer[valid], weights=work, minlength=self.load.size) / self.config.batch_gain
        # sessions are slowed only where a peer has more work than its batched capacity; damped,
        # because the next tick's rates answer this tick's load
        self.load = 0.5 * self.load + 0.5 * np.maximum(1.0, busy * self.load)
        made = np.minimum(rate * dt, self.left[run])
        self.left[run] -= made
        done = run[self.left[run] <= 1e-9]
        return float((made * self.weight[run]).sum()), done

    def observed_steps(self, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the clients' timers see now, per (client, peer) hop of a running generation session:
        (client, peer, block-tokens per second of one step over the hop: its blocks over the RTT plus
        the peer's compute stretched by its load), as the SDK's SpeedBook.observe is fed."""
        run = np.flatnonzero(self.active & ~self.forward & (self.resume_at <= now) & (self.peer[:, 0] >= 0))
        peer = self.peer[run]
        valid = peer >= 0
        if peer.size and self.load.size <= int(peer.max()):
            self.load = np.concatenate([self.load, np.ones(int(peer.max()) + 1 - self.load.size)])
        load = self.load[np.where(valid, peer, 0)]
        elapsed = self.rtt_s[run] + self.cost_s[run] * load
        blocks = self.span_end[run] - self.span_start[run]
        client = np.broadcast_to(self.client[run][:, None], peer.shape)
        return client[valid], peer[valid], (blocks / np.maximum(1e-9, elapsed))[valid]

    def demand(self) -> float:
        """What the requests in flight could use on an idle swarm (decode-equivalent tokens/s)."""
        return float((self.ideal * self.weight)[self.active].sum())

    def on_peer(self, idx: int) -> np.ndarray:
        """Rows with a hop on peer ``idx``."""
        return np.flatnonzero(self.active & (self.peer == idx).any(axis=1))

    def sessions_per_peer(self, num_peers: int) -> np.ndarray:
        peer = self.peer[self.active]
        return np.bincount(peer[peer >= 0], minlength=num_peers)
