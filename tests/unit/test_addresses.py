"""Which interfaces a peer listens on, and which of its addresses it shows others, best first."""

from __future__ import annotations

from peerd.config import ALL_INTERFACES, PeerConfig
from peerd.swarm.addresses import listen_maddrs, rank_maddrs

PID = "QmPeer"


def test_default_listen_host_is_every_interface() -> None:
    assert PeerConfig.__dataclass_fields__["host"].default == ALL_INTERFACES
    maddrs = listen_maddrs(ALL_INTERFACES, 0)
    assert maddrs[0] == "/ip4/0.0.0.0/tcp/0"
    assert set(maddrs) <= {"/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"}


def test_an_explicit_host_is_used_as_given() -> None:
    assert listen_maddrs("127.0.0.1", 31330) == ["/ip4/127.0.0.1/tcp/31330"]
    assert listen_maddrs("::1", 5) == ["/ip6/::1/tcp/5"]


def test_public_addresses_come_first_and_loopback_is_dropped_when_there_is_more() -> None:
    seen = [
        f"/ip4/127.0.0.1/tcp/1/p2p/{PID}",
        f"/ip6/::1/tcp/1/p2p/{PID}",
        f"/ip4/10.0.0.5/tcp/1/p2p/{PID}",
        f"/ip6/fe80::1/tcp/1/p2p/{PID}",
        f"/ip4/203.0.113.7/tcp/1/p2p/Qmrelay/p2p-circuit/p2p/{PID}",
        f"/ip4/8.8.4.4/tcp/1/p2p/{PID}",
        f"/ip4/8.8.4.4/tcp/1/p2p/{PID}",
    ]
    assert rank_maddrs(seen) == [
        f"/ip4/8.8.4.4/tcp/1/p2p/{PID}",  # public (and only once)
        f"/ip4/203.0.113.7/tcp/1/p2p/Qmrelay/p2p-circuit/p2p/{PID}",  # relayed
        f"/ip4/10.0.0.5/tcp/1/p2p/{PID}",  # LAN
    ]


def test_loopback_is_shown_when_it_is_all_there_is() -> None:
    only = [f"/ip4/127.0.0.1/tcp/1/p2p/{PID}", f"/ip6/::1/tcp/1/p2p/{PID}"]
    assert rank_maddrs(only) == only
