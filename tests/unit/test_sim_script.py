"""The simulator's scripted runs (`peerd simulate --script`, used by tools/validate_sim.py): fixed
peers, a crash/leave/join schedule and closed-loop clients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerd.cli.main import main
from peerd.sim import SimConfig, Simulation
from peerd.sim.config import load_script
from peerd.sim.swarm import PeerPhase

SPECS = ((100.0, 4, 1e6, 20.0), (50.0, 4, 1e6, 40.0), (80.0, 5, 1e6, 10.0), (30.0, 3, 1e6, 60.0), (90.0, 4, 1e6, 30.0))
EVENTS = ((20.0, "crash", 0), (40.0, "join", 4), (60.0, "leave", 1))


def _config(**overrides: object) -> SimConfig:
    base = SimConfig(
        peers=4,
        num_blocks=8,
        duration_s=120.0,
        warmup_s=30.0,
        clients=2,
        closed_sessions=3,
        session_tokens=48,
        forward_fraction=0.0,
        announce_period_s=10.0,
        tick_s=0.25,
        peer_specs=SPECS,
        script=EVENTS,
    )
    return SimConfig(**{**vars(base), **overrides})  # type: ignore[arg-type]


def test_scripted_peers_events_and_closed_loop() -> None:
    sim = Simulation(_config())
    in_flight: list[int] = []
    sim._on_probe = lambda: in_flight.append(len(sim.requests))  # type: ignore[attr-defined]
    for t in range(31, 150, 5):
        sim.at(float(t), "probe")
    summary = sim.run().summary
    peers = sim.swarm.peers
    assert len(peers) == 5  # four initial peers and one scripted join, nobody random
    assert [(p.decode_tps, p.length, p.rtt_ms) for p in peers] == [(s[0], s[1], s[3]) for s in SPECS]
    assert peers[0].phase is PeerPhase.GONE and peers[1].phase is PeerPhase.GONE
    assert peers[1].in_dht is False  # a graceful leave unpublishes at once; a crash lingers until expiry
    assert all(p.phase is PeerPhase.ONLINE for p in peers[2:])
    # the closed loop refills to `closed_sessions` every tick (a probe may fire between an end and the refill)
    assert max(in_flight) == 3 and sum(n == 3 for n in in_flight) > len(in_flight) // 2
    assert summary["completed"] > 10 and summary["median_request_s"] > 0
    assert sim.clients[0].rtt.ms(3) == 60.0  # the scripted RTT, not the unit square's


def test_script_needs_a_spec_per_peer_and_known_events() -> None:
    with pytest.raises(ValueError, match="peer_specs"):
        _config(peer_specs=SPECS[:4])  # the join has no spec
    with pytest.raises(ValueError, match="crash, leave or join"):
        _config(script=((10.0, "explode", 0),))


def test_simulate_command_reads_a_script(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    config = {"peers": 4, "num_blocks": 8, "duration_s": 60, "warmup_s": 30, "closed_sessions": 2, "clients": 2}
    config["session_tokens"] = 48
    script.write_text(json.dumps({"config": config, "peers": SPECS, "events": EVENTS}))
    assert load_script(script)["script"] == EVENTS
    out = tmp_path / "run"
    assert main(["simulate", "--script", str(script), "--seed", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seed"] == 3 and summary["config"]["closed_sessions"] == 2
    assert summary["completed"] > 0
