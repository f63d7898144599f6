"""NAT and weak-link numbers on the emulated internet (root, iproute2, nftables): `make bench-nat`.

Builds the network of tests/helpers/netinet.py (public bootstrap/relay, peers behind their own home
NAT routers, a client behind another) with the tiny test model, and measures, side by side in one
run (these machines are noisy: compare the ratios, not the absolute times):

* join-to-serving: from `peerd run` to its ready file, for a NATed peer and for a public one
  (both include starting Python and torch; the difference is the dial-back and the p2pd restart);
* decode step time through one relayed hop vs one direct hop (same compute, same client);
* an 8 x 128 forward batch to a peer behind a 5 Mbit/s uplink (tc tbf), without and with the
  wire codec's 8-bit blockwise compression, next to the same batch to an unshaped public peer and
  to the NATed peer (through peerd's relay).

Hole punching is not measured: go-libp2p only punches once a peer has a public address, which a
private test network never gives it (docs/decisions.md, section 8). Results: bench-results/nat.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.netinet import Host, Internet, missing_requirements  # noqa: E402
from tests.helpers.tiny_model import make_tiny_checkpoint  # noqa: E402

CLIENT = REPO / "tests" / "slow" / "nat_client.py"
PEER_ARGS = ["--no-measure", "--torch-threads", "1", "--announce-period", "5", "--model-id", "tiny"]
PROMPT = "3,14,15,92,65,35"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def wait_ready(path: Path, proc: subprocess.Popen[Any], timeout_s: float = 240.0) -> dict[str, Any]:
    """The JSON a `peerd run --ready-file` (or any helper) writes once ready; fails fast if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except json.JSONDecodeError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"{path.stem} exited with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{path.stem} not ready after {timeout_s:.0f}s")


def _client(net: Internet, host: Host, ckpt: Path, boot: list[str], args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-u", str(CLIENT), "--initial-peers", *boot, "--ckpt", str(ckpt), "--prompt", PROMPT]
    proc = net.popen(host, [*cmd, *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=300)
    for line in reversed(out.splitlines()):
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") in ("result", "forwards"):
            return event
        if event.get("event") == "error":
            raise RuntimeError(event["message"])
    raise RuntimeError(f"client printed no result: {out[-2000:]}")


def main() -> int:
    missing = missing_requirements()
    if missing:
        print(f"bench-nat needs {missing}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="peerd-bench-nat-") as tmp, Internet(prefix="bnat") as net:
        work = Path(tmp)
        ckpt = make_tiny_checkpoint(work / "tiny", num_layers=6)
        procs: list[subprocess.Popen[Any]] = []

        def spawn(name: str, host: Host, args: list[str]) -> tuple[subprocess.Popen[Any], Path, float]:
            ready = work / f"{name}.json"
            cmd = [sys.executable, "-m", "peerd", *args, "--model", str(ckpt), "--ready-file", str(ready)]
            with (work / f"{name}.log").open("wb") as log:
                started = time.monotonic()
                proc = net.popen(host, cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            return proc, ready, started

        try:
            boot_host = net.public_host("boot")
            proc, ready, _ = spawn("boot", boot_host, ["bootstrap", "--new-swarm", "--model-id", "tiny"])
            boot = [m for m in wait_ready(ready, proc)["maddrs"] if f"/{boot_host.ip}/" in m]
            hosts = {
                "nated": net.home_router("r1").host("nated"),
                "public": net.public_host("public"),
                "slowlink": net.public_host("slowlink"),
                "client": net.home_router("rc").host("client"),
            }
            net.rate_limit(hosts["slowlink"], "5mbit", direction="up")
            joined: dict[str, float] = {}
            infos: dict[str, dict[str, Any]] = {}
            for name in ("nated", "public", "slowlink"):  # one at a time: start-up times stay comparable
                args = ["run", "--blocks", "0:6", "--initial-peers", ",".join(boot), "--name", name, *PEER_ARGS]
                proc, ready, started = spawn(name, hosts[name], [*args, "--identity", str(work / f"{name}.key")])
                infos[name] = wait_ready(ready, proc)
                joined[name] = time.monotonic() - started
            results["join_to_serving_s"] = {n: round(v, 2) for n, v in joined.items()}
            results["reach"] = {n: i["reach"] for n, i in infos.items()}
            ids = {n: i["peer_id"] for n, i in infos.items()}

            decode = {}
            for name in ("nated", "public", "nated", "public"):  # interleaved, best of two
                run = _client(net, hosts["client"], ckpt, boot, ["--tokens", "48", "--allow", ids[name]])
                decode.setdefault(name, []).append(1e3 / run["tokens_per_s"])
            results["decode_ms_per_token"] = {n: round(min(v), 2) for n, v in decode.items()}
            results["relay_overhead_ms_per_step"] = round(
                results["decode_ms_per_token"]["nated"] - results["decode_ms_per_token"]["public"], 2
            )

            transfer = {}
            for name, codec in (
                ("slowlink", "none"),
                ("slowlink", "blockwise8"),
                ("public", "none"),
                ("nated", "none"),
            ):
                args = ["--tokens", "1", "--forwards", "4", "--compression", codec, "--allow", ids[name]]
                run = _client(net, hosts["client"], ckpt, boot, [*args, "--expect", ids[name]])
                transfer[f"{name}_{codec}"] = round(min(h["s"] for h in run["served"]), 3)
            results["forward_8x128_s"] = transfer
            results["compression_speedup_on_5mbit"] = round(
                transfer["slowlink_none"] / transfer["slowlink_blockwise8"], 2
            )
            # 256 KiB each way through peerd's relay (libp2p's circuit relay resets after 128 KiB)
            results["relayed_vs_direct_forward_8x128"] = round(transfer["nated_none"] / transfer["public_none"], 2)
        finally:
            for proc in procs:
                net.stop(proc)
    out = REPO / "bench-results" / "nat.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key.ljust(width)}  {value}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
