"""NAT traversal end to end: peers and a client behind separate home NATs, on the emulated internet.

Topology (tests/helpers/netinet.py; every box is a network namespace)::

    boot (public, 10.200.0.x): `peerd bootstrap`, also the circuit relay
    c    (public): `peerd run --blocks 3:6`, reachable directly
    r1 -> a1  `peerd run --blocks 0:3`      r3 -> a2  `peerd run --blocks 0:3` (replica)
    r2 -> b   `peerd run --blocks 3:6`      rc -> client (tests/slow/nat_client.py)

No NATed box can accept a connection from outside its LAN, so a peer must learn that it is behind
NAT (ready file: reach "relayed"), reserve a slot on the relay and announce its circuit address;
the client, itself behind a NAT, must reach both hops through the relay (or a hole punched from
there). The cases: (a) greedy generation through a1 and b equals the local model token for token;
(b) kill -9 of the route's 0:3 peer after token 10 fails over to the replica behind another NAT,
with identical output and exactly one stall; (c) the public peer finds out it is direct (so a
detector that always says "relayed" fails), and a route mixing a relayed and a direct hop works.
Each client run names the peers it may route through. All cases share one network and one set of
processes (starting them is most of the runtime). In (b) the client pauses at a fixed token until
the test has killed the peer, so nothing depends on timing.

Needs root, iproute2 and nftables; skipped otherwise. On failure the tails of every log are printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from peerd.client.compression import AUTO_BELOW_BYTES_PER_S
from tests.helpers.netinet import Host, Internet, list_namespaces, missing_requirements

pytestmark = [
    pytest.mark.slow,
    # the first test also pays for the fixture: bootstrap + peers (START_TIMEOUT_S each) + a client
    pytest.mark.timeout(540),
    pytest.mark.skipif(missing_requirements() is not None, reason=f"netinet: {missing_requirements()}"),
]

REPO = Path(__file__).resolve().parents[2]
CLIENT_SCRIPT = Path(__file__).with_name("nat_client.py")
PROMPT = [3, 14, 15, 92, 65, 35]
MODEL_ID = "tiny"
PEER_ARGS = ["--no-measure", "--torch-threads", "1", "--announce-period", "2", "--model-id", MODEL_ID]
# name: (router, blocks); router None: a public host
PEERS = {
    "a1": ("r1", (0, 3)),
    "b": ("r2", (3, 6)),
    "a2": ("r3", (0, 3)),
    "c": (None, (3, 6)),
    "slowlink": (None, (3, 6)),  # public like c, same compute, but a 5 Mbit/s uplink (tc tbf)
}
SLOW_UPLINK = "5mbit"
NATED = ("a1", "b", "a2")
START_TIMEOUT_S = 180.0  # four peers importing torch at once on a 2-core machine, plus NAT discovery
CLIENT_TIMEOUT_S = 150.0  # client start-up (torch import), route, relay dials, generation


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # a SIGKILLed peer's last log lines are on disk
    return env


@dataclass
class Proc:
    """A process in a namespace, with its log file and (for peerd) its ready file."""

    name: str
    popen: subprocess.Popen[Any]
    log_file: Path
    ready_file: Path | None = None

    def ready(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.ready_file.read_text())) if self.ready_file else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = []
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        return f"----- {self.name} ({state}) {self.log_file}\n" + "\n".join(text)


@dataclass
class NatSwarm:
    net: Internet
    workdir: Path
    ckpt: Path
    expected: list[int]  # local greedy reference, 32 tokens of PROMPT
    initial_peers: list[str] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # ready files by name

    def spawn(self, name: str, host: Host, args: list[str]) -> Proc:
        ready = self.workdir / f"{name}.ready.json"
        log = self.workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "peerd", *args, "--model", str(self.ckpt), "--ready-file", str(ready)]
        with log.open("wb") as out:
            popen = self.net.popen(host, cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log, ready)
        self.procs[name] = proc
        return proc

    def wait_ready(self, names: list[str], timeout_s: float) -> None:
        """Poll until each process wrote its ready file; fail with every log tail if one dies or is late."""
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in sorted(pending):
                proc = self.procs[name]
                info = proc.ready()
                if info is not None:
                    self.info[name] = info
                    pending.discard(name)
                elif proc.popen.poll() is not None:
                    pytest.fail(f"{name} exited with code {proc.popen.returncode}\n{self.tails()}")
            if pending and time.monotonic() > deadline:
                pytest.fail(f"{sorted(pending)} not ready after {timeout_s:.0f}s\n{self.tails()}")
            time.sleep(0.2)

    def tails(self, *extra: Proc) -> str:
        return "\n".join(p.log_tail() for p in [*self.procs.values(), *extra])

    @contextlib.contextmanager
    def explained(self, *extra: Proc) -> Iterator[None]:
        """Print every log tail when an assertion inside fails (pytest shows it with the failure)."""
        try:
            yield
        except AssertionError:
            print(self.tails(*extra))
            raise


@pytest.fixture(scope="module")
def nat_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatSwarm]:
    from peerd.model.loading import load_local_model
    from tests.helpers.tiny_model import make_tiny_checkpoint

    workdir = tmp_path_factory.mktemp("nat")
    ckpt = make_tiny_checkpoint(workdir / "tiny", num_layers=6)
    expected = load_local_model(ckpt, progress=False).generate_greedy(PROMPT, 32, eos_token_ids=[])
    with Internet(prefix="peerdnat") as net:
        swarm = NatSwarm(net, workdir, ckpt, expected)
        try:
            boot = net.public_host("boot")
            routers = {name: net.home_router(name) for name in ("r1", "r2", "r3", "rc")}
            routers["rc"].host("client")
            boot_args = ["bootstrap", "--new-swarm", "--host", "0.0.0.0", "--port", "0", "--model-id", MODEL_ID]
            swarm.spawn("boot", boot, [*boot_args, "--identity", str(workdir / "boot.key")])
            swarm.wait_ready(["boot"], START_TIMEOUT_S)
            maddrs = [str(m) for m in swarm.info["boot"]["maddrs"]]
            swarm.initial_peers = [m for m in maddrs if m.startswith(f"/ip4/{boot.ip}/")]
            assert swarm.initial_peers, f"bootstrap announces no address on {boot.ip}: {maddrs}"
            for name, (router, (start, end)) in PEERS.items():
                host = net.public_host(name) if router is None else routers[router].host(name)
                if name == "slowlink":
                    net.rate_limit(host, SLOW_UPLINK, direction="up")
                args = ["run", "--blocks", f"{start}:{end}", "--host", "0.0.0.0"]
                args += ["--initial-peers", ",".join(swarm.initial_peers), "--identity", str(workdir / f"{name}.key")]
                swarm.spawn(name, host, [*args, "--name", name, *PEER_ARGS])
            swarm.wait_ready(list(PEERS), START_TIMEOUT_S)
            yield swarm
        finally:
            for proc in reversed(swarm.procs.values()):
                net.stop(proc.popen)
    assert list_namespaces(net.tag) == []


class ClientRun:
    """tests/slow/nat_client.py in the client's namespace; its JSON lines arrive on a queue."""

    def __init__(self, swarm: NatSwarm, name: str, args: list[str]) -> None:
        log = swarm.workdir / f"{name}.log"
        cmd = [sys.executable, "-u", str(CLIENT_SCRIPT), "--initial-peers", *swarm.initial_peers]
        cmd += ["--ckpt", str(swarm.ckpt), "--model-id", MODEL_ID, "--prompt", ",".join(map(str, PROMPT)), *args]
        with log.open("wb") as err:
            popen = swarm.net.popen(
                swarm.net.hosts["client"],
                cmd,
                cwd=REPO,
                env=_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.proc = Proc(name, popen, log)
        self.swarm = swarm
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stray: list[str] = []  # stdout lines that are not events
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.popen.stdout is not None
        for line in self.proc.popen.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self.events.put(event)
            else:
                self.stray.append(line.rstrip())
        self.events.put(None)

    def expect(self, kind: str, timeout_s: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
        """The next event of ``kind`` (skipping others); fail with the logs on error, exit or deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"client: no {kind!r} event after {timeout_s:.0f}s\n{self.diagnostics()}")
            if event is None:
                self.proc.popen.wait(10)
                pytest.fail(f"client exited ({self.proc.popen.returncode}) before {kind!r}\n{self.diagnostics()}")
            if event["event"] == "error":
                pytest.fail(f"client error {event['type']}: {event['message']}\n{self.diagnostics()}")
            if event["event"] == kind:
                return event

    def resume(self) -> None:
        assert self.proc.popen.stdin is not None
        self.proc.popen.stdin.write("\n")
        self.proc.popen.stdin.flush()

    def diagnostics(self) -> str:
        stray = "\n".join(self.stray[-20:])
        return f"{self.swarm.tails(self.proc)}\n----- client stdout (not events)\n{stray}"

    def stop(self) -> None:
        self.swarm.net.stop(self.proc.popen)


def hops(result: dict[str, Any]) -> list[str]:
    """One line per hop: name, blocks, the record's reach, how the client's streams went (direct or
    through peerd's relay) and its libp2p connections to the peer (a /p2p-circuit one is relayed)."""
    lines = []
    for span in result["route"]:
        conns = result["connections"].get(span["peer_id"], [])
        path = result["paths"].get(span["peer_id"], "?")
        lines.append(f"{span['name']}[{span['start']}:{span['end']}] reach={span['reach']} streams={path} {conns}")
    return lines


def test_generation_between_three_nats_matches_local_greedy(nat_swarm: NatSwarm) -> None:
    """(a) 0:3 behind r1, 3:6 behind r2, the client behind rc, only the bootstrap/relay public."""
    ids = {name: nat_swarm.info[name]["peer_id"] for name in ("a1", "b")}
    client = ClientRun(nat_swarm, "client-a", ["--tokens", "24", "--allow", *ids.values()])
    try:
        result = client.expect("result")
    finally:
        client.stop()
    print("\n(a) route: " + "\n          ".join(hops(result)))
    with nat_swarm.explained(client.proc):
        assert result["tokens"] == nat_swarm.expected[:24]
        assert [s["name"] for s in result["route"]] == ["a1", "b"]
        assert result["stalls_s"] == []
        reach = {name: nat_swarm.info[name].get("reach") for name in NATED}
        assert reach == dict.fromkeys(NATED, "relayed"), f"ready files: {nat_swarm.info}"
        assert [s["reach"] for s in result["route"]] == ["relayed", "relayed"], result["route"]
        # announced: a circuit through the bootstrap node
        relay = f"/ip4/{nat_swarm.net.hosts['boot'].ip}/tcp/"
        circuit = f"/p2p/{nat_swarm.info['boot']['peer_id']}/p2p-circuit"
        for span in result["route"]:
            assert any(a.startswith(relay) and circuit in a for a in span["addrs"]), span
            assert result["paths"][span["peer_id"]] == f"relay {nat_swarm.info['boot']['peer_id']}"
            # ... and a libp2p circuit connection, made so that p2pd may punch a hole (DCUtR; it never
            # does on private addresses, so the streams above stay relayed here)
            assert any("/p2p-circuit" in c for c in result["connections"][span["peer_id"]]), result["connections"]


def test_public_peer_is_direct_and_mixes_with_a_relayed_hop(nat_swarm: NatSwarm) -> None:
    """(c) the peer on a public host is dialled back, so it says "direct" and announces its own
    address; the NATed client generates through a2 (or a1; relayed) then c (direct)."""
    first = next(n for n in ("a2", "a1") if nat_swarm.procs[n].popen.poll() is None)  # (b) kills one
    ids = [nat_swarm.info[name]["peer_id"] for name in (first, "c")]
    client = ClientRun(nat_swarm, "client-c", ["--tokens", "16", "--allow", *ids])
    try:
        result = client.expect("result")
    finally:
        client.stop()
    print("\n(c) route: " + "\n          ".join(hops(result)))
    public = f"/ip4/{nat_swarm.net.hosts['c'].ip}/tcp/"
    with nat_swarm.explained(client.proc):
        assert nat_swarm.info["c"].get("reach") == "direct", nat_swarm.info["c"]
        assert result["tokens"] == nat_swarm.expected[:16]
        assert [(s["name"], s["reach"]) for s in result["route"]] == [(first, "relayed"), ("c", "direct")]
        assert any(a.startswith(public) and "/p2p-circuit" not in a for a in result["route"][1]["addrs"])
        assert result["paths"][ids[1]] == "direct" and result["paths"][ids[0]].startswith("relay ")


def test_large_batches_through_the_relay(nat_swarm: NatSwarm) -> None:
    """(e) 12 forward batches of 8 x 128 through a NATed peer: 256 KiB each way per batch, 3 MiB in
    all, through the relay. libp2p's circuit relay in hivemind's p2pd resets a relayed connection
    after 128 KiB; peerd's own relay must carry all of it, and every answer must be right."""
    first = next(n for n in ("a2", "a1") if nat_swarm.procs[n].popen.poll() is None)  # (b) kills one
    pid = nat_swarm.info[first]["peer_id"]
    args = ["--tokens", "1", "--forwards", "12", "--start", "0", "--end", "3", "--allow", pid, "--expect", pid]
    client = ClientRun(nat_swarm, "client-e", args)
    try:
        result = client.expect("forwards")
    finally:
        client.stop()
    seconds = [round(h["s"], 3) for h in result["served"]]
    print(f"\n(e) 12 x [8, 128] through {first} ({result['paths'].get(pid)}): seconds per batch {seconds}")
    with nat_swarm.explained(client.proc):
        assert [h["peer_id"] for h in result["served"]] == [pid] * 12
        assert result["paths"][pid] == f"relay {nat_swarm.info['boot']['peer_id']}"
        assert result["max_abs_diff"] < 1e-5


def test_forward_batches_avoid_the_peer_on_a_slow_uplink(nat_swarm: NatSwarm) -> None:
    """(d) c and slowlink serve 3:6 with the same compute, but slowlink's uplink is 5 Mbit/s: an
    8 x 128 batch's answer (256 KiB) takes it ~0.4 s to send. Load-balanced routes weigh peers by
    the throughput the client observed, so after the first batches most go to c. The batches run
    blocks 3:6 only (hidden states in, out): both candidates are public, so this measures routing by
    bandwidth, not relaying."""
    ids = {name: nat_swarm.info[name]["peer_id"] for name in ("c", "slowlink")}
    client = ClientRun(
        nat_swarm,
        "client-d",
        [
            "--tokens",
            "1",
            "--forwards",
            "24",
            "--start",
            "3",
            "--end",
            "6",
            "--allow",
            *ids.values(),
            "--expect",
            *ids.values(),
        ],
    )
    try:
        result = client.expect("forwards")
    finally:
        client.stop()
    tail = [hop for hop in result["served"] if hop["start"] == 3][-16:]
    by = {name: [h for h in tail if h["peer_id"] == pid] for name, pid in ids.items()}
    seconds = {name: sum(h["s"] for h in hops) / max(1, len(hops)) for name, hops in by.items()}
    print(f"\n(d) last 16 batches' 3:6 hop: c {len(by['c'])}, slowlink {len(by['slowlink'])}; mean s per hop {seconds}")
    print(f"    observed block-tokens/s: {result['observed_tps']}")
    uplinks = {name: result["uplinks"].get(pid, 0.0) for name, pid in ids.items()}
    print(f"    published uplinks (MB/s): { {k: round(v / 1e6, 2) for k, v in uplinks.items()} }")
    with nat_swarm.explained(client.proc):
        # each measured its own uplink: 5 Mbit/s is 0.625 MB/s; c's is not limited
        assert 0.2e6 < uplinks["slowlink"] < 1.5e6, uplinks
        assert uplinks["c"] > max(10 * uplinks["slowlink"], AUTO_BELOW_BYTES_PER_S), uplinks
        assert len(tail) == 16
        # chance alone would split them evenly; with observed speeds about 10:1 in c's favour
        assert len(by["c"]) >= 12, (len(by["c"]), len(by["slowlink"]))
        if ids["slowlink"] in result["observed_tps"]:  # the router may never have tried it at all
            assert result["observed_tps"][ids["c"]] > 3 * result["observed_tps"][ids["slowlink"]]


def test_auto_compression_picks_blockwise8_for_the_slow_uplink_only(nat_swarm: NatSwarm) -> None:
    """(f) with ``compression="auto"`` a client sends 8-bit blockwise hidden states to a peer that
    published a slow uplink (exact ones to fast peers, as c's uplink in (d) is): batches through
    slowlink come back close to, but not exactly, the local result."""
    slow = nat_swarm.info["slowlink"]["peer_id"]
    args = ["--tokens", "1", "--forwards", "4", "--start", "3", "--end", "6", "--compression", "auto"]
    client = ClientRun(nat_swarm, "client-f", [*args, "--allow", slow, "--expect", slow])
    try:
        result = client.expect("forwards")
    finally:
        client.stop()
    print(f"\n(f) codecs {result['codecs']}; max |swarm - local| {result['max_abs_diff']:.4f}")
    with nat_swarm.explained(client.proc):
        assert result["codecs"] == {slow: "blockwise8"}, result["uplinks"]
        assert [h["peer_id"] for h in result["served"]] == [slow] * 4
        assert 0 < result["max_abs_diff"] < 0.1


def test_kill_9_behind_nat_fails_over_to_replica_behind_another_nat(nat_swarm: NatSwarm) -> None:
    """(b) the route's 0:3 peer is SIGKILLed after token 10 of 32; the replica behind the other NAT
    takes over: identical output, exactly one stall."""
    ids = [nat_swarm.info[name]["peer_id"] for name in NATED]
    args = ["--tokens", "32", "--pause-after", "10", "--allow", *ids, "--expect", *ids]
    client = ClientRun(nat_swarm, "client-b", args)
    try:
        paused = client.expect("paused")
        first = next(s for s in paused["route"] if s["start"] == 0)
        victim = first["name"]
        with nat_swarm.explained(client.proc):
            assert victim in ("a1", "a2"), paused["route"]
        pid = int(nat_swarm.info[victim]["pid"])
        os.kill(pid, signal.SIGKILL)
        nat_swarm.procs[victim].popen.wait(10)  # dead before the client takes its next step
        client.resume()
        result = client.expect("result")
    finally:
        client.stop()
    survivor = "a2" if victim == "a1" else "a1"
    print(f"\n(b) killed {victim} after token 10; stalls {result['stalls_s']}")
    print("    route after failover: " + "\n                          ".join(hops(result)))
    with nat_swarm.explained(client.proc):
        assert result["tokens"] == nat_swarm.expected
        assert len(result["stalls_s"]) == 1, result["stalls_s"]
        assert [s["name"] for s in result["route"]] == [survivor, "b"]
        assert 0 < result["stalls_s"][0] < 30
