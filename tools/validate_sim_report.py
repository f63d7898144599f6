"""The comparison half of tools/validate_sim.py: the real run's numbers, the simulator on the same
scenario (as specified and calibrated with the real per-hop overhead), and the side-by-side table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np


def claim_tps(spec: dict[str, Any]) -> float:
    """What a peer advertises per block with --no-measure (1000 tok/s) and --step-delay over its cap
    (peerd/daemon/capacity.py: a step through n blocks takes n / 1000 + delay)."""
    span = spec["max_blocks"]
    return float(span / (span / 1000.0 + spec["step_delay_ms"] / 1000.0))


def reference_outputs(ckpt: Path, events: list[dict[str, Any]], tokens: int) -> dict[tuple[int, ...], list[int]]:
    """The local model's greedy output for every prompt the clients sent."""
    import torch

    from peerd.model.loading import load_local_model

    torch.set_num_threads(1)  # the swarm's processes may still be winding down on the same cores
    model = load_local_model(ckpt, progress=False)
    prompts = {tuple(e["prompt"]) for e in events if e["event"] == "request"}
    return {p: list(model.generate_greedy(list(p), tokens, eos_token_ids=[])) for p in prompts}


def coverage(spans: list[tuple[int, int]], num_blocks: int) -> list[int]:
    """Replicas per block."""
    cover = np.zeros(num_blocks + 1, dtype=np.int64)
    for start, end in spans:
        cover[start] += 1
        cover[end] -= 1
    return [int(x) for x in np.cumsum(cover)[:-1]]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def real_metrics(sc: Any, real: dict[str, Any], reference: dict[tuple[int, ...], list[int]]) -> dict[str, Any]:
    t0, end = real["t0"], real["t0"] + sc.duration_s
    requests = [e for e in real["events"] if e["event"] == "request"]
    done = [e for e in requests if "tokens" in e]
    wrong = [e for e in done if e["tokens"] != reference[tuple(e["prompt"])]]
    token_t = [t for e in requests for t in e["token_t"] if t0 <= t <= end]
    gaps = [b - a for e in requests for a, b in zip(e["token_t"][1:], e["token_t"][2:], strict=False)]
    stalls = [s for e in done for s in e["stalls_s"]]
    snaps = [
        (e["t"] - t0, [(int(a), int(b)) for _, a, b in e["peers"]], e["peers"])
        for e in real["events"]
        if e["event"] == "placement"
    ]
    spans_by_name: dict[str, set[tuple[int, int]]] = {}
    for _, _, peers in snaps:
        for name, a, b in peers:
            spans_by_name.setdefault(name, set()).add((a, b))
    bins = np.histogram(token_t, bins=max(1, int(sc.duration_s // 30)), range=(t0, end))[0] / 30.0
    return {
        "requests": len(requests),
        "completed": len(done),
        "failed": len(requests) - len(done),
        "wrong_output": len(wrong),
        "errors": sorted({e["error"] for e in requests if "error" in e})[:10],
        "tokens_per_s": len(token_t) / sc.duration_s,
        "tokens_per_s_per_30s": [round(float(x), 2) for x in bins],
        "median_request_s": statistics.median(e["t1"] - e["t0"] for e in done) if done else 0.0,
        "median_step_ms": _pct(gaps, 50) * 1e3,
        "p99_step_ms": _pct(gaps, 99) * 1e3,
        "max_step_gap_s": max(gaps, default=0.0),
        "step_gaps_over_1s": sum(1 for g in gaps if g > 1.0),
        "failovers": len(stalls),
        "p99_stall_s": _pct(stalls, 99),
        "max_stall_s": max(stalls, default=0.0),
        "mean_route_hops": float(np.mean([len(e["route"]) for e in done])) if done else 0.0,
        "median_ttft_s": statistics.median(e["token_t"][0] - e["t0"] for e in done if e["token_t"]) if done else 0.0,
        **placement_metrics(snaps, sc.num_blocks),
        "block_moves": sum(len(v) - 1 for v in spans_by_name.values()),
        "peers_ready_s": real["peers_ready_s"],
        "schedule": real["schedule"],
    }


def placement_metrics(snaps: list[tuple[float, list[tuple[int, int]], list[Any]]], num_blocks: int) -> dict[str, Any]:
    """Snapshots (seconds since the clients started, spans, [name, start, end] per online peer)."""
    if not snaps:
        return {"snapshots": 0, "coverage_first": [], "coverage_final": [], "max_gap_blocks": num_blocks}
    covers = [coverage(spans, num_blocks) for _, spans, _ in snaps]
    return {
        "placement_first": snaps[0][2],
        "placement_final": snaps[-1][2],
        "coverage_first": covers[0],
        "coverage_final": covers[-1],
        "max_gap_blocks": max(c.count(0) for c in covers),
        "gap_snapshots": sum(1 for c in covers if 0 in c),
        "snapshots": len(snaps),
        "coverage_timeline": [[round(t, 1), c] for (t, _, _), c in zip(snaps, covers, strict=True)],
    }


def per_hop_overhead_ms(sc: Any, real: dict[str, Any]) -> float:
    """Median, over clean generations, of (real step time - the simulator's step time) per hop: what
    a hop costs beyond the emulated RTT and the claimed compute (serialisation, libp2p, Python, CPU
    contention) -- the simulator knows none of it."""
    by_id = {pid: spec for spec in sc.specs for name, pid in real["ids"].items() if spec["name"] == name}
    extra = []
    for e in real["events"]:
        if e["event"] != "request" or "tokens" not in e or e["stalls_s"] or len(e["token_t"]) < 4:
            continue
        if any(pid not in by_id for pid, _, _ in e["route"]):
            continue
        model_s = sum(2 * by_id[p]["one_way_ms"] / 1e3 + (b - a) / claim_tps(by_id[p]) for p, a, b in e["route"])
        step_s = statistics.median(np.diff(e["token_t"][1:]))
        extra.append((step_s - model_s) / len(e["route"]) * 1e3)
    return statistics.median(extra) if extra else 0.0


def run_simulator(sc: Any, overhead_ms: float = 0.0) -> dict[str, Any]:
    """The simulator on the scenario: same peers (claims, caps, uplinks, RTTs + ``overhead_ms``), same
    schedule, closed-loop clients with the same number of generations in flight."""
    from dataclasses import replace

    from peerd.sim import SimConfig, Simulation
    from peerd.sim.swarm import PeerPhase

    cfg = SimConfig(
        peers=sc.peers, num_blocks=sc.num_blocks, duration_s=sc.duration_s, seed=sc.seed, warmup_s=60.0,
        clients=sc.clients, closed_sessions=sc.clients * sc.sessions_per_client, session_tokens=sc.tokens,
        forward_fraction=0.0, announce_period_s=sc.announce_period_s, rebalance_period_s=sc.rebalance_period_s,
        sessions_per_peer=64, block_load_s=0.5, tick_s=0.25,
        peer_specs=tuple(
            (claim_tps(s), s["max_blocks"], s["uplink_mbit"] * 1e6 / 8, 2 * s["one_way_ms"] + overhead_ms)
            for s in sc.specs
        ),
        script=tuple((float(t), kind, idx) for t, kind, idx in sc.events),
    )  # fmt: skip
    sim = Simulation(replace(cfg))
    snaps: list[tuple[float, list[list[Any]]]] = []
    served_gaps: list[int] = []

    def snapshot() -> None:  # every 5 s: what a DHT read shows (a crashed peer's record lingers), as for real
        shown = [sim.swarm.peers[int(pid[1:])] for pid in sim.swarm.view()]
        snaps.append((sim.now - cfg.warmup_s, sorted([sc.specs[p.idx]["name"], p.start, p.end] for p in shown)))
        online = [(p.start, p.end) for p in sim.swarm.peers if p.phase is PeerPhase.ONLINE]
        served_gaps.append(coverage(online, sc.num_blocks).count(0))  # what is really served

    sim._on_snap = snapshot  # type: ignore[attr-defined]  # fired by the engine's event heap
    for k in range(int(sc.duration_s // 5) + 1):
        sim.at(cfg.warmup_s + 5.0 * k, "snap")
    summary = sim.run().summary
    snapshot()
    stalls = sim.stalls
    return {
        "requests": summary["requests"],
        "completed": summary["completed"],
        "failed": summary["failed"],
        "tokens_per_s": summary["tokens_per_s"],
        "median_request_s": summary["median_request_s"],
        "mean_route_hops": summary["mean_route_hops"],
        "failovers": summary["failovers"],
        "p99_stall_s": _pct([s for s in stalls if s > 0], 99),
        "max_stall_s": max(stalls, default=0.0),
        **placement_metrics([(t, [(a, b) for _, a, b in peers], peers) for t, peers in snaps], sc.num_blocks),
        "block_moves": int(summary["block_moves_per_hour"] * sc.duration_s / 3600 + 0.5),
        "max_gap_blocks_served": max(served_gaps, default=0),
        "gap_seconds_served": 5.0 * sum(1 for g in served_gaps if g),
        "overhead_ms_per_hop": overhead_ms,
    }


def resimulate(result: dict[str, Any], scenario: Any) -> dict[str, Any]:
    """The simulator's columns again for a stored comparison (the real run's numbers kept)."""
    overhead = result["real_overhead_ms_per_hop"]
    return {**result, "sim": run_simulator(scenario), "sim_calibrated": run_simulator(scenario, overhead)}


def compare(sc: Any, real: dict[str, Any], reference: dict[tuple[int, ...], list[int]]) -> dict[str, Any]:
    overhead = per_hop_overhead_ms(sc, real)
    return {
        "real": real_metrics(sc, real, reference),
        "sim": run_simulator(sc),
        "sim_calibrated": run_simulator(sc, overhead),
        "real_overhead_ms_per_hop": overhead,
    }


def dumps(result: dict[str, Any]) -> str:
    """JSON with one field a line (series stay on their line)."""
    parts = []
    for key, value in result.items():
        if isinstance(value, dict):
            inner = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            parts.append(f"  {json.dumps(key)}: {{\n{inner}\n  }}")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


ROWS = [
    ("generations completed", "completed", "{:.0f}"),
    ("failed (reported)", "failed", "{:.0f}"),
    ("tokens/s, all clients", "tokens_per_s", "{:.1f}"),
    ("median generation time, s", "median_request_s", "{:.2f}"),
    ("median time to first token, s", "median_ttft_s", "{:.2f}"),
    ("mean hops per route", "mean_route_hops", "{:.1f}"),
    ("failovers", "failovers", "{:.0f}"),
    ("p99 failover stall, s", "p99_stall_s", "{:.1f}"),
    ("max failover stall, s", "max_stall_s", "{:.1f}"),
    ("most blocks uncovered at once", "max_gap_blocks", "{:.0f}"),
    ("placement reads with a gap", "gap_snapshots", "{:.0f}"),
    ("most blocks unserved at once", "max_gap_blocks_served", "{:.0f}"),
    ("block moves", "block_moves", "{:.0f}"),
]


def print_table(result: dict[str, Any]) -> None:
    cols = ("real", "sim", "sim_calibrated")
    print(f"{'':32}{'real':>12}{'simulator':>12}{'sim + ovh':>12}")
    for label, key, fmt in ROWS:
        cells = [fmt.format(result[c][key]) if key in result[c] else "-" for c in cols]
        print(f"{label:32}" + "".join(f"{x:>12}" for x in cells))
    for key in ("coverage_first", "coverage_final"):
        for c in cols:
            print(f"{key + ' ' + c:32}{result[c][key]}")
    real = result["real"]
    print(
        f"wrong outputs {real['wrong_output']}, real median step {real['median_step_ms']:.0f} ms, "
        f"p99 {real['p99_step_ms']:.0f} ms, overhead per hop {result['real_overhead_ms_per_hop']:.1f} ms"
    )
