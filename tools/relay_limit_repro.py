"""Repro of the open relay defect (docs/operating.md, "Known limit of relayed connections"): a client
behind NAT echoes 1 KiB..256 KiB through a circuit relay to a peer behind another NAT; in our runs
sizes up to 64 KiB pass and 256 KiB is reset. Run as root from the repo root:
`.venv/bin/python tools/relay_limit_repro.py plain|relayplain|relaypublic|cresearch`."""

import asyncio
import os
import struct
import sys
import time

sys.path.insert(0, os.getcwd())
from hivemind.p2p import P2P

from peerd.rpc.p2pd import daemon_multiaddr, start_p2p
from tests.helpers.netinet import Internet

CUR = {"ns": None}
_orig = asyncio.subprocess.create_subprocess_exec


async def _exec(*args, **kw):
    if CUR["ns"]:
        args = ("ip", "netns", "exec", CUR["ns"], *args)
    return await _orig(*args, **kw)


asyncio.subprocess.create_subprocess_exec = _exec


async def in_ns(host, coro_fn):
    CUR["ns"] = host.ns
    try:
        return await coro_fn()
    finally:
        CUR["ns"] = None


async def echo(stream_info, reader, writer):
    try:
        while True:
            hdr = await reader.readexactly(4)
            n = struct.unpack(">I", hdr)[0]
            data = await reader.readexactly(n)
            writer.write(hdr + data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()


async def main(variant):
    with Internet(prefix="rdbg") as net:
        boot = net.public_host("boot")
        a = net.home_router("r1").host("a")
        c = net.home_router("rc").host("c")
        if variant == "relaypublic":
            relay = await in_ns(
                boot, lambda: P2P.create(host_maddrs=["/ip4/0.0.0.0/tcp/0"], force_reachability="public")
            )
        elif variant.startswith("relayplain"):
            relay = await in_ns(boot, lambda: P2P.create(host_maddrs=["/ip4/0.0.0.0/tcp/0"]))
        else:
            relay = await in_ns(boot, lambda: start_p2p(host_maddrs=["/ip4/0.0.0.0/tcp/0"]))
        rmaddr = next(str(m) for m in await relay.get_visible_maddrs() if str(m).startswith(f"/ip4/{boot.ip}/"))
        if "aresearch" in variant:
            A = await in_ns(
                a,
                lambda: P2P.create(
                    host_maddrs=["/ip4/0.0.0.0/tcp/0"],
                    initial_peers=[rmaddr],
                    use_auto_relay=True,
                    trusted_relays=[rmaddr],
                    force_reachability="private",
                ),
            )
        else:
            A = await in_ns(
                a, lambda: start_p2p(host_maddrs=["/ip4/0.0.0.0/tcp/0"], initial_peers=[rmaddr], relays=[rmaddr])
            )
        await A.add_binary_stream_handler("echo", echo)
        if "cresearch" in variant:
            C = await in_ns(
                c,
                lambda: P2P.create(
                    host_maddrs=["/ip4/0.0.0.0/tcp/0"], initial_peers=[rmaddr], force_reachability="private"
                ),
            )
        elif variant in ("plain", "relayplain", "aresearch", "relaypublic"):
            C = await in_ns(c, lambda: P2P.create(initial_peers=[rmaddr], dht_mode="client"))
        else:
            C = await in_ns(
                c, lambda: start_p2p(host_maddrs=["/ip4/0.0.0.0/tcp/0"], initial_peers=[rmaddr], relays=[rmaddr])
            )
        await asyncio.sleep(1.0)
        await C._client.connect(A.peer_id, [daemon_multiaddr(f"{rmaddr}/p2p-circuit")])
        for size in (1024, 4096, 16384, 32768, 65536, 262144):
            try:
                _, r, w = await asyncio.wait_for(C.call_binary_stream_handler(A.peer_id, "echo"), 10)
                t = time.monotonic()
                w.write(struct.pack(">I", size) + b"z" * size)
                await w.drain()
                hdr = await asyncio.wait_for(r.readexactly(4), 10)
                await asyncio.wait_for(r.readexactly(struct.unpack(">I", hdr)[0]), 10)
                print(variant, size, "ok", round((time.monotonic() - t) * 1e3, 1), "ms", flush=True)
                w.close()
            except Exception as e:
                print(variant, size, "FAIL", type(e).__name__, e, flush=True)
        for p in (C, A, relay):
            await p.shutdown()


asyncio.run(main(sys.argv[1]))
