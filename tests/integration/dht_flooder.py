"""A hostile DHT node in its own process: stores padded, validly signed records of many identities.

    python -m tests.integration.dht_flooder PREFIX NUM_BLOCKS IDENTITIES MADDR [MADDR ...]

Each identity (a fresh RSA key: the costly part, about 50 ms each) signs one record per block,
state "offline" (so no client would route to it), with every field as large as the validators
allow, and the records are sent straight to every node named by a MADDR, many per request, from
this one connection. Prints one JSON line: {"accepted": n, "refused": n, "failed": n}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from peerd.identity import peer_id_of_public_key
from peerd.swarm.records import block_uid
from peerd.swarm.validation import owner_subkey

BATCH = 200  # records per store request: about 1.4 MB, under the 4 MiB message limit


def _cheap_key() -> RSAPrivateKey:
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key


def _record(peer_id: str, block: int, now: float) -> dict[str, object]:
    return {
        "v": 1,
        "peer_id": peer_id,
        "state": "offline",
        "start": block,
        "end": block + 1,
        "decode_tps": 1e9,
        "prefill_tps": 1e9,
        "device": "d" * 256,
        "mem_total": 1,
        "mem_free": 1,
        "dtype": "float32",
        "cache_free": 0,
        "proto": [1, 0],
        "version": "v" * 256,
        "name": "n" * 64,
        "rtts": {f"{i:052d}": 1.0 for i in range(64)},
        "at": now,
        "addrs": ["/" + "a" * 255] * 8,
        "reach": "unknown",
        "uplink": 0.0,
        "pad": "p" * 400,
    }


async def main(prefix: str, num_blocks: int, identities: int, maddrs: list[str]) -> None:
    p2p = await P2P.create(initial_peers=maddrs)
    node = await DHTNode.create(p2p=p2p, initial_peers=maddrs, client_mode=True, record_validator=None)
    victims = [PeerID.from_base58(m.rsplit("/p2p/", 1)[1]) for m in maddrs]
    now = get_dht_time()
    items: list[tuple[DHTID, bytes, bytes]] = []
    for _ in range(identities):
        key = _cheap_key()
        subkey, peer_id = owner_subkey(key), peer_id_of_public_key(key.get_public_key())
        signer = RSASignatureValidator(key)
        for block in range(num_blocks):
            key_id = DHTID.generate(source=block_uid(prefix, block))
            value = DHTProtocol.serializer.dumps(_record(peer_id, block, now))
            tag = DHTProtocol.serializer.dumps(subkey)  # what the receiver checks the signature over
            signed = signer.sign_value(DHTRecord(key_id.to_bytes(), tag, value, now + 600))
            items.append((key_id, subkey, signed))
    counts = {"accepted": 0, "refused": 0, "failed": 0}
    for victim in victims:
        for i in range(0, len(items), BATCH):
            batch = items[i : i + BATCH]
            ok = await node.protocol.call_store(
                victim, [k for k, _, _ in batch], [v for _, _, v in batch], now + 600, [s for _, s, _ in batch]
            )
            if ok is None:
                counts["failed"] += len(batch)
            else:
                counts["accepted"] += sum(ok)
                counts["refused"] += len(ok) - sum(ok)
    print(json.dumps(counts), flush=True)
    await node.shutdown()
    await p2p.shutdown()


if __name__ == "__main__":
    prefix, num_blocks, identities, *maddrs = sys.argv[1:]
    asyncio.run(main(prefix, int(num_blocks), int(identities), maddrs))
