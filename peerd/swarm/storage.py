"""What a DHT node keeps for others: bounded, and records of peers that proved they are alive first.

hivemind stores whatever a valid request sends, without limit, and evicts nothing before expiry. A
flood of valid-looking records under fresh identities (identities are free) then grows the node's
memory, makes every lookup reply exceed the 4 MiB unary message limit, and can crowd out honest
records. :class:`BoundedStorage` replaces the node's storage and bounds it:

* per key: at most ``per_key_entries`` subkeys and ``per_key_bytes`` bytes, so that a lookup of
  ``LOOKUP_KEYS_PER_CALL`` keys always fits in one reply (see ``dht.py``);
* per identity (owner subkey): at most ``per_owner_entries`` entries over all keys;
* in total: ``total_bytes`` and ``total_entries`` (value and subkey bytes; Python's own overhead
  per entry is bounded by the entry count, docs/security.md states the measured memory);
* **proof of life**: an entry delivered by its owner itself (the authenticated libp2p sender of the
  store is the peer id the owner marker names) is *proven*. When full, a proven entry evicts the
  newest unproven one; an unproven entry is refused, never evicts anything, and never displaces a
  proven one. An honest peer stores its own records on the nodes responsible for its keys every
  announce period, so its records are proven there; a flood from one connection signing for
  10,000 identities is not;
* **replay**: an entry replaces an older one for the same key and subkey only if its announce time
  (``at``) is strictly newer (a replayed capture never rolls a peer's record back, and never
  shortens the life of the newer one, which hivemind's own storage does by re-arming the older
  expiry).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.p2p import P2P, PeerID

from peerd.identity import peer_id_of_public_key, public_key_of_owner_marker

__all__ = ["LOOKUP_KEYS_PER_CALL", "BoundedStorage", "StorageLimits", "install_bounded_storage"]

# keys per DHT lookup: LOOKUP_KEYS_PER_CALL x per_key_bytes stays under hivemind's 4 MiB message
LOOKUP_KEYS_PER_CALL = 3
_RECOUNT_EVERY_S = 1.0
# the authenticated sender of the store request being handled (set around hivemind's rpc_store)
_SENDER: contextvars.ContextVar[PeerID | None] = contextvars.ContextVar("dht_store_sender", default=None)


@dataclass(frozen=True)
class StorageLimits:
    per_key_entries: int = 64
    per_key_bytes: int = 1 << 20
    per_owner_entries: int = 512
    total_entries: int = 16_384
    total_bytes: int = 16 << 20


CACHE_LIMITS = StorageLimits(per_key_entries=64, per_key_bytes=1 << 20, total_entries=2048, total_bytes=2 << 20)


@functools.lru_cache(maxsize=4096)
def _owner_of(subkey: bytes) -> str | None:
    """Peer id named by an ``[owner:KEY]`` subkey (the signature validator checked the signature)."""
    start, end = subkey.find(b"[owner:"), subkey.rfind(b"]")
    if start != 0 or end != len(subkey) - 1:
        return None
    try:
        return peer_id_of_public_key(public_key_of_owner_marker(subkey[7:-1]))
    except Exception:  # not a key: the entry simply cannot be proven
        return None


def _announced_at(value: bytes) -> float | None:
    """The record's ``at`` (msgpack map first, hivemind's signature appended after it)."""
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(value) + 1)
        unpacker.feed(value)
        item = next(unpacker)
    except Exception:
        return None
    at = item.get("at") if isinstance(item, dict) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def _is_newer(value: bytes, expiration: float, old_value: bytes, old_expiration: float) -> bool:
    at, old_at = _announced_at(value), _announced_at(old_value)
    if at is not None and old_at is not None:
        return at > old_at
    return expiration > old_expiration


class BoundedStorage(DHTLocalStorage):  # type: ignore[misc]
    """hivemind's local storage with the caps and the eviction order of the module doc."""

    def __init__(self, limits: StorageLimits = StorageLimits()) -> None:
        super().__init__()
        self.limits = limits
        self._bytes = 0  # an over-estimate between recounts (expired entries still counted)
        self._entries = 0
        self._owners: Counter[bytes] = Counter()
        self._proven: set[tuple[DHTID, bytes]] = set()
        self._arrival: dict[tuple[DHTID, bytes], int] = {}  # unproven entries, by arrival order
        self._seq = itertools.count()
        self._recounted_at = 0.0

    @property
    def used_bytes(self) -> int:
        self._recount(force=True)
        return self._bytes

    def store(self, key: DHTID, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        if subkey is not None:
            return self.store_subkey(key, subkey, value, expiration_time)
        if not isinstance(value, bytes) or len(value) > self.limits.per_key_bytes:
            return False
        if key not in self.data and not self._room(len(value), proven=False, key=None):
            return False
        stored = bool(super().store(key, value, expiration_time))
        if stored:
            self._bytes, self._entries = self._bytes + len(value), self._entries + 1
        return stored

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        if not isinstance(subkey, bytes) or not isinstance(value, bytes):
            return False
        size = len(subkey) + len(value)
        sender = _SENDER.get()
        proven = sender is not None and _owner_of(subkey) == sender.to_base58()
        current = self.get(key)
        table = current.value if current is not None else None
        if isinstance(table, DictionaryDHTValue):
            old = table.get(subkey)
            if old is not None:  # a new announcement of the same owner for the same key
                if not _is_newer(value, expiration_time, old.value, old.expiration_time):
                    return False
                del table[subkey]
                self._bytes -= len(subkey) + len(old.value)
                self._entries -= 1
                self._owners[subkey] -= 1
            elif not self._key_room(key, table, size, proven):
                return False
        if size > self.limits.per_key_bytes or self._owners[subkey] >= self.limits.per_owner_entries:
            return False
        if not self._room(size, proven, key):
            return False
        if not super().store_subkey(key, subkey, value, expiration_time):
            return False
        self._bytes, self._entries = self._bytes + size, self._entries + 1
        self._owners[subkey] += 1
        if proven:
            self._proven.add((key, subkey))
            self._arrival.pop((key, subkey), None)
        elif (key, subkey) not in self._proven:
            self._arrival[(key, subkey)] = next(self._seq)
        return True

    def _key_room(self, key: DHTID, table: DictionaryDHTValue, size: int, proven: bool) -> bool:
        """Make room in one key's table for ``size`` more bytes (only a proven entry may evict)."""
        if not proven and len(table) >= self.limits.per_key_entries:
            return False  # the common case under a flood, decided without walking the table
        while True:
            items = list(table.items())
            used = sum(len(s) + len(v.value) for s, v in items)
            if len(items) < self.limits.per_key_entries and used + size <= self.limits.per_key_bytes:
                return True
            unproven = [s for s, _ in items if (key, s) not in self._proven]
            if not proven or not unproven:
                return False
            self._evict(key, max(unproven, key=lambda s: self._arrival.get((key, s), -1)))

    def _room(self, size: int, proven: bool, key: DHTID | None) -> bool:
        """Make room in the whole storage (only a proven entry may evict: the newest unproven first)."""
        limits = self.limits
        if self._entries + 1 <= limits.total_entries and self._bytes + size <= limits.total_bytes:
            return True
        self._recount()
        while self._entries + 1 > limits.total_entries or self._bytes + size > limits.total_bytes:
            if not proven or not self._arrival:
                return False
            victim = max(self._arrival, key=self._arrival.__getitem__)
            self._evict(*victim)
        return True

    def _evict(self, key: DHTID, subkey: bytes) -> None:
        self._arrival.pop((key, subkey), None)
        current = self.get(key)
        if current is None or not isinstance(current.value, DictionaryDHTValue):
            return
        old = current.value.get(subkey)
        if old is None:
            return
        del current.value[subkey]
        self._bytes -= len(subkey) + len(old.value)
        self._entries -= 1
        self._owners[subkey] -= 1
        if not current.value:
            del self[key]

    def _recount(self, force: bool = False) -> None:
        """Drop expired entries from the counts (at most once a second: it walks the whole storage)."""
        now = time.monotonic()
        if not force and now - self._recounted_at < _RECOUNT_EVERY_S:
            return
        self._recounted_at = now
        total, entries, owners, alive = 0, 0, Counter[bytes](), set()
        for key, item in list(self.items()):
            if isinstance(item.value, DictionaryDHTValue):
                for subkey, sub in item.value.items():
                    total, entries = total + len(subkey) + len(sub.value), entries + 1
                    owners[subkey] += 1
                    alive.add((key, subkey))
            else:
                total, entries = total + len(item.value), entries + 1
        self._bytes, self._entries, self._owners = total, entries, owners
        self._proven &= alive
        self._arrival = {k: v for k, v in self._arrival.items() if k in alive}


async def install_bounded_storage(protocol: DHTProtocol, p2p: P2P, limits: StorageLimits = StorageLimits()) -> None:
    """Give ``protocol`` bounded storage and cache, and tell them who sends each store request.

    hivemind registered ``rpc_store`` with p2pd already; the Python-side handler is swapped for one
    that records the authenticated sender in a context variable around the original (its loop over
    the request runs without awaiting, so the variable holds for exactly that request).
    """
    protocol.storage = BoundedStorage(limits)
    protocol.cache = BoundedStorage(CACHE_LIMITS)  # remote stores may ask for ``in_cache``
    handlers: dict[str, Callable[[bytes, PeerID], Awaitable[bytes]]] = p2p._client.control.unary_handlers
    names = [name for name in handlers if name.endswith("DHTProtocol.rpc_store")]
    for name in names:
        original = handlers[name]

        async def with_sender(
            request: bytes, remote_id: PeerID, original: Callable[[bytes, PeerID], Awaitable[bytes]] = original
        ) -> bytes:
            token = _SENDER.set(remote_id)
            try:
                return await original(request, remote_id)
            finally:
                _SENDER.reset(token)

        handlers[name] = with_sender
    if not names:
        raise RuntimeError("hivemind's DHT store handler was not found: cannot bound DHT storage")
