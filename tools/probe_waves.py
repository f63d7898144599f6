"""Where N concurrent sessions' time goes through a local 3-peer swarm (issue 14's diagnostic).

Starts `make bench`'s swarm (SmolLM2-135M, blocks 0:10/10:20/20:30, one torch thread per peer) and
``bench_load`` client workers, then runs each level (sessions decoding random hidden states, as
``bench_load``) and reports, for its decode phase only:

* tokens/s, and the CPU seconds each process used (peers, their p2pd daemons, the client workers
  and theirs; ``/proc/PID/stat`` utime + stime before and after), and the whole machine's busy cores
  (``/proc/stat``), so the load other people put on a shared box shows;
* from the peers' batch trace (tools/waves_trace, put on PYTHONPATH by this script): the batches each
  peer ran (sizes, compute-thread CPU), the time spent filling batches, the wait from a batch's last
  step's arrival to its start, and how much of the time 0, 1, 2 or 3 peers were computing at once
  (one synchronized wave of sessions keeps one peer busy at a time; several waves overlap).

Run: ``PYTHONPATH=$PWD .venv/bin/python tools/probe_waves.py --rounds 2`` (about a minute).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
TRACE_SITE = Path(__file__).resolve().parent / "waves_trace"


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def busy_ticks() -> int:
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


def descendants(pid: int) -> list[int]:
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        for child in map(int, Path(path).read_text().split()):
            out += [child, *descendants(child)]
    return out


def processes(swarm: Any, workers: Any) -> dict[str, int]:
    """Named pids: each peer and its children (p2pd), each client worker and its children."""
    roots = {p.name: p.popen.pid for p in swarm.procs if p.name != "bootstrap"}
    roots |= {f"worker{i}": w.pid for i, w in enumerate(workers.procs)}
    named = dict(roots)
    for name, pid in roots.items():
        for i, child in enumerate(descendants(pid)):
            named[f"{name}/{Path(f'/proc/{child}/comm').read_text().strip()}{i}"] = child
    return named


def run_level(workers: Any, procs: dict[str, int], sessions: int, steps: int) -> dict[str, Any]:
    count = len(workers.procs)
    shares = [s for s in (sessions // count + (i < sessions % count) for i in range(count)) if s]
    workers.ask([{"do": "open", "sessions": s, "steps": steps} for s in shares])
    before, busy0, t0, load = (
        {k: cpu_s(v) for k, v in procs.items()},
        busy_ticks(),
        time.monotonic(),
        os.getloadavg()[0],
    )
    answers = workers.ask([{"do": "go", "steps": steps} for _ in shares])
    elapsed = time.monotonic() - t0
    after, busy1 = {k: cpu_s(v) for k, v in procs.items()}, busy_ticks()
    times = [t for a in answers for t in a["steps"]]
    start, end = min(s for s, _ in times), max(e for _, e in times)
    return {
        "sessions": sessions,
        "tokens_per_s": len(times) / (end - start),
        "window": [start, end],
        "load_average": load,
        "machine_busy_cores": (busy1 - busy0) / TICK / elapsed,
        "cpu_s": {k: round(after[k] - before[k], 3) for k in procs},
    }


def batch_stats(trace_dir: Path, peers: dict[str, int], start: float, end: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spans = []
    for name, pid in sorted(peers.items()):
        path = trace_dir / f"trace-{pid}.txt"
        batches, fills = [], []
        for line in path.read_text().splitlines() if path.exists() else []:
            kind, a, b, size, cpu, wait, _ = line.split()
            if not start <= float(a) <= end:
                continue
            if kind == "F":
                fills.append(float(b) - float(a))
            else:
                batches.append((float(a), float(b), int(size), float(cpu), float(wait)))
        sizes = [b[2] for b in batches]
        out[name] = {
            "batches": len(batches),
            "sizes": {s: sizes.count(s) for s in sorted(set(sizes))},
            "compute_cpu_s": round(sum(b[3] for b in batches), 3),
            "cpu_ms_by_size": {
                s: round(1e3 * statistics.median(b[3] for b in batches if b[2] == s), 1)
                for s in sorted(set(sizes))
                if sizes.count(s) >= 3
            },
            "fill_s": round(sum(fills), 3),
            "wait_after_last_arrival_ms_p50": round(1e3 * statistics.median(b[4] for b in batches), 1)
            if batches
            else None,
        }
        spans += [(b[0], b[1]) for b in batches]
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    share: dict[int, float] = {}
    level, last = 0, start
    for t, step in events:
        t = min(max(t, start), end)
        share[level] = share.get(level, 0.0) + t - last
        level, last = level + step, t
    share[level] = share.get(level, 0.0) + end - last
    out["peers_computing_share"] = {k: round(v / (end - start), 3) for k, v in sorted(share.items())}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="client worker processes (default 1)")
    parser.add_argument("--levels", default="1,16", help="session counts, comma-separated (default 1,16)")
    parser.add_argument("--steps", type=int, default=12, help="decode steps per session (default 12)")
    parser.add_argument("--rounds", type=int, default=2, help="times every level runs (default 2)")
    parser.add_argument("--out", default="bench-results/probe_waves.json")
    args = parser.parse_args()
    trace_dir = Path(tempfile.mkdtemp(prefix="peerd-waves-"))
    os.environ["PROBE_TRACE_DIR"] = str(trace_dir)  # inherited by the peers this starts
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TRACE_SITE), os.environ.get("PYTHONPATH", "")])

    from peerd.cli.bench import _start_swarm
    from peerd.cli.bench_load import LoadWorkers
    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve

    model_id, path = resolve("smollm2-135m", None)
    results = []
    with LocalSwarm("smollm2-135m") as swarm:
        _start_swarm(swarm, split_blocks(30, 3))
        workers = LoadWorkers(args.workers, swarm.initial_peers, path, model_id, swarm.workdir)
        try:
            procs = processes(swarm, workers)
            peers = {k: v for k, v in procs.items() if k.startswith("peer") and "/" not in k}
            for r in range(args.rounds):
                for sessions in map(int, args.levels.split(",")):
                    result = run_level(workers, procs, sessions, args.steps) | {"round": r}
                    result["batches"] = batch_stats(trace_dir, peers, *result["window"])
                    results.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            workers.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
