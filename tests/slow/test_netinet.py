"""The emulated internet itself (tests/helpers/netinet.py): NAT, filtering, tbf, delay shim, cleanup.

Needs root, iproute2 and nftables (``apt-get install -y nftables``); skipped otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.netinet import Host, Internet, list_namespaces, missing_requirements, read_line

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements() is not None, reason=f"netinet: {missing_requirements()}"),
]

SHIM = Path(__file__).resolve().parents[1] / "helpers" / "delay_shim.py"
BLOCKED_TIMEOUT = 2.0  # how long a probe that must fail waits for a SYN-ACK


@pytest.fixture(scope="module")
def net():
    with Internet(prefix="peerdtest") as internet:
        internet.public_host("boot")
        internet.public_host("relay")
        r1 = internet.home_router("r1")
        r2 = internet.home_router("r2")
        r1.host("peer1")
        r1.host("peer1b")
        r2.host("peer2")
        yield internet
    assert list_namespaces(internet.tag) == []


def _server(net: Internet, host: Host) -> int:
    _, port = net.tcp_server(host)
    return port


def test_nated_host_reaches_public_host_from_router_address(net: Internet) -> None:
    boot, peer1, r1 = net.hosts["boot"], net.hosts["peer1"], net.routers["r1"]
    port = _server(net, boot)
    result = net.tcp_probe(peer1, boot.ip, port)
    assert result["ok"], result
    assert result["peer_ip"] == r1.wan_ip  # source NAT: the internet sees the router, not 10.201.x
    assert peer1.ip.startswith("10.201.")


def test_hosts_on_one_lan_reach_each_other(net: Internet) -> None:
    peer1, peer1b = net.hosts["peer1"], net.hosts["peer1b"]
    port = _server(net, peer1)
    result = net.tcp_probe(peer1b, peer1.ip, port)
    assert result["ok"], result
    assert result["peer_ip"] == peer1b.ip  # no NAT inside the LAN


def test_public_host_cannot_reach_nated_host(net: Internet) -> None:
    boot, peer1, r1 = net.hosts["boot"], net.hosts["peer1"], net.routers["r1"]
    port = _server(net, peer1)
    # Not even with a route to the LAN: the router drops unsolicited inbound (no RST, a timeout).
    net.run(boot, ["ip", "route", "replace", r1.lan_subnet, "via", r1.wan_ip])
    try:
        result = net.tcp_probe(boot, peer1.ip, port, timeout=BLOCKED_TIMEOUT)
        assert not result["ok"] and result["error"] == "timeout", result
    finally:
        net.run(boot, ["ip", "route", "del", r1.lan_subnet])
    # And the router's own WAN address exposes nothing (no port forwarding): dropped, not refused.
    result = net.tcp_probe(boot, r1.wan_ip, port, timeout=BLOCKED_TIMEOUT)
    assert not result["ok"] and result["error"] == "timeout", result


def test_nated_hosts_cannot_reach_each_other(net: Internet) -> None:
    peer1, peer2, r1, r2 = net.hosts["peer1"], net.hosts["peer2"], net.routers["r1"], net.routers["r2"]
    port1, port2 = _server(net, peer1), _server(net, peer2)
    for src, dst, port in ((peer1, peer2, port2), (peer2, peer1, port1)):
        result = net.tcp_probe(src, dst.ip, port, timeout=BLOCKED_TIMEOUT)
        assert not result["ok"], result
    for src, router, port in ((peer1, r2, port2), (peer2, r1, port1)):
        result = net.tcp_probe(src, router.wan_ip, port, timeout=BLOCKED_TIMEOUT)
        assert not result["ok"] and result["error"] == "timeout", result


def test_tbf_limits_uplink(net: Internet) -> None:
    relay, peer2 = net.hosts["relay"], net.hosts["peer2"]
    port = _server(net, relay)
    size = 1_000_000  # 8 Mbit
    fast = net.tcp_probe(peer2, relay.ip, port, mode="sink", size=size, timeout=20)
    assert fast["ok"] and fast["server_got"] == size, fast
    net.rate_limit(peer2, "4mbit")  # 8 Mbit at 4 Mbit/s: about 2 s
    try:
        slow = net.tcp_probe(peer2, relay.ip, port, mode="sink", size=size, timeout=20)
    finally:
        net.run(peer2, ["tc", "qdisc", "del", "dev", "eth0", "root"])
    assert slow["ok"] and slow["server_got"] == size, slow
    assert 1.5 < slow["elapsed_s"] < 6.0, slow
    assert slow["elapsed_s"] > 3 * fast["elapsed_s"], (fast, slow)


def test_delay_shim_adds_delay(net: Internet) -> None:
    boot, relay, peer1 = net.hosts["boot"], net.hosts["relay"], net.hosts["peer1"]
    port = _server(net, boot)
    delay_ms = 100
    shim = net.popen(
        relay,
        [
            sys.executable,
            "-u",
            str(SHIM),
            "--listen",
            f"{relay.ip}:0",
            "--target",
            f"{boot.ip}:{port}",
            "--delay-ms",
            str(delay_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = read_line(shim, timeout=20).split()
    assert line[:2] == ["LISTENING", relay.ip], line
    shim_port = int(line[2])
    direct = net.tcp_probe(peer1, boot.ip, port, size=1000, rounds=3)
    delayed = net.tcp_probe(peer1, relay.ip, shim_port, size=1000, rounds=3)
    assert direct["ok"] and delayed["ok"], (direct, delayed)
    assert delayed["peer_ip"] == relay.ip  # the server sees the shim
    extra = delayed["rtt_s"] - direct["rtt_s"]
    assert 0.19 < extra < 0.19 + 1.0, (direct, delayed)  # 2 x 100 ms, generous above
    net.stop(shim)


def test_delay_shim_half_close_and_order_on_loopback() -> None:
    import asyncio

    from tests.helpers.delay_shim import start_delay_shim

    async def scenario() -> tuple[bytes, float]:
        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until the client's half-close arrives through the shim
            writer.write(data[::-1])
            writer.write_eof()
            await writer.drain()
            writer.close()

        target = await asyncio.start_server(sink, "127.0.0.1", 0)
        shim = await start_delay_shim(("127.0.0.1", 0), ("127.0.0.1", target.sockets[0].getsockname()[1]), 0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", shim.sockets[0].getsockname()[1])
        payload = b"".join(i.to_bytes(4, "big") for i in range(300_000))  # 1.2 MB, order-sensitive
        t0 = time.monotonic()
        writer.write(payload)
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        elapsed = time.monotonic() - t0
        writer.close()
        for server in (shim, target):
            server.close()
            await server.wait_closed()
        assert got == payload[::-1]
        return got, elapsed

    _, elapsed = asyncio.run(scenario())
    assert elapsed >= 0.1  # at least one delay each way


def test_cleanup_removes_everything_even_on_error() -> None:
    tag = ""
    sleeper = None
    with pytest.raises(RuntimeError, match="boom"), Internet(prefix="peerdtest") as net:
        tag = net.tag
        router = net.home_router("r")
        host = router.host("h")
        sleeper = net.popen(host, ["sleep", "300"])
        assert len(list_namespaces(tag)) == 3
        raise RuntimeError("boom")
    assert list_namespaces(tag) == []  # close() deletes synchronously
    assert sleeper is not None and sleeper.poll() is not None  # and ended what it started
