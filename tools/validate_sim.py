"""`make validate-sim` (root): one scenario as a real swarm in network namespaces and in the simulator.

The real side builds the emulated internet of tests/helpers/netinet.py without NAT: a bootstrap,
``--peers`` peer hosts, one host per scripted join and two client hosts on one bridge (10.200.0.x).
Every peer host gets a ``tc tbf`` uplink limit and a TCP delay shim (tests/helpers/delay_shim.py)
in front of its libp2p port, which the peer announces as its only address, so every connection to
it pays the shim's one-way delay each way. Peers run ``peerd run`` on the tiny test model with
automatic placement; heterogeneity comes from ``--max-blocks`` and ``--step-delay`` (folded into
the speed a peer claims). Everything is drawn from ``--seed``: caps, step delays, link delays,
uplinks, and the kill/join schedule (crash = SIGKILL of the peer and its shim with its link taken
down, so clients see silence; leave = SIGTERM, the daemon drains; join = a new peer host).
Two client processes (tools/validate_sim_client.py) keep greedy generations in flight and one of
them reads the DHT's placement every few seconds.

The simulated side runs ``peerd.sim`` on the same scenario (``--script``'s fields: the same peers'
claims, caps, uplinks and RTTs, the same schedule, closed-loop clients with as many generations
in flight), once as the emulated network is specified and once calibrated with the per-hop
overhead the real run measured. tools/validate_sim_report.py compares them; the result goes to
bench-results/validate-sim.json and a table on stdout.

    python tools/validate_sim.py [--peers 12] [--duration 240] [--seed 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.netinet import Host, Internet, missing_requirements, read_line  # noqa: E402
from tools.bench_nat import wait_ready  # noqa: E402
from tools.validate_sim_report import compare, dumps, print_table, reference_outputs, resimulate  # noqa: E402

SHIM = REPO / "tests" / "helpers" / "delay_shim.py"
CLIENT = REPO / "tools" / "validate_sim_client.py"
PEER_PORT, SHIM_PORT = 4001, 4002


@dataclass
class Scenario:
    peers: int = 12
    joins: int = 2
    crashes: int = 2
    leaves: int = 1
    num_blocks: int = 16
    duration_s: float = 240.0
    seed: int = 1
    clients: int = 2
    sessions_per_client: int = 2
    tokens: int = 48
    announce_period_s: float = 10.0
    rebalance_period_s: float = 60.0
    specs: list[dict[str, Any]] = field(default_factory=list)  # per peer, joins last
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (s after the clients start, kind, peer)


def draw(sc: Scenario) -> Scenario:
    """Per-peer caps, step delays, link delays and uplinks, and the kill/join schedule, from the seed."""
    rng = random.Random(sc.seed)
    for i in range(sc.peers + sc.joins):
        sc.specs.append(
            {
                "name": f"p{i:02d}" if i < sc.peers else f"j{i - sc.peers}",
                "max_blocks": rng.choice([3, 4, 5, 6]),
                "step_delay_ms": round(min(80.0, max(2.0, rng.lognormvariate(2.5, 0.8))), 1),  # median ~12 ms
                "one_way_ms": round(rng.uniform(2.0, 25.0), 1),
                "uplink_mbit": round(min(100.0, max(2.0, rng.lognormvariate(3.0, 1.0))), 1),  # median ~20
            }
        )
    kinds = ["crash"] * sc.crashes + ["leave"] * sc.leaves
    rng.shuffle(kinds)
    victims = rng.sample(range(sc.peers), len(kinds))
    # departures spread over the first 70% of the run, joins after each of the first departures
    slots = [sc.duration_s * (0.15 + 0.55 * k / max(1, len(kinds))) for k in range(len(kinds))]
    sc.events = [(round(t, 1), kind, v) for t, kind, v in zip(slots, kinds, victims, strict=True)]
    for j in range(sc.joins):
        sc.events.append((round(slots[min(j, len(slots) - 1)] + 15.0, 1), "join", sc.peers + j))
    sc.events.sort()
    return sc


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


class RealSwarm:
    """The namespaces and processes of one real run; ``net`` cleans everything up on exit."""

    def __init__(self, net: Internet, sc: Scenario, work: Path, ckpt: Path) -> None:
        self.net, self.sc, self.work, self.ckpt = net, sc, work, ckpt
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.hosts: dict[str, Host] = {}
        self.ready_files: dict[str, Path] = {}
        self.boot: list[str] = []
        self.log: list[dict[str, Any]] = []

    def spawn(self, name: str, host: Host, argv: list[str]) -> subprocess.Popen[Any]:
        with (self.work / f"{name}.log").open("wb") as log:
            proc = self.net.popen(host, argv, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_bootstrap(self) -> None:
        host = self.net.public_host("boot")
        ready = self.work / "boot.json"
        args = ["bootstrap", "--new-swarm", "--model-id", "tiny", "--identity", str(self.work / "boot.key")]
        proc = self.spawn(
            "boot", host, [sys.executable, "-m", "peerd", *args, "--model", str(self.ckpt), "--ready-file", str(ready)]
        )
        self.boot = [m for m in wait_ready(ready, proc, 120)["maddrs"] if f"/{host.ip}/" in m]

    def start_peer(self, spec: dict[str, Any]) -> None:
        name = spec["name"]
        host = self.hosts[name] = self.net.public_host(name)
        self.net.rate_limit(host, f"{spec['uplink_mbit']}mbit", direction="up")
        shim = self.net.popen(
            host,
            [sys.executable, "-u", str(SHIM), "--listen", f"{host.ip}:{SHIM_PORT}",
             "--target", f"{host.ip}:{PEER_PORT}", "--delay-ms", str(spec["one_way_ms"])],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.procs[f"{name}-shim"] = shim
        if not read_line(shim, 30).startswith("LISTENING"):
            raise RuntimeError(f"delay shim of {name} did not start")
        sc = self.sc
        args = [
            "run", "--model", str(self.ckpt), "--model-id", "tiny", "--initial-peers", ",".join(self.boot),
            "--name", name, "--identity", str(self.work / f"{name}.key"), "--port", str(PEER_PORT),
            "--announce-maddrs", f"/ip4/{host.ip}/tcp/{SHIM_PORT}", "--reachability", "direct",
            "--no-measure", "--torch-threads", "1", "--announce-period", str(sc.announce_period_s),
            "--rebalance-period", str(sc.rebalance_period_s), "--max-blocks", str(spec["max_blocks"]),
            "--step-delay", str(spec["step_delay_ms"] / 1000.0), "--ready-file", str(self.work / f"{name}.json"),
        ]  # fmt: skip
        self.ready_files[name] = self.work / f"{name}.json"
        self.spawn(name, host, [sys.executable, "-m", "peerd", *args])

    def wait_ready(self, names: list[str], timeout_s: float) -> dict[str, str]:
        """Peer id by name once each is serving."""
        return {n: wait_ready(self.ready_files[n], self.procs[n], timeout_s)["peer_id"] for n in names}

    def crash(self, name: str) -> None:
        """The machine vanishes: its processes die and its link goes down (clients see silence)."""
        for key in (name, f"{name}-shim"):
            os.killpg(self.procs[key].pid, signal.SIGKILL)
            self.procs[key].wait(10)
        self.net.run(self.hosts[name], ["ip", "link", "set", "eth0", "down"])

    def leave(self, name: str) -> None:
        """SIGTERM: the daemon drains its sessions and announces OFFLINE."""
        self.procs[name].send_signal(signal.SIGTERM)
        try:
            self.procs[name].wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.procs[name].pid, signal.SIGKILL)

    def start_clients(self) -> list[Path]:
        outs = []
        for c in range(self.sc.clients):
            host = self.net.public_host(f"c{c}")
            out = self.work / f"client{c}.jsonl"
            argv = [
                sys.executable, "-u", str(CLIENT), "--initial-peers", *self.boot, "--ckpt", str(self.ckpt),
                "--sessions", str(self.sc.sessions_per_client), "--duration", str(self.sc.duration_s),
                "--tokens", str(self.sc.tokens), "--seed", str(self.sc.seed * 100 + c),
                "--monitor-period", "5" if c == 0 else "0",
            ]  # fmt: skip
            with out.open("wb") as fh, (self.work / f"client{c}.log").open("wb") as err:
                self.procs[f"client{c}"] = self.net.popen(host, argv, cwd=REPO, env=_env(), stdout=fh, stderr=err)
            outs.append(out)
        return outs


def _wait_clients_ready(outs: list[Path], swarm: RealSwarm, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        times = [_first_ready(p) for p in outs]
        if all(t is not None for t in times):
            return max(t for t in times if t is not None)
        for c in range(len(outs)):
            if swarm.procs[f"client{c}"].poll() is not None:
                raise RuntimeError(f"client{c} exited early; see client{c}.log")
        time.sleep(0.5)
    raise TimeoutError("clients found no route")


def _first_ready(path: Path) -> float | None:
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith('{"event": "ready"'):
            return float(json.loads(line)["t"])
    return None


def run_real(sc: Scenario, work: Path, ckpt: Path, prefix: str = "v18") -> dict[str, Any]:
    """Build the network, run the scenario, tear it all down; returns the raw events."""
    with Internet(prefix=prefix) as net:
        swarm = RealSwarm(net, sc, work, ckpt)
        swarm.start_bootstrap()
        started = time.time()
        for spec in sc.specs[: sc.peers]:
            swarm.start_peer(spec)
            time.sleep(1.0)  # 2 cores: staggered starts, as volunteers arrive
        ids = swarm.wait_ready([s["name"] for s in sc.specs[: sc.peers]], timeout_s=300)
        ready_s = time.time() - started
        outs = swarm.start_clients()
        t0 = _wait_clients_ready(outs, swarm, 180)
        schedule = []
        for t_s, kind, idx in sc.events:
            time.sleep(max(0.0, t0 + t_s - time.time()))
            name = sc.specs[idx]["name"]
            schedule.append({"t_s": round(time.time() - t0, 2), "kind": kind, "peer": name})
            if kind == "crash":
                swarm.crash(name)
            elif kind == "leave":
                swarm.leave(name)
            else:
                swarm.start_peer(sc.specs[idx])
        for c in range(sc.clients):
            swarm.procs[f"client{c}"].wait(max(60.0, t0 + sc.duration_s + 300 - time.time()))
        for name in swarm.ready_files:
            if name not in ids and swarm.ready_files[name].exists():
                ids[name] = json.loads(swarm.ready_files[name].read_text())["peer_id"]
    lines = [json.loads(ln) for p in outs for ln in p.read_text().splitlines() if ln.startswith("{")]
    return {"t0": t0, "peers_ready_s": ready_s, "ids": ids, "schedule": schedule, "events": lines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/validate_sim.py", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--joins", type=int, default=2)
    parser.add_argument("--duration", type=float, default=240.0, help="seconds the clients generate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "validate-sim.json")
    parser.add_argument("--resim", type=Path, help="re-run only the simulator for a stored comparison (no root)")
    parser.add_argument("--recompare", type=Path, help="recompute --out from its .raw.json (no root, no swarm)")
    args = parser.parse_args(argv)
    if args.recompare:
        stored = json.loads(args.out.read_text())
        fields = dict(stored["scenario"])
        fields["events"] = [tuple(e) for e in fields["events"]]
        return _report(Scenario(**fields), json.loads(args.recompare.read_text()), args.out)
    if args.resim:
        stored = json.loads(args.resim.read_text())
        fields = dict(stored["scenario"])
        fields["events"] = [tuple(e) for e in fields["events"]]
        result = resimulate(stored, Scenario(**fields))
        args.resim.write_text(dumps(result))
        print_table(result)
        return 0
    missing = missing_requirements()
    if missing:
        print(f"validate-sim needs {missing}", file=sys.stderr)
        return 2
    sc = draw(Scenario(peers=args.peers, joins=args.joins, duration_s=args.duration, seed=args.seed))
    from tests.helpers.tiny_model import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="peerd-validate-sim-") as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "tiny", num_layers=sc.num_blocks)
        real = run_real(sc, Path(tmp), ckpt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # the raw events (every generation's token times, every placement read), kept for --recompare
    args.out.with_suffix(".raw.json").write_text(json.dumps(real) + "\n")
    return _report(sc, real, args.out)


def _report(sc: Scenario, real: dict[str, Any], out: Path) -> int:
    from tests.helpers.tiny_model import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="peerd-validate-sim-") as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "tiny", num_layers=sc.num_blocks)  # seeded: the same weights
        reference = reference_outputs(ckpt, real["events"], sc.tokens)
    result = compare(sc, real, reference)
    result["scenario"] = asdict(sc)
    out.write_text(dumps(result))
    print_table(result)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
