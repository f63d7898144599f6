"""peerd's relay (peerd/relay/1, peerd/relayed/1) on real p2pd peers over loopback.

A relay R, a target T holding a reservation on R, and a client C. On loopback T could be dialled
directly; these tests take the relayed path on purpose and check what it must do: carry far more
than libp2p's 128 KiB circuit budget both ways, name the real caller to T's handler, refuse what
it must (no reservation, a protocol it does not relay, limits), close idle and over-limit streams,
and keep serving others afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hivemind.p2p import P2P, PeerID

from peerd.daemon.reachability import Reachability, dial_addresses
from peerd.daemon.relaying import Relaying, serve_as_relay
from peerd.rpc.p2pd import daemon_multiaddr, start_p2p
from peerd.rpc.relay import RelayLimits, RelayService
from peerd.rpc.relayed import RelayedStreams, RelayReservations, open_via_relay, relay_of
from peerd.rpc.transport import PeerClient
from protocols import (
    STREAM_DIALBACK,
    STREAM_INFO,
    STREAM_RELAYED,
    ErrorCode,
    ProtocolError,
    RelayedStream,
    decode_message,
    encode_frame,
    raise_if_error,
    read_frame,
)

LIMITS = RelayLimits(max_streams_per_origin=2, data_limit_bytes=4 << 20, idle_timeout_s=1.0)


@dataclass
class Relayed:
    relay: P2P
    target: P2P
    client: P2P
    service: RelayService
    reservations: RelayReservations
    relay_maddr: str
    callers: list[str] = field(default_factory=list)  # who T's handler was told called


async def _echo(record: list[str], caller: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Length-prefixed echo; records the caller's peer id."""
    record.append(str(caller.peer_id))
    try:
        while True:
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            writer.write(struct.pack(">I", size) + await reader.readexactly(size))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def relayed() -> AsyncIterator[Relayed]:
    relay = await start_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    service = await serve_as_relay(relay, LIMITS)
    relay_maddr = next(str(m) for m in await relay.get_visible_maddrs())
    # as on a NATed peer: libp2p DHT in client mode, so the client does not connect to it on its own
    target = await start_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[relay_maddr], relays=[relay_maddr])
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[relay_maddr], dht_mode="client")
    reservations = RelayReservations(target, [relay_maddr])
    state = Relayed(relay, target, client, service, reservations, relay_maddr)

    async def echo(caller: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _echo(state.callers, caller, reader, writer)

    relayed_streams = RelayedStreams(reservations.relay_ids, {STREAM_INFO: echo})
    await target.add_binary_stream_handler(STREAM_RELAYED, relayed_streams.handle)
    keeper = asyncio.create_task(reservations.run())
    try:
        await asyncio.wait_for(reservations.reserved.wait(), 10.0)
        yield state
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        for p2p in (client, target, relay):
            await p2p.shutdown()


async def _echo_through(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> bytes:
    payload = bytes(range(256)) * (size // 256)
    writer.write(struct.pack(">I", len(payload)) + payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(4 + len(payload)), 20.0)
    assert got[4:] == payload
    return got


async def test_relay_carries_megabytes_both_ways_and_names_the_real_caller(relayed: Relayed) -> None:
    assert str(relayed.target.peer_id) in relayed.service.reservations
    reader, writer = await open_via_relay(
        relayed.client, str(relayed.relay.peer_id), str(relayed.target.peer_id), STREAM_INFO
    )
    for size in (1024, 64 << 10, 256 << 10, 1 << 20, 2 << 20):  # ~3.3 MiB each way on one stream
        await _echo_through(reader, writer, size)
    writer.close()
    assert relayed.callers == [str(relayed.client.peer_id)]  # the client, not the relay
    await _until(lambda: relayed.service.open_streams == 0)
    assert relayed.service.relayed_bytes > 2 * (3 << 20)


async def test_peer_client_goes_through_the_relay_its_record_names_unless_it_has_a_direct_connection(
    relayed: Relayed,
) -> None:
    target_id = str(relayed.target.peer_id)
    peers = PeerClient(relayed.client, "tiny", timeout_s=10.0)
    circuit = f"{relayed.relay_maddr}/p2p-circuit"
    assert relay_of(circuit) == (str(relayed.relay.peer_id), relayed.relay_maddr)
    peers.learn_addresses(target_id, [circuit])
    async with peers._stream(target_id, "info") as (reader, writer):
        await _echo_through(reader, writer, 300 << 10)
    assert peers.paths[target_id] == f"relay {relayed.relay.peer_id}"

    # a direct connection (as hole punching would make) is preferred to the relay
    direct_callers: list[str] = []

    async def direct_echo(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _echo(direct_callers, info, reader, writer)

    await relayed.target.add_binary_stream_handler(STREAM_INFO, direct_echo)

    async def connections() -> list[str]:
        return [
            str(a) for i in await relayed.client.list_peers() if i.peer_id == relayed.target.peer_id for a in i.addrs
        ]

    async def until_connections(check: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not check(await connections()):
            assert time.monotonic() < deadline, f"no {what} connection listed: {await connections()}"
            await asyncio.sleep(0.05)

    # the client also dialled the target's libp2p circuit (no data on it), so that p2pd may punch a hole
    await until_connections(lambda conns: any("p2p-circuit" in c for c in conns), "circuit")
    # replace it with a direct connection, as a punched hole would (connect() is a no-op while any
    # connection exists, so drop the circuit first)
    await relayed.client._client.disconnect(relayed.target.peer_id)
    maddrs = [daemon_multiaddr(str(m)) for m in await relayed.target.get_visible_maddrs()]
    await relayed.client._client.connect(relayed.target.peer_id, maddrs)
    await until_connections(lambda conns: any("p2p-circuit" not in c for c in conns), "direct")
    async with peers._stream(target_id, "info") as (reader, writer):
        await _echo_through(reader, writer, 1024)
    assert peers.paths[target_id] == "direct" and direct_callers == [str(relayed.client.peer_id)]


async def _first_answer(relayed: Relayed, target: str, stream: str) -> None:
    reader, writer = await open_via_relay(relayed.client, str(relayed.relay.peer_id), target, stream)
    try:
        body = await asyncio.wait_for(read_frame(reader, 4096), 10.0)
        raise_if_error(decode_message(body, 4096))
    finally:
        writer.close()


async def test_relay_refuses_unknown_targets_and_protocols_it_does_not_relay(relayed: Relayed) -> None:
    with pytest.raises(ProtocolError) as no_reservation:
        await _first_answer(relayed, str(relayed.client.peer_id), STREAM_INFO)
    assert no_reservation.value.code is ErrorCode.NOT_REACHABLE and no_reservation.value.retryable
    with pytest.raises(ProtocolError) as not_relayed:
        await _first_answer(relayed, str(relayed.target.peer_id), STREAM_DIALBACK)
    assert not_relayed.value.code is ErrorCode.NOT_ALLOWED
    assert relayed.callers == []


async def test_relay_limits_streams_per_client_and_keeps_serving(relayed: Relayed) -> None:
    relay, target = str(relayed.relay.peer_id), str(relayed.target.peer_id)
    held = [await open_via_relay(relayed.client, relay, target, STREAM_INFO) for _ in range(2)]
    for reader, writer in held:
        await _echo_through(reader, writer, 1024)  # both are really open
    with pytest.raises(ProtocolError) as over:
        await _first_answer(relayed, target, STREAM_INFO)
    assert over.value.code is ErrorCode.OVERLOADED
    for _, writer in held:
        writer.close()
    await _until(lambda: relayed.service.open_streams == 0)
    reader, writer = await open_via_relay(relayed.client, relay, target, STREAM_INFO)
    await _echo_through(reader, writer, 1024)
    writer.close()


async def test_relay_closes_over_limit_and_idle_streams(relayed: Relayed) -> None:
    relay, target = str(relayed.relay.peer_id), str(relayed.target.peer_id)
    reader, writer = await open_via_relay(relayed.client, relay, target, STREAM_INFO)
    payload = b"x" * (LIMITS.data_limit_bytes + (1 << 20))  # over the 4 MiB per-direction limit
    writer.write(struct.pack(">I", len(payload)) + payload)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(reader.readexactly(4 + len(payload)), 20.0)
    writer.close()

    reader, writer = await open_via_relay(relayed.client, relay, target, STREAM_INFO)
    await _echo_through(reader, writer, 1024)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10.0) == b""  # idle for LIMITS.idle_timeout_s: closed
    assert time.monotonic() - started >= LIMITS.idle_timeout_s * 0.9
    writer.close()


async def test_relayed_peer_refuses_streams_from_peers_that_are_not_its_relays(relayed: Relayed) -> None:
    _, reader, writer = await relayed.client.call_binary_stream_handler(relayed.target.peer_id, STREAM_RELAYED)
    writer.write(encode_frame(RelayedStream(origin=str(PeerID(b"\x00" * 34)), stream=STREAM_INFO)))
    writer.write(struct.pack(">I", 4) + b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10.0) == b""
    writer.close()
    assert relayed.callers == []


async def test_reservation_ends_when_the_reserving_peer_goes_and_comes_back(relayed: Relayed) -> None:
    target = str(relayed.target.peer_id)
    assert relayed.reservations.active_maddrs() == [relayed.relay_maddr]
    await relayed.target._client.disconnect(relayed.relay.peer_id)  # the connection drops
    await _until(lambda: target not in relayed.service.reservations or relayed.reservations.active == {})
    # the keeper notices and reserves again (its first retry is after 1 s)
    await _until(lambda: target in relayed.service.reservations and relayed.reservations.reserved.is_set(), 15.0)


async def test_a_relayed_peer_no_relay_accepts_is_unreachable_until_one_does(relayed: Relayed) -> None:
    """The client's p2pd serves no relay protocol: a peer relying on it alone cannot be reached and
    gives no address (the daemon then announces itself offline); the fixture's target, with the
    real relay, has one."""
    client_maddr = next(str(m) for m in await relayed.client.get_visible_maddrs())
    reach = Reachability("relayed", (client_maddr,))
    p2p = await start_p2p(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[client_maddr], relays=[client_maddr])
    lonely = Relaying(p2p, reach, first_reservation_timeout_s=1.0)
    try:
        await lonely.start({})
        assert lonely.unreachable and lonely.active_relays() == ()
        assert await dial_addresses(p2p, reach, lonely.active_relays()) == ()
    finally:
        await lonely.close()
        await p2p.shutdown()
    assert relayed.reservations.active_maddrs() == [relayed.relay_maddr]
    served = Relaying(relayed.relay, Reachability("direct"))
    assert not served.unreachable and served.active_relays() == ()  # a dialable peer needs no relay
