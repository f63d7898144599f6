"""Dial-back on real p2pd peers over loopback: a listening peer is found dialable, a closed port is not,
and the record addresses a client dials from encode the way p2pd expects."""

from __future__ import annotations

import socket

import pytest

from peerd.daemon.reachability import dial_addresses, discover_reachability
from peerd.rpc.dialback import DialBackService, ask_dial_back, observed_host
from peerd.rpc.p2pd import daemon_multiaddr, start_p2p
from peerd.swarm.records import ServerRecord
from protocols import STREAM_DIALBACK, ErrorCode, ProtocolError


@pytest.fixture
async def pair():
    """A dial-back server (bootstrap-like) and an asker that joined through it, both on 127.0.0.1."""
    server = await start_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    await server.add_binary_stream_handler(STREAM_DIALBACK, DialBackService(dial_timeout_s=2.0).handle)
    joins = [str(m) for m in await server.get_visible_maddrs()]
    asker = await start_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=joins)
    try:
        yield server, asker, joins
    finally:
        await asker.shutdown()
        await server.shutdown()


def _port_of(p2p_maddrs: list[str]) -> int:
    parts = p2p_maddrs[0].split("/")
    return int(parts[parts.index("tcp") + 1])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_dial_back_finds_a_listening_peer_dialable_and_a_closed_port_not(pair) -> None:
    server, asker, _ = pair
    port = _port_of([str(m) for m in await asker.get_visible_maddrs()])
    result = await ask_dial_back(asker, str(server.peer_id), port)
    assert result.reachable and result.observed == f"127.0.0.1:{port}"
    closed = await ask_dial_back(asker, str(server.peer_id), _closed_port())
    assert not closed.reachable and closed.observed.startswith("127.0.0.1:")


async def test_auto_reachability_on_loopback_is_direct_with_own_addresses(pair) -> None:
    _, asker, joins = pair
    reach = await discover_reachability(asker, joins, "auto")
    assert reach.reach == "direct" and reach.relays == () and "dialled back at 127.0.0.1:" in reach.detail
    addrs = await dial_addresses(asker, reach)
    assert addrs and all(a.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/" not in a for a in addrs)
    forced = await discover_reachability(asker, joins, "relayed")
    assert forced.reach == "relayed" and forced.relays == tuple(joins)
    assert await dial_addresses(asker, forced, forced.relays) == tuple(f"{j}/p2p-circuit" for j in joins)
    assert await dial_addresses(asker, forced) == ()  # no relay holds a reservation: no way in
    assert (await discover_reachability(asker, [], "auto")).reach == "unknown"  # nobody to ask


async def test_a_relayed_address_is_encoded_for_p2pd_and_records_carry_it() -> None:
    relay = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    raw = daemon_multiaddr(f"/ip4/10.200.0.2/tcp/4001/p2p/{relay}/p2p-circuit").to_bytes()
    # ip4 10.200.0.2, tcp 4001, then /p2p/ (code 421) with the raw 34-byte multihash, then /p2p-circuit (290)
    assert raw.startswith(bytes.fromhex("040ac80002060fa1a50322"))
    assert raw.endswith(bytes.fromhex("a202")) and len(raw) == 5 + 3 + 3 + 34 + 2
    assert daemon_multiaddr("/ip4/1.2.3.4/tcp/5").to_bytes() == bytes.fromhex("0401020304060005")
    assert observed_host("/ip4/10.0.0.1/tcp/5") == "10.0.0.1"
    assert observed_host(f"/ip4/10.0.0.1/tcp/5/p2p/{relay}/p2p-circuit") is None


def test_record_addresses_round_trip_and_bad_ones_are_refused() -> None:
    from tests.helpers.fake_swarm import record

    base = record("a", 0, 4)
    wire = {**base.to_wire(), "addrs": ["/ip4/10.200.0.2/tcp/1/p2p/QmR/p2p-circuit"], "reach": "relayed"}
    parsed = ServerRecord.from_wire(wire)
    assert parsed.addrs == ("/ip4/10.200.0.2/tcp/1/p2p/QmR/p2p-circuit",) and parsed.reach == "relayed"
    assert ServerRecord.from_wire(base.to_wire()).reach == "unknown"
    old = {k: v for k, v in base.to_wire().items() if k not in ("addrs", "reach")}
    assert ServerRecord.from_wire(old).addrs == ()  # records of older peers still parse
    for bad in ({"addrs": ["x" * 300]}, {"addrs": ["/a"] * 9}, {"addrs": "nope"}, {"reach": "teleport"}):
        with pytest.raises(ValueError):
            ServerRecord.from_wire({**base.to_wire(), **bad})


async def test_one_asker_gets_one_dial_at_a_time(pair) -> None:
    """A second request of the same peer while its first is being dialled is refused (OVERLOADED,
    retryable), so one peer cannot make this one open many connections at once."""
    server, asker, _ = pair
    service = DialBackService(dial_timeout_s=1.5)
    await server.remove_binary_stream_handler(STREAM_DIALBACK)
    await server.add_binary_stream_handler(STREAM_DIALBACK, service.handle)
    service._asking.add(str(asker.peer_id))  # as if its first request were still being dialled
    with pytest.raises(ProtocolError) as info:
        await ask_dial_back(asker, str(server.peer_id), 1)
    assert info.value.code is ErrorCode.OVERLOADED
    service._asking.clear()
    assert not (await ask_dial_back(asker, str(server.peer_id), _closed_port())).reachable
