"""Joining a swarm as a client: a client-mode P2P node and DHT node, with first-day errors that say what to check."""

from __future__ import annotations

from collections.abc import Sequence

from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from peerd.rpc.errors import SwarmConnectError
from peerd.swarm.addresses import probe_tcp
from peerd.swarm.dht import SwarmDHT

__all__ = ["join_swarm"]


async def join_swarm(
    initial_peers: Sequence[str], prefix: str, num_blocks: int, host_maddrs: Sequence[str] | None = None
) -> tuple[P2P, SwarmDHT]:
    """A client-mode P2P node and DHT node joined through ``initial_peers``; SwarmConnectError if not."""
    if not initial_peers:
        raise SwarmConnectError("no initial peers given: pass the multiaddr a peer printed at start-up")
    answers = await probe_tcp(list(initial_peers))
    if "ok" not in answers.values():
        tried = "; ".join(f"{maddr}: {why}" for maddr, why in answers.items())
        raise SwarmConnectError(
            f"no initial peer accepts connections ({tried}): check the address, and that the node "
            "you join through is running and reachable from here"
        )
    try:
        listen = {"host_maddrs": list(host_maddrs)} if host_maddrs else {}
        p2p = await P2P.create(initial_peers=list(initial_peers), dht_mode="client", **listen)
    except Exception as exc:
        raise SwarmConnectError(f"could not start p2pd or reach {list(initial_peers)}: {exc}") from exc
    try:
        dht = await SwarmDHT.create(
            p2p,
            private_key=RSAPrivateKey(),
            prefix=prefix,
            num_blocks=num_blocks,
            initial_peers=initial_peers,
            client_mode=True,
        )
    except Exception as exc:
        await p2p.shutdown()
        raise SwarmConnectError(f"could not join the DHT through {list(initial_peers)}: {exc}") from exc
    return p2p, dht
