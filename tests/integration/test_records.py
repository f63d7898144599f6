"""DHT records through the real DHT: forged and malformed records are rejected; stopped peers vanish."""

from __future__ import annotations

import asyncio
import time

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peerd.identity import peer_id_of_public_key
from peerd.swarm.records import PeerState, block_uid, swarm_prefix
from peerd.swarm.storage import LOOKUP_KEYS_PER_CALL
from peerd.swarm.validation import MAX_RECORD_TTL_S, MAX_VALIDITY_S, make_validators, owner_subkey

PREFIX = swarm_prefix("public", "tiny")


async def _attacker(initial_peers: tuple[str, ...]) -> tuple[P2P, DHTNode, RSAPrivateKey]:
    key = RSAPrivateKey()
    p2p = await P2P.create(initial_peers=list(initial_peers))
    node = await DHTNode.create(
        p2p=p2p,
        initial_peers=list(initial_peers),
        record_validator=CompositeValidator(make_validators(key, [(PREFIX, 6)])),
        cache_locally=False,
    )
    return p2p, node, key


async def _records_of_block(node: DHTNode, block: int) -> dict:
    found = await asyncio.wait_for(node.get(block_uid(PREFIX, block), latest=True), 10)
    return {} if found is None else dict(found.value)


async def test_forged_and_malformed_records_are_rejected(make_swarm) -> None:
    swarm = await make_swarm([(0, 3), (3, 6)])
    victim = swarm.peers[0]
    victim_subkey = owner_subkey(victim._private_key)
    p2p, node, key = await _attacker(swarm.initial_peers)
    try:
        genuine = victim.record().to_wire()
        expiration = get_dht_time() + 60

        # 1. a record under the victim's subkey, signed with another key: rejected by every node
        forged = dict(genuine, decode_tps=1e6, name="forged")
        assert not await node.store(block_uid(PREFIX, 0), forged, expiration, subkey=victim_subkey)

        # 2. the attacker's own subkey but claiming the victim's peer id: rejected (id != key hash)
        own = owner_subkey(key)
        assert not await node.store(block_uid(PREFIX, 0), forged, expiration, subkey=own)

        # 3. the attacker's own identity with malformed values: each rejected
        me = peer_id_of_public_key(key.get_public_key())
        base = dict(genuine, peer_id=me, name="attacker", at=get_dht_time())
        bad_values = [
            dict(base, decode_tps="fast"),  # wrong type
            dict(base, decode_tps=-1.0),  # negative throughput
            dict(base, prefill_tps=1e12),  # absurd throughput
            dict(base, start=0, end=100_001),  # range outside any model
            dict(base, start=3, end=6),  # key's block 0 not inside the claimed range
            dict(base, state="sleeping"),  # unknown state
            dict(base, cache_free=1.5),  # float where an int belongs
            dict(base, name="x" * 10_000),  # oversized
            "not a map",
        ]
        for value in bad_values:
            assert not await node.store(block_uid(PREFIX, 0), value, expiration, subkey=own), value

        # 4. a well-formed record set to live for a year: rejected (a dead peer would look alive, and a
        # captured record could be replayed for that long)
        year = get_dht_time() + 365 * 24 * 3600
        assert not await node.store(block_uid(PREFIX, 0), base, year, subkey=own)
        assert not await node.store(block_uid(PREFIX, 0), base, get_dht_time() + MAX_RECORD_TTL_S + 60, subkey=own)

        # 5. a well-formed record of the attacker's own is accepted (the validators are not just saying no)
        assert await node.store(block_uid(PREFIX, 0), base, expiration, subkey=own)

        records = await _records_of_block(swarm.peers[1].dht.node, 0)
        by_peer = {v.value["peer_id"]: v.value for v in records.values()}
        assert by_peer[victim.peer_id]["name"] == "peer0"  # the victim's record is untouched
        assert by_peer[me]["name"] == "attacker"

        # 6. replay protection: an older announcement never replaces a newer one, even with a later
        # expiry; a record valid for more than MAX_VALIDITY_S after its announce time, or announced in
        # the future, is refused
        now = get_dht_time()
        await node.store(block_uid(PREFIX, 0), dict(base, at=base["at"] - 10, name="old"), now + 120, subkey=own)
        stale = dict(base, at=now - MAX_VALIDITY_S, name="stale")
        assert not await node.store(block_uid(PREFIX, 0), stale, now + 60, subkey=own)
        assert not await node.store(block_uid(PREFIX, 0), dict(base, at=now + 3600), expiration, subkey=own)
        for peer in swarm.peers:  # what each honest node keeps itself (the attacker's own node took "old")
            item = peer.dht.node.protocol.storage.get(DHTID.generate(source=block_uid(PREFIX, 0)))
            kept = [
                DHTProtocol.serializer.loads(
                    peer.dht.node.protocol.record_validator.strip_value(DHTRecord(b"", s, v.value, 0))
                )
                for s, v in item.value.items()
                if s == own
            ]
            assert kept and kept[0]["name"] == "attacker"
    finally:
        await node.shutdown()
        await p2p.shutdown()


async def test_graceful_stop_marks_peer_offline_at_once(make_swarm) -> None:
    swarm = await make_swarm([(0, 6), (0, 6)])
    client = await swarm.client()
    try:
        leaving = swarm.peers[1]
        await leaving.shutdown()
        servers = await client.servers(refresh=True)
        assert leaving.peer_id not in servers  # online view drops it at once
        views = await client.dht.read_blocks()
        states = {r.peer_id: r.state for r in views[0].records}
        assert states[leaving.peer_id] is PeerState.OFFLINE
        assert states[swarm.peers[0].peer_id] is PeerState.ONLINE
    finally:
        await client.close()


async def test_records_of_a_silent_peer_expire(make_swarm) -> None:
    # announce period 1 s -> expiry 2 s; a peer that stops announcing without saying goodbye
    # (as if killed) disappears once its records expire
    swarm = await make_swarm([(0, 6)], announce_period_s=1.0)
    await swarm.add_peer("silent", (0, 6), announce_period_s=1.0)
    client = await swarm.client()
    try:
        silent = swarm.peers[1]
        # seen online first (on a busy machine a 2 s record can lapse before a read finds it: re-read)
        deadline = time.monotonic() + 15
        while silent.peer_id not in await client.servers(refresh=True):
            assert time.monotonic() < deadline, "the silent peer never showed up online"
            await asyncio.sleep(0.2)
        silent._stop.set()  # stop its announce loop; the process "dies" silently
        silent.state = PeerState.OFFLINE  # and its shutdown must not announce either
        deadline = time.monotonic() + 15
        while silent.peer_id in await client.servers(refresh=True):
            assert time.monotonic() < deadline, "record did not expire"
            await asyncio.sleep(0.5)
    finally:
        await client.close()


async def test_a_slow_key_group_leaves_only_its_own_blocks_unread(make_swarm) -> None:
    """Block keys are read a few at a time: one group that never answers must not empty the whole view."""
    swarm = await make_swarm([(0, 3), (3, 6)])
    client = await swarm.client()
    node = client.dht.node
    slow_key = block_uid(client.dht.prefix, 4)
    real_get_many = node.get_many

    async def get_many(keys, **kwargs):  # type: ignore[no-untyped-def]
        if slow_key in keys:
            await asyncio.sleep(60)  # the group holding block 4 never answers within the read
        return await real_get_many(keys, **kwargs)

    try:
        deadline = time.monotonic() + 15
        while len(await client.servers(refresh=True)) < 2:  # both peers announced
            assert time.monotonic() < deadline, "the peers never showed up"
            await asyncio.sleep(0.2)
        node.get_many = get_many  # type: ignore[method-assign]
        started = time.monotonic()
        views = await client.dht.read_blocks(timeout_s=2.0)
        assert time.monotonic() - started < 10
        first = 4 // LOOKUP_KEYS_PER_CALL * LOOKUP_KEYS_PER_CALL  # the slow group: blocks first.. with block 4
        slow = range(first, first + LOOKUP_KEYS_PER_CALL)
        expected = [set() if i in slow else {swarm.peers[i // 3].peer_id} for i in range(6)]
        assert [{r.peer_id for r in view.records} for view in views] == expected  # the groups that answered count
    finally:
        node.get_many = real_get_many  # type: ignore[method-assign]
        await client.close()
