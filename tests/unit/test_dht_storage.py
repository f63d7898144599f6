"""Bounded DHT storage (peerd/swarm/storage.py): caps, proof of life over floods, no replay rollback.

Pure: the storage is driven directly, the authenticated sender set as hivemind's store handler sets
it. The 10,000-identity flood runs here, where identities cost nothing; the real-process flood with
signed records is tests/integration/test_dht_flood.py.
"""

from __future__ import annotations

import gc
import tracemalloc

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peerd.identity import peer_id_of_public_key
from peerd.swarm import storage
from peerd.swarm.storage import BoundedStorage, StorageLimits
from peerd.swarm.validation import owner_subkey

KEYS = [DHTID.generate(source=f"block_{i}") for i in range(6)]


def _value(at: float, pad: int = 0) -> bytes:
    return msgpack.packb({"at": at, "pad": "x" * pad}) + b"[signature:abc]"


def _store(store: BoundedStorage, key: DHTID, subkey: bytes, value: bytes, sender: PeerID | None) -> bool:
    token = storage._SENDER.set(sender)
    try:
        return store.store_subkey(key, subkey, value, get_dht_time() + 60)
    finally:
        storage._SENDER.reset(token)


def _subkeys(store: BoundedStorage, key: DHTID) -> set[bytes]:
    item = store.get(key)
    assert item is None or isinstance(item.value, DictionaryDHTValue)
    return set() if item is None else {s for s, _ in item.value.items()}


def test_a_flood_of_10000_identities_cannot_evict_proven_records_and_memory_stays_bounded() -> None:
    limits = StorageLimits()
    store = BoundedStorage(limits)
    honest_key = RSAPrivateKey()
    honest = owner_subkey(honest_key)
    sender = PeerID.from_base58(peer_id_of_public_key(honest_key.get_public_key()))
    now = get_dht_time()
    for key in KEYS:  # the honest peer announced its records itself: proven
        assert _store(store, key, honest, _value(now), sender)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    accepted = 0
    for i in range(10_000):  # fake owner markers: the flood comes from one sender, never the owner
        subkey = b"[owner:attacker-%d]" % i
        accepted += sum(_store(store, key, subkey, _value(now, 6000), None) for key in KEYS)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert all(honest in _subkeys(store, key) for key in KEYS)
    assert accepted <= len(KEYS) * limits.per_key_entries
    assert all(len(_subkeys(store, key)) <= limits.per_key_entries for key in KEYS)
    assert store.used_bytes <= limits.total_bytes
    assert grown < limits.total_bytes + (16 << 20), f"storage grew by {grown / 2**20:.1f} MiB"


def test_a_proven_newcomer_evicts_unproven_entries_and_unproven_ones_evict_nothing() -> None:
    store = BoundedStorage(StorageLimits(per_key_entries=4))
    now = get_dht_time()
    for i in range(4):
        assert _store(store, KEYS[0], b"[owner:flood-%d]" % i, _value(now), None)
    assert not _store(store, KEYS[0], b"[owner:flood-late]", _value(now), None)
    key = RSAPrivateKey()
    subkey = owner_subkey(key)
    sender = PeerID.from_base58(peer_id_of_public_key(key.get_public_key()))
    assert _store(store, KEYS[0], subkey, _value(now), sender)
    held = _subkeys(store, KEYS[0])
    assert subkey in held and len(held) == 4 and b"[owner:flood-3]" not in held  # the newest went
    # the same record replayed by someone else is not proof: and never rolls the record back
    assert not _store(store, KEYS[0], subkey, _value(now - 10), None)
    assert not _store(store, KEYS[0], subkey, _value(now), None)
    assert _store(store, KEYS[0], subkey, _value(now + 1), None)


def test_caps_per_owner_and_in_total_bytes() -> None:
    store = BoundedStorage(StorageLimits(per_owner_entries=2, total_bytes=30_000))
    now = get_dht_time()
    assert _store(store, KEYS[0], b"[owner:a]", _value(now), None)
    assert _store(store, KEYS[1], b"[owner:a]", _value(now), None)
    assert not _store(store, KEYS[2], b"[owner:a]", _value(now), None)  # a third key for one owner
    stored = sum(_store(store, KEYS[3], b"[owner:b%d]" % i, _value(now, 5000), None) for i in range(10))
    assert 4 <= stored <= 5 and store.used_bytes <= 30_000
