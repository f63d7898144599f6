"""Research script (not part of the product): relays, AutoNAT and DCUtR of hivemind 1.1.12's p2pd inside
the emulated internet (tests/helpers/netinet.py). Run as root from the repo root:
`.venv/bin/python tools/nat_research.py forced|relay_auto|none`. Findings: docs/decisions.md, section 8.
"""

import asyncio
import json
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from tests.helpers.netinet import Internet

VARIANT = sys.argv[1] if len(sys.argv) > 1 else "forced"
LOGDIR = f"/tmp/peerd-nat-research/logs-{VARIANT}"
os.makedirs(LOGDIR, exist_ok=True)
os.environ["GOLOG_LOG_LEVEL"] = os.environ.get(
    "GOLOG_LOG_LEVEL", "info,autonat=debug,autorelay=debug,p2p-holepunch=debug,relay=debug,basichost=debug"
)

CUR = {"ns": None, "name": None}
_orig_exec = asyncio.subprocess.create_subprocess_exec


async def _exec_in_ns(*args, **kw):
    if CUR["ns"]:
        args = ("ip", "netns", "exec", CUR["ns"], *args)
    return await _orig_exec(*args, **kw)


asyncio.subprocess.create_subprocess_exec = _exec_in_ns


async def _read_outputs(self, ready):
    name = CUR["name"]
    with open(f"{LOGDIR}/{name}.log", "a") as log:  # noqa: ASYNC230 (a research log, written line by line)
        while True:
            line = await self._child.stdout.readline()
            if not line:
                break
            text = line.rstrip().decode(errors="ignore")
            log.write(f"{time.time():.3f} {text}\n")
            log.flush()
            if text.startswith("Peer ID:") and not ready.done():
                ready.set_result(None)
    if not ready.done():
        ready.set_exception(P2PDaemonError("daemon died"))


P2P._read_outputs = _read_outputs
_orig_args = P2P._make_process_args


def _args_with_extra(*args, **kwargs):
    kwargs.update(CUR.get("extra") or {})
    return _orig_args(*args, **kwargs)


P2P._make_process_args = staticmethod(_args_with_extra)
T0 = time.monotonic()


def log(*a):
    print(f"[{time.monotonic() - T0:7.2f}s]", *a, flush=True)


async def create(host, name, extra=None, **kw):
    CUR["ns"], CUR["name"], CUR["extra"] = host.ns, name, extra
    try:
        p2p = await P2P.create(**kw)
    finally:
        CUR["ns"] = None
    return p2p


async def echo_handler(info, reader, writer):
    try:
        while True:
            hdr = await reader.readexactly(4)
            (n,) = struct.unpack(">I", hdr)
            data = await reader.readexactly(n)
            writer.write(hdr + data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def rtt(p2p, peer_id, rounds=30, size=64):
    t = time.monotonic()
    info, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, "echo"), 30)
    open_s = time.monotonic() - t
    samples = []
    payload = b"z" * size
    for _ in range(rounds):
        t = time.monotonic()
        writer.write(struct.pack(">I", size) + payload)
        await writer.drain()
        hdr = await asyncio.wait_for(reader.readexactly(4), 10)
        await reader.readexactly(struct.unpack(">I", hdr)[0])
        samples.append(time.monotonic() - t)
    writer.close()
    samples.sort()
    return {
        "open_ms": round(open_s * 1e3, 2),
        "p50_ms": round(samples[len(samples) // 2] * 1e3, 3),
        "min_ms": round(samples[0] * 1e3, 3),
        "addr": str(info.addr),
    }


async def conns(p2p, target):
    return [str(a) for pi in await p2p.list_peers() if pi.peer_id == target for a in pi.addrs]


def _varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def circuit_maddr(relay_maddr_str):
    """/ip4/../tcp/../p2p/RELAY/p2p-circuit with the peer id as a raw multihash (go-multiaddr wants that;
    hivemind's python Multiaddr encodes /p2p/ as a CIDv1, which p2pd rejects)."""
    base, _, rid = str(relay_maddr_str).partition("/p2p/")
    mh = PeerID.from_base58(rid).to_bytes()
    raw = Multiaddr(base).to_bytes() + _varint(421) + _varint(len(mh)) + mh + _varint(290)
    return Multiaddr(raw)


CIRCUIT_WAIT_S = float(os.environ.get("CIRC_WAIT", "25"))


async def wait_circuit(p2p, name, wait_s=CIRCUIT_WAIT_S):
    t = time.monotonic()
    while time.monotonic() - t < wait_s:
        addrs = await p2p.get_visible_maddrs(latest=True)
        circ = [a for a in addrs if "p2p-circuit" in str(a)]
        if circ:
            log(f"{name}: circuit address after {time.monotonic() - t:.2f}s: {[str(a) for a in circ]}")
            return circ, time.monotonic() - t
        await asyncio.sleep(0.25)
    log(f"{name}: NO circuit address after {wait_s}s; visible={[str(a) for a in addrs]}")
    return [], None


async def main():
    results = {"variant": VARIANT}
    with Internet(prefix="natres") as net:
        hosts = {n: net.public_host(n) for n in ("relay", "pub2", "pub3", "pub4")}
        for i, n in enumerate(("peerA", "peerB", "client"), start=1):
            hosts[n] = net.home_router(f"r{i}").host(n)
        for n, h in hosts.items():
            log(n, h.ip, "router" if h.router else "public", h.router.wan_ip if h.router else "")
        any_tcp = ["/ip4/0.0.0.0/tcp/0"]
        relay_kw = dict(host_maddrs=any_tcp)
        if VARIANT in ("forced", "forced_nohp"):
            relay_kw["force_reachability"] = "public"
        relay = await create(hosts["relay"], "relay", **relay_kw)
        log("relay visible at start:", [str(a) for a in await relay.get_visible_maddrs()])
        relay_maddr = next(a for a in await relay.get_visible_maddrs() if "10.200.0." in str(a))
        results["relay_visible_at_start"] = [str(a) for a in await relay.get_visible_maddrs()]
        pubs = []
        for n in ("pub2", "pub3", "pub4"):
            kw = dict(host_maddrs=any_tcp, initial_peers=[relay_maddr])
            if VARIANT in ("forced", "forced_nohp"):
                kw["force_reachability"] = "public"
            pubs.append(await create(hosts[n], n, **kw))
        for p in [relay, *pubs]:
            await p.add_binary_stream_handler("echo", echo_handler)
        # The NATed peers: bootstrap to all public peers (observed addresses need several observers).
        boot = [relay_maddr] + [next(a for a in await p.get_visible_maddrs() if "10.200.0." in str(a)) for p in pubs]
        nat_kw = dict(host_maddrs=any_tcp, initial_peers=boot, use_auto_relay=True, trusted_relays=[relay_maddr])
        if VARIANT in ("forced", "forced_nohp", "relay_auto"):
            nat_kw["force_reachability"] = "private"
        t_start = time.monotonic()
        extra = {"relayDiscovery": 0} if VARIANT in ("forced", "nodisc", "relay_auto", "none_nodisc") else None
        peer_a = await create(hosts["peerA"], "peerA", extra=extra, **nat_kw)
        peer_b = await create(hosts["peerB"], "peerB", extra=extra, **nat_kw)
        client = await create(hosts["client"], "client", **{**nat_kw, "use_auto_relay": False, "trusted_relays": None})
        log(f"NATed daemons up in {time.monotonic() - t_start:.2f}s")
        for p in (peer_a, peer_b, client):
            await p.add_binary_stream_handler("echo", echo_handler)
        log("peerA visible at start:", [str(a) for a in await peer_a.get_visible_maddrs()])
        results["peerA_visible_at_start"] = [str(a) for a in await peer_a.get_visible_maddrs()]
        circ_a, ta = await wait_circuit(peer_a, "peerA")
        circ_b, tb = await wait_circuit(peer_b, "peerB")
        results["reservation_s"] = {"peerA": ta, "peerB": tb}
        results["peerA_visible_after"] = [str(a) for a in await peer_a.get_visible_maddrs(latest=True)]
        results["relay_visible_after"] = [str(a) for a in await relay.get_visible_maddrs(latest=True)]
        results["client_visible_after"] = [str(a) for a in await client.get_visible_maddrs(latest=True)]
        log("relay visible after:", results["relay_visible_after"])
        log("peerA visible after:", results["peerA_visible_after"])
        log("client visible after:", results["client_visible_after"])

        # Direct baselines.
        results["rtt_public_direct"] = await rtt(pubs[0], relay.peer_id)
        results["rtt_nat_to_public_direct"] = await rtt(client, pubs[0].peer_id)
        log("direct pub2->relay", results["rtt_public_direct"])
        log("direct client(NAT)->pub2", results["rtt_nat_to_public_direct"])

        # Can the client reach peerA without a circuit address? (should fail: private LAN address)
        t = time.monotonic()
        try:
            await asyncio.wait_for(
                client._client.connect(peer_a.peer_id, [Multiaddr(f"/ip4/{hosts['peerA'].ip}/tcp/1")]), 15
            )
            results["direct_dial_lan"] = "connected?!"
        except Exception as e:
            results["direct_dial_lan"] = f"{type(e).__name__} after {time.monotonic() - t:.2f}s"
        log("client -> peerA LAN addr:", results["direct_dial_lan"])

        manual = circuit_maddr(relay_maddr)
        log("manual circuit maddr", manual, manual.to_bytes().hex())
        results["manual_circuit_addr"] = str(manual)
        if not circ_a:
            log("peerA advertises no circuit addr; dialing the hand-made", manual)
            circ_a = [manual]
        if not circ_b:
            circ_b = [manual]
        if circ_a:
            circ = circuit_maddr(str(circ_a[0]).split("/p2p-circuit")[0])
            t = time.monotonic()
            try:
                await asyncio.wait_for(client._client.connect(peer_a.peer_id, [circ]), 20)
            except Exception as e:
                log("client connect via circuit FAILED", type(e).__name__, e)
                raise
            results["client_connect_via_relay_s"] = time.monotonic() - t
            log(f"client connected to peerA via {circ} in {results['client_connect_via_relay_s']:.3f}s")
            log("client's conns to peerA:", await conns(client, peer_a.peer_id))
            results["rtt_client_to_A_relayed"] = await rtt(client, peer_a.peer_id)
            log("relayed client->peerA", results["rtt_client_to_A_relayed"])
            results["client_conns_to_A_t0"] = await conns(client, peer_a.peer_id)
            # A -> B via relay: stream open with only the relayed address in the peerstore
            if circ_b:
                circb = circuit_maddr(str(circ_b[0]).split("/p2p-circuit")[0])
                await peer_a._client.connect(peer_b.peer_id, [circb])
                results["rtt_A_to_B_relayed"] = await rtt(peer_a, peer_b.peer_id)
                log("relayed peerA->peerB", results["rtt_A_to_B_relayed"])
            # Give DCUtR time to upgrade.
            t = time.monotonic()
            direct = []
            while time.monotonic() - t < float(os.environ.get("HP_WAIT", "30")):
                cs = await conns(client, peer_a.peer_id)
                direct = [c for c in cs if "p2p-circuit" not in c]
                if direct:
                    break
                await asyncio.sleep(0.5)
            results["client_conns_to_A_after_30s"] = await conns(client, peer_a.peer_id)
            results["holepunch_direct_conn"] = direct
            log("client's conns to peerA after wait:", results["client_conns_to_A_after_30s"])
            results["rtt_client_to_A_after_wait"] = await rtt(client, peer_a.peer_id)
            log("client->peerA after wait", results["rtt_client_to_A_after_wait"])
            # Big payload over relay
            t = time.monotonic()
            sweep = {}
            for size in (16384, 65536, 262144, 1 << 20, 4 << 20):
                for label, who in (("relayed", peer_a.peer_id), ("direct_to_pub2", pubs[0].peer_id)):
                    t1 = time.monotonic()
                    try:
                        rr = await rtt(client, who, rounds=2, size=size)
                        sweep[f"{label}_{size}"] = f"ok p50 {rr['p50_ms']} ms"
                    except Exception as e:
                        sweep[f"{label}_{size}"] = f"{type(e).__name__}: {e} after {time.monotonic() - t1:.2f}s"
            r = sweep
            log("size sweep", json.dumps(r, indent=1))
        for p in (client, peer_a, peer_b, *pubs, relay):
            await p.shutdown()
    Path(f"/tmp/peerd-nat-research/results-{VARIANT}.json").write_text(json.dumps(results, indent=1))
    log(json.dumps(results, indent=1))


asyncio.run(main())
