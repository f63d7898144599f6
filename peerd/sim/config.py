"""The simulated world's parameters, with the daemon's and the client's real defaults for timings."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["SCENARIOS", "SimConfig", "load_script", "scenario"]


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. Distributions are log-normal (median, sigma of the log): volunteer
    hardware spans orders of magnitude, and a few fast peers are exactly what herding would find."""

    peers: int = 100
    duration_s: float = 3600.0
    churn_per_hour: float = 0.0  # fraction of the swarm that leaves per hour (as many new peers join)
    crash_fraction: float = 0.5  # share of departures that are crashes (no OFFLINE record, no drain)
    seed: int = 0
    num_blocks: int = 32
    # peers: decode speed is one session's one-token step through ONE block (what records carry)
    decode_tps_median: float = 100.0
    decode_tps_sigma: float = 0.8
    prefill_gain: float = 4.0  # prefill tokens/s per block = this x decode (a long prompt batches well)
    batch_gain: float = 4.0  # continuous batching: a peer runs this many sessions' steps at one's cost
    blocks_fit_median: float = 8.0  # how many blocks fit a peer's memory
    blocks_fit_sigma: float = 0.5
    uplink_bytes_per_s_median: float = 5e6
    uplink_sigma: float = 1.0
    sessions_per_peer: int = 24  # KV cache room, in sessions (a full peer refuses with CACHE_FULL)
    block_load_s: float = 2.0  # seconds to load one block's weights when joining or moving
    # network: peers and clients sit on a unit square; RTT = base + span x distance
    rtt_base_ms: float = 10.0
    rtt_span_ms: float = 150.0
    # the daemon's defaults (peerd.config.PeerConfig)
    announce_period_s: float = 30.0  # a record expires after 2 periods
    rebalance_period_s: float = 120.0
    rebalance_threshold: float = 0.2
    placement_jitter_s: float = 3.0
    placement_settle_s: float = 1.0
    # clients (the SDK's defaults: Router.view_refresh_s, the age at which a client's view is read again,
    # here at once rather than in the background; SwarmClient.failover_timeout_s)
    clients: int = 8
    load: float = 0.5  # offered load as a fraction of the central bound at the start
    session_tokens: int = 512
    forward_fraction: float = 0.1  # share of requests that are forward batches (load-balanced routes)
    forward_tokens: int = 2048
    hidden_bytes_per_token: int = 8192  # what a hop sends back per token (fp16, hidden 4096)
    view_ttl_s: float = 5.0
    failover_timeout_s: float = 30.0
    route_spread: float = 0.25  # the SDK's ROUTE_SPREAD (0: the plain fastest route, deterministic)
    cache_book: bool = True  # clients subtract the cache they reserved since a record was written
    # clients plan with the speeds they observed per peer (the SDK's SpeedBook: a loaded peer's steps
    # are slower), not only with claims; observations are folded in every observe_period_s
    observed_speeds: bool = True
    observe_period_s: float = 5.0
    busy_wait: bool = True  # an open finding every peer of some blocks full waits (BUSY_WAIT_S, backoff)
    crash_detect_s: float = 5.0  # a step deadline: how long a client waits on a peer that vanished
    handover_s: float = 1.0  # re-plan and replay after a refusal or a drained peer
    spike_factor: float = 1.0  # arrivals multiplied by this during the spike
    spike_start_s: float = 0.0
    spike_duration_s: float = 0.0
    warmup_s: float = 300.0  # the first peers join over this long; metrics start after it
    tick_s: float = 1.0  # fluid step for session progress and sampling
    # a scripted run (`--script`, tools/validate_sim.py): per peer in creation order, (decode tok/s
    # per block, blocks that fit, uplink bytes/s, RTT ms from any client) instead of random draws;
    # the first `peers` join during the warm-up, "join" events create the next ones
    peer_specs: tuple[tuple[float, int, float, float], ...] = ()
    # (seconds after the warm-up, "crash" | "leave" | "join", peer index): replaces random churn
    script: tuple[tuple[float, str, int], ...] = ()
    closed_sessions: int = 0  # > 0: a closed loop of this many generations (a new one when one ends)

    def __post_init__(self) -> None:
        if self.peers < 2 or self.num_blocks < 1 or self.duration_s <= 0 or self.clients < 1:
            raise ValueError("need at least 2 peers, 1 block, 1 client and a positive duration")
        if not 0.0 <= self.crash_fraction <= 1.0 or self.churn_per_hour < 0 or self.load <= 0:
            raise ValueError("crash fraction must be within 0..1, churn and load positive")
        joins = sum(1 for _, kind, _ in self.script if kind == "join")
        if self.peer_specs and len(self.peer_specs) < self.peers + joins:
            raise ValueError("peer_specs needs one entry per initial peer and per scripted join")
        if any(kind not in ("crash", "leave", "join") for _, kind, _ in self.script):
            raise ValueError("script events are crash, leave or join")


# name -> overrides; `peerd simulate --scenario NAME` starts from these, explicit flags win
SCENARIOS: dict[str, dict[str, float | int | bool]] = {
    "steady-100": {"peers": 100},
    # before load-aware planning: claimed speeds only, and an open fails after failover_timeout_s
    "steady-100-claims": {"peers": 100, "observed_speeds": False, "busy_wait": False},
    # before the herding fix: the plain fastest route, stale free cache taken at face value
    "herding-100": {"peers": 100, "route_spread": 0.0, "cache_book": False},
    "churn5-100": {"peers": 100, "churn_per_hour": 0.05},
    "churn30-100": {"peers": 100, "churn_per_hour": 0.30},
    "spike-100": {"peers": 100, "spike_factor": 10.0, "spike_start_s": 1800.0, "spike_duration_s": 600.0},
    "steady-1000": {"peers": 1000, "clients": 16},
    "churn5-1000": {"peers": 1000, "clients": 16, "churn_per_hour": 0.05},
    "churn30-1000": {"peers": 1000, "clients": 16, "churn_per_hour": 0.30},
    "spike-1000": {
        "peers": 1000,
        "clients": 16,
        "spike_factor": 10.0,
        "spike_start_s": 1800.0,
        "spike_duration_s": 600.0,
    },
    "steady-10000": {"peers": 10000, "clients": 16, "warmup_s": 600.0},
    "churn5-10000": {"peers": 10000, "clients": 16, "churn_per_hour": 0.05, "warmup_s": 600.0},
    "churn30-10000": {"peers": 10000, "clients": 16, "churn_per_hour": 0.30, "warmup_s": 600.0},
    "spike-10000": {
        "peers": 10000,
        "clients": 16,
        "warmup_s": 600.0,
        "spike_factor": 10.0,
        "spike_start_s": 1800.0,
        "spike_duration_s": 600.0,
    },
}


def scenario(name: str, **overrides: float | int | bool) -> SimConfig:
    """A shipped scenario with ``overrides`` applied; raises KeyError naming the known ones."""
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    base = SimConfig(**SCENARIOS[name])  # type: ignore[arg-type]
    return replace(base, **overrides)  # type: ignore[arg-type]


def load_script(path: Path) -> dict[str, Any]:
    """SimConfig overrides from a script file (``peerd simulate --script``), JSON of the form
    ``{"config": {field: value}, "peers": [[decode_tps, blocks_fit, uplink_bytes_per_s, rtt_ms], ...],
    "events": [[t_s, "crash" | "leave" | "join", peer_index], ...]}`` (tools/validate_sim.py writes one)."""
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(SimConfig)}
    overrides: dict[str, Any] = dict(data.get("config", {}))
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown SimConfig fields in {path}: {sorted(unknown)}")
    overrides["peer_specs"] = tuple((float(a), int(b), float(c), float(d)) for a, b, c, d in data.get("peers", []))
    overrides["script"] = tuple((float(t), str(kind), int(i)) for t, kind, i in data.get("events", []))
    return overrides
