"""The daemon's and the client's use of the DHT: announce our records, read who serves what.

We run ``hivemind.DHTNode`` inside our own event loop on the P2P instance the peer already owns
(one p2pd per peer), rather than ``hivemind.DHT`` which forks a process per node.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peerd.identity import peer_id_of_public_key, public_key_of_owner_marker
from peerd.swarm.records import ServerRecord, block_uid
from peerd.swarm.storage import LOOKUP_KEYS_PER_CALL, install_bounded_storage
from peerd.swarm.validation import RememberingValidator, make_validators, owner_subkey
from peerd.swarm.views import BlockView, records_of

__all__ = ["BlockView", "SwarmDHT", "records_of"]

_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")

logger = logging.getLogger(__name__)


class SwarmDHT:
    """A DHT node plus the record logic for one model in one swarm (see ``swarm/validation.py``)."""

    def __init__(self, node: DHTNode, private_key: RSAPrivateKey, prefix: str, num_blocks: int) -> None:
        self.node = node
        self.prefix = prefix
        self.num_blocks = num_blocks
        self._subkey = owner_subkey(private_key)

    @classmethod
    async def create(
        cls,
        p2p: P2P,
        *,
        private_key: RSAPrivateKey,
        prefix: str,
        num_blocks: int,
        initial_peers: Sequence[str] = (),
        client_mode: bool = False,
        bootstrap_timeout_s: float = 15.0,
    ) -> SwarmDHT:
        """Start a DHT node on ``p2p`` with the validators every node of this swarm must share."""
        validator = RememberingValidator(make_validators(private_key, [(prefix, num_blocks)]))
        node = await asyncio.wait_for(
            DHTNode.create(
                p2p=p2p,
                initial_peers=list(initial_peers),
                record_validator=validator,
                client_mode=client_mode,
                # a record read should reflect announcements that happened seconds ago
                cache_locally=False,
                cache_on_store=False,
                bootstrap_timeout=bootstrap_timeout_s,
                wait_timeout=3,
            ),
            timeout=bootstrap_timeout_s + 5,
        )
        if not client_mode:  # a client-mode node stores nothing for others
            await install_bounded_storage(node.protocol, p2p)
        return cls(node, private_key, prefix, num_blocks)

    async def announce(
        self,
        record: ServerRecord,
        *,
        expiration_s: float,
        timeout_s: float = 10.0,
        blocks: Sequence[int] | None = None,
    ) -> bool:
        """Store ``record`` under each block key it covers (or only ``blocks`` of them); True if all accepted."""
        now = get_dht_time()
        indices = range(record.start, record.end) if blocks is None else blocks
        keys = [block_uid(self.prefix, i) for i in indices]
        if not keys:
            return True
        value = record.to_wire()
        value["at"] = float(now)
        result = await asyncio.wait_for(
            self.node.store_many(
                keys=keys,
                values=[value] * len(keys),
                expiration_time=now + expiration_s,
                subkeys=[self._subkey] * len(keys),
            ),
            timeout=timeout_s,
        )
        return all(result.values())

    async def read_blocks(self, start: int = 0, end: int | None = None, *, timeout_s: float = 5.0) -> list[BlockView]:
        """Latest records for blocks [start, end); records that fail to parse are dropped.

        Keys are looked up a few at a time, concurrently; a group still unanswered after
        ``timeout_s`` leaves its blocks without records, and the groups that answered still count.
        """
        end = self.num_blocks if end is None else end
        keys = [block_uid(self.prefix, i) for i in range(start, end)]
        # a few keys per lookup: every node caps the bytes it keeps per key (storage.py), so no
        # reply can exceed hivemind's 4 MiB message limit whatever other identities store
        chunks = [keys[i : i + LOOKUP_KEYS_PER_CALL] for i in range(0, len(keys), LOOKUP_KEYS_PER_CALL)]
        lookups = [
            asyncio.ensure_future(self.node.get_many(chunk, sufficient_expiration_time=float("inf")))
            for chunk in chunks
        ]
        if not lookups:
            return []
        done, pending = await asyncio.wait(lookups, timeout=timeout_s)
        for lookup in pending:
            lookup.cancel()
        if pending:
            logger.warning(
                "DHT read of blocks %d:%d: %d of %d key groups unanswered after %.1fs",
                *(start, end, len(pending), len(lookups), timeout_s),
            )
        parts = [lookup.result() for lookup in lookups if lookup in done]  # a lookup's own error propagates
        found = {key: entry for part in parts for key, entry in part.items()}
        now = get_dht_time()
        views = []
        for index, key in zip(range(start, end), keys, strict=True):
            entry = found.get(key)
            records: list[ServerRecord] = []
            if entry is not None and isinstance(entry.value, dict):
                for sub in entry.value.values():
                    if sub.expiration_time < now:
                        continue
                    try:
                        records.append(ServerRecord.from_wire(sub.value))
                    except ValueError as exc:
                        logger.debug("dropping malformed record for block %d: %s", index, exc)
            views.append(BlockView(index, tuple(records)))
        return views

    async def store_owned(
        self, key: str, value: dict[str, Any], *, expiration_s: float, timeout_s: float = 5.0
    ) -> bool:
        """Store ``value`` under ``key`` in our own signed subkey (others' entries under it stay)."""
        stored = await asyncio.wait_for(
            self.node.store(key, value, get_dht_time() + expiration_s, subkey=self._subkey), timeout=timeout_s
        )
        return bool(stored)

    async def read_owned(self, key: str, *, timeout_s: float = 5.0) -> dict[str, Any]:
        """Live entries under ``key`` by the peer id that signed them (from the owner marker).

        The signature validator has checked that each entry was signed by the key in its subkey,
        so the peer id derived here is authenticated; unsigned or unparsable entries are dropped.
        A timed-out read returns what is known: nothing.
        """
        try:
            found = await asyncio.wait_for(self.node.get(key, latest=True), timeout=timeout_s)
        except TimeoutError:
            logger.warning("DHT read of %s timed out after %.1fs", key, timeout_s)
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        entries: dict[str, Any] = {}
        for subkey, sub in found.value.items():
            owner = _OWNER_RE.search(subkey) if isinstance(subkey, bytes) else None
            if owner is None or sub.expiration_time < now:
                continue
            try:
                entries[peer_id_of_public_key(public_key_of_owner_marker(owner.group(1)))] = sub.value
            except ValueError:
                continue
        return entries

    def routing_table_size(self) -> int:
        """How many DHT nodes this node knows (its Kademlia routing table)."""
        return len(self.node.protocol.routing_table.uid_to_peer_id)

    async def shutdown(self) -> None:
        await self.node.shutdown()
