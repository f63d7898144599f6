"""What a peer measures about the peers after it on a route, and publishes for clients' routing."""

from __future__ import annotations

from hivemind.p2p import P2P

from peerd import __version__
from peerd.rpc.rtt import RTT_TIMEOUT_S, RttProbe
from peerd.rpc.transport import PeerClient
from peerd.swarm.dht import SwarmDHT

__all__ = ["MAX_RTT_TARGETS", "NextHops"]

MAX_RTT_TARGETS = 8  # next-hop peers whose RTT we measure and publish


class NextHops:
    """This peer's links to the peers serving the block right after its span.

    Its RTT to each (ms) is published in its record: a client planning a route through us and then
    one of them adds that RTT, since it is what our hidden states would cross.
    """

    def __init__(self, p2p: P2P, dht: SwarmDHT, model_id: str, num_blocks: int) -> None:
        self.dht = dht
        self.num_blocks = num_blocks
        self.peers = PeerClient(p2p, model_id, timeout_s=RTT_TIMEOUT_S, client_name=f"peerd-peer/{__version__}")
        self.rtt = RttProbe(self.peers.info)
        self.rtts_ms: dict[str, float] = {}

    async def measure(self, own_id: str, next_block: int) -> None:
        """Probe the peers serving ``next_block`` (nothing past the model's last block)."""
        if next_block >= self.num_blocks:
            self.rtts_ms = {}
            return
        (view,) = await self.dht.read_blocks(next_block, next_block + 1, timeout_s=5.0)
        for record in view.online():
            self.peers.learn_addresses(record.peer_id, record.addrs)  # next hops behind NAT: their relay
        targets = [r.peer_id for r in view.online() if r.peer_id != own_id][:MAX_RTT_TARGETS]
        rtts = await self.rtt.rtts_ms(targets)
        self.rtts_ms = {peer: ms for peer, ms in rtts.items() if ms is not None}
