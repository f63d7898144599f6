"""What the swarm can carry: the central optimiser's bound on compute AND on KV cache slots.

Compute: each token passes every block once and a peer does at most ``batch_gain x decode_tps``
block-steps per second, so the swarm cannot exceed ``batch_gain x sum(decode_tps) / num_blocks``
decode tokens/s, whatever the placement.

KV cache: a session holds one cache slot on every peer of its route for as long as it runs, and a
peer holds at most ``sessions_per_peer``. In the LP relaxation (fractional, non-contiguous spans) a
slot on a peer hosting L blocks is L "block-slots", and a session needs ``num_blocks`` of them; a
session's token step costs at least, per block it runs on peer p, ``rtt_p / L + 1 / decode_tps_p``
(the hop's RTT shared by at most L blocks, plus the block's compute). A session's speed is one over
its step, so the optimiser maximises the sum of 1/step over sessions built from the pool of
block-slots: giving the cheapest block-slots to the same sessions is optimal (1/x is convex:
moving a cheaper block-slot to the already faster of two sessions never lowers the sum), so the
bound is the pool sorted by cost, cut into sessions of ``num_blocks`` block-slots, summed. RTTs are
the clients' mean to each peer (arrivals pick a client uniformly). Every request is counted as a
generation session here (a forward batch holds its slots for a comparable time: 2,048 prefill
tokens). The capacity is the smaller of the two bounds; ``--load`` is a fraction of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peerd.sim.clients import SimClient
from peerd.sim.config import SimConfig
from peerd.sim.swarm import ViewArrays

__all__ = ["Capacity", "cache_bound_tokens_per_s", "sessions_bound"]


def cache_bound_tokens_per_s(view: ViewArrays, clients: list[SimClient], cfg: SimConfig) -> float:
    """The KV cache bound of the module docstring for the peers visible in ``view`` (tokens/s)."""
    visible = view.visible & (view.decode_tps > 0) & (view.end > view.start)
    if not visible.any():
        return 0.0
    blocks = (view.end - view.start)[visible].astype(np.float64)
    rtt_s = np.mean([client.rtt.array(view.size)[visible] for client in clients], axis=0) / 1e3
    cost = rtt_s / blocks + 1.0 / view.decode_tps[visible]  # seconds per token per block, at best
    return sessions_bound(cost, blocks * cfg.sessions_per_peer, cfg.num_blocks)


def sessions_bound(cost: np.ndarray, units: np.ndarray, num_blocks: int) -> float:
    """Most tokens/s of sessions built from ``units[i]`` block-slots costing ``cost[i]`` seconds per
    token each, ``num_blocks`` block-slots a session: the cheapest ones cut into sessions in order."""
    order = np.argsort(cost)
    taken = np.concatenate([[0.0], np.cumsum(units[order])])
    spent = np.concatenate([[0.0], np.cumsum(units[order] * cost[order])])
    sessions = int(taken[-1] // num_blocks)
    if sessions == 0:
        return 0.0
    cuts = np.interp(np.arange(sessions + 1) * float(num_blocks), taken, spent)  # cost is flat per peer
    return float((1.0 / np.diff(cuts)).sum())


@dataclass
class Capacity:
    """The bound's two capacities for the online peers, in decode-equivalent tokens/s."""

    cfg: SimConfig
    online_tps: float = 0.0  # sum of decode speed over ONLINE peers
    cache_tokens_per_s: float = float("inf")  # cache_bound_tokens_per_s, refreshed as peers change

    def add(self, decode_tps: float, sign: int = 1) -> None:
        self.online_tps += sign * decode_tps

    def per_request_tokens(self) -> float:
        """Decode-equivalent tokens of the average request (a forward token costs 1/prefill_gain)."""
        cfg = self.cfg
        return (1 - cfg.forward_fraction) * cfg.session_tokens + cfg.forward_fraction * (
            cfg.forward_tokens / cfg.prefill_gain
        )

    def compute(self) -> float:
        return self.cfg.batch_gain * self.online_tps / self.cfg.num_blocks

    def cache(self) -> float:
        return self.cache_tokens_per_s

    def tokens_per_s(self) -> float:
        """What the swarm can carry: the smaller of the two."""
        return min(self.compute(), self.cache())
