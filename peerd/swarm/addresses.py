"""Listen and announce addresses: which interfaces a peer binds, and which of its multiaddrs to show.

A home peer must be reachable from other machines, so the default is every interface (IPv4, plus
IPv6 where the host has it). What it prints for others to join with is ranked: public addresses
first, then private (LAN) ones, and loopback only when there is nothing else, because a loopback
address given to another machine can never work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket

from peerd.config import ALL_INTERFACES

__all__ = ["listen_maddrs", "peer_id_of", "probe_tcp", "rank_maddrs", "tcp_connect"]


def peer_id_of(maddr: str) -> str | None:
    """The peer id a ``.../p2p/<id>`` multiaddr ends with (None for a circuit through a relay, or none)."""
    parts = maddr.rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "p2p" and "p2p-circuit" not in parts else None


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


def listen_maddrs(host: str, port: int) -> list[str]:
    """libp2p listen multiaddrs for ``host``: ``0.0.0.0`` means every interface, IPv6 included."""
    if host == ALL_INTERFACES:
        maddrs = [f"/ip4/0.0.0.0/tcp/{port}"]
        if _has_ipv6():
            # a fixed port is taken on both families; port 0 lets each pick its own
            maddrs.append(f"/ip6/::/tcp/{port}")
        return maddrs
    family = "ip6" if ":" in host else "ip4"
    return [f"/{family}/{host}/tcp/{port}"]


def _rank(maddr: str) -> int:
    parts = maddr.split("/")
    if "p2p-circuit" in parts:
        return 2  # relayed: works from anywhere, but every byte goes through the relay
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return 1  # a DNS name: someone chose to publish it
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return 4
    if ip.is_loopback:
        return 4
    if ip.is_link_local:
        return 5  # needs a zone id to dial: useless to others
    return 3 if ip.is_private else 0


def rank_maddrs(maddrs: list[str]) -> list[str]:
    """Addresses others can use, best first: public, DNS, relayed, private; loopback only if alone."""
    usable = [m for m in maddrs if _rank(m) < 4]
    chosen = usable or [m for m in maddrs if _rank(m) == 4]
    return sorted(dict.fromkeys(chosen), key=_rank)


def _tcp_endpoint(maddr: str) -> tuple[str, int] | None:
    """The first (host, port) a multiaddr dials over TCP (a relay's, for a circuit address)."""
    parts = maddr.split("/")
    for i in range(1, len(parts) - 3):
        if parts[i] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[i + 2] == "tcp":
            try:
                return parts[i + 1], int(parts[i + 3])
            except ValueError:
                return None
    return None


async def tcp_connect(host: str, port: int, timeout_s: float) -> str:
    """Open and close one TCP connection: "ok", or why not ("no answer within 3 s", "Connection refused")."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:.0f} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return "ok"


async def probe_tcp(maddrs: list[str], timeout_s: float = 3.0) -> dict[str, str]:
    """Open (and close) one TCP connection to each address, all at once: {maddr: "ok" or why not}.

    libp2p reports an unreachable bootstrap node only after its own long timeouts; a plain TCP
    connect says within seconds whether anything listens there at all.
    """

    async def one(maddr: str) -> str:
        endpoint = _tcp_endpoint(maddr)
        if endpoint is None:
            return "not a TCP address"
        return await tcp_connect(*endpoint, timeout_s)

    results = await asyncio.gather(*(one(m) for m in maddrs))
    return dict(zip(maddrs, results, strict=True))
