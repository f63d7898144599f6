"""``peerd simulate``: run the swarm simulator (peerd.sim) and write its summary and plots."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

__all__ = ["add_simulate_arguments", "cmd_simulate"]

# flags that map onto SimConfig fields of the same name (dashes for underscores)
_FLAGS: dict[str, tuple[type, str]] = {
    "peers": (int, "number of peers"),
    "duration": (float, "simulated seconds measured after the warm-up"),
    "churn": (float, "fraction of the swarm that leaves (and is replaced) per hour, e.g. 0.3"),
    "crash_fraction": (float, "share of departures that are crashes"),
    "seed": (int, "random seed (a seed gives the same run)"),
    "clients": (int, "client processes issuing requests"),
    "load": (float, "offered load as a fraction of the central bound"),
    "spike_factor": (float, "arrival rate multiplier during the spike"),
    "spike_start": (float, "spike start, seconds after the warm-up"),
    "spike_duration": (float, "spike length in seconds"),
    "num_blocks": (int, "blocks in the model"),
    "route_spread": (float, "clients draw routes up to 1+this times the fastest's cost (0: always the fastest)"),
}
_FIELD = {
    "duration": "duration_s",
    "churn": "churn_per_hour",
    "spike_start": "spike_start_s",
    "spike_duration": "spike_duration_s",
}


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from peerd.sim.config import SCENARIOS

    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help="start from a shipped scenario")
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.json and the PNG plots")
    parser.add_argument(
        "--script",
        type=Path,
        help="JSON: fixed peers and a kill/join schedule (see peerd.sim.config.load_script); flags still win",
    )
    for flag, (kind, help_text) in _FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None, help=help_text)


def cmd_simulate(args: argparse.Namespace) -> int:
    from peerd.sim import SimConfig, Simulation
    from peerd.sim.config import load_script, scenario
    from peerd.sim.report import write_report

    overrides = load_script(args.script) if args.script else {}
    overrides.update({_FIELD.get(f, f): getattr(args, f) for f in _FLAGS if getattr(args, f) is not None})
    known = {f.name for f in fields(SimConfig)}
    assert set(overrides) <= known
    config = scenario(args.scenario, **overrides) if args.scenario else replace(SimConfig(), **overrides)

    def progress(done: float) -> None:
        print(f"\rsimulated {done:6.1%}", end="", file=sys.stderr, flush=True)

    from peerd.client.chain_index import COMPILED

    if not COMPILED and config.peers >= 1000:
        print(
            "numba is not installed: route plans run in numpy, several times slower (same results); "
            "pip install 'peerd[simulate]'",
            file=sys.stderr,
        )
    from peerd.sim.heap import keep_freed_memory

    keep_freed_memory()  # a few % of the run's time went to page faults on freshly mapped arrays
    sim = Simulation(config)
    result = sim.run(progress)
    print(file=sys.stderr)
    files = write_report(result, args.out, sim.stalls)
    summary = result.summary
    rows = [
        ("throughput / bound", f"{summary['throughput_ratio_to_bound']:.3f}"),
        ("failed requests", f"{summary['failed_request_fraction']:.2%} of {summary['completed'] + summary['failed']}"),
        ("p99 stall", f"{summary['p99_stall_s']:.1f} s"),
        ("refused opens (CACHE_FULL)", str(summary["refusals_cache_full"])),
        ("opens waiting for room", str(summary["busy_waits"])),
        ("mean KV cache slots used", f"{summary['mean_cache_used']:.0%}"),
        ("block moves per hour", f"{summary['block_moves_per_hour']:.1f}"),
        ("mean coverage gap", f"{summary['mean_gap_blocks']:.2f} blocks"),
        ("DHT messages / peer / min", f"{summary['dht_messages_per_peer_per_min']:.0f}"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"wrote {len(files)} files to {args.out}")
    return 0
