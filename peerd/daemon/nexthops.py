"""What a peer measures about its links to other peers, and publishes for clients' routing."""

from __future__ import annotations

import logging
import time

from hivemind.p2p import P2P

from peerd import __version__
from peerd.rpc.rtt import RTT_TIMEOUT_S, RttProbe
from peerd.rpc.transport import PeerClient
from peerd.swarm.dht import SwarmDHT

__all__ = ["MAX_RTT_TARGETS", "UPLINK_PROBE_BYTES", "NextHops"]

MAX_RTT_TARGETS = 8  # next-hop peers whose RTT we measure and publish
UPLINK_PROBE_BYTES = 256 << 10  # one upload of this size per announce period times our uplink
UPLINK_TIMEOUT_S = 10.0  # ... and slower than UPLINK_PROBE_BYTES / this counts as that slow
UPLINK_EWMA = 0.5  # weight of the newest measurement

logger = logging.getLogger(__name__)


class NextHops:
    """This peer's links to the peers serving the block right after its span.

    Its RTT to each (ms) is published in its record: a client planning a route through us and then
    one of them adds that RTT, since it is what our hidden states would cross. So is our uplink
    (bytes/s), timed by one padded ``info`` request per period to one of them in turn (peers of our
    own first block when we serve the last one): a client sending large batches here weighs the
    time our answers take to come back.
    """

    def __init__(self, p2p: P2P, dht: SwarmDHT, model_id: str, num_blocks: int) -> None:
        self.dht = dht
        self.num_blocks = num_blocks
        name = f"peerd-peer/{__version__}"
        self.peers = PeerClient(p2p, model_id, timeout_s=RTT_TIMEOUT_S, client_name=name)
        self._uploads = PeerClient(p2p, model_id, timeout_s=UPLINK_TIMEOUT_S, client_name=name)
        self.rtt = RttProbe(self.peers.info)
        self.rtts_ms: dict[str, float] = {}
        self.uplink_bytes_per_s = 0.0  # 0: not measured yet
        self._round = 0

    async def aclose(self) -> None:
        await self.peers.aclose()
        await self._uploads.aclose()

    async def measure(self, own_id: str, span: tuple[int, int]) -> None:
        """Probe the peers serving the block after ``span`` (RTTs), then time one upload."""
        start, end = span
        block = end if end < self.num_blocks else start  # the last span: time uploads to replicas
        (view,) = await self.dht.read_blocks(block, block + 1, timeout_s=5.0)
        online = [r for r in view.online() if r.peer_id != own_id]
        for record in online:
            self.peers.learn_addresses(record.peer_id, record.addrs)  # next hops behind NAT: their relay
            self._uploads.learn_addresses(record.peer_id, record.addrs)
        targets = [r.peer_id for r in online][:MAX_RTT_TARGETS]
        rtts = await self.rtt.rtts_ms(targets)
        measured = {peer: ms for peer, ms in rtts.items() if ms is not None}
        self.rtts_ms = measured if end < self.num_blocks else {}
        if measured:
            await self._time_upload(sorted(measured), measured)

    async def _time_upload(self, targets: list[str], rtts_ms: dict[str, float]) -> None:
        target = targets[self._round % len(targets)]
        self._round += 1
        started = time.perf_counter()
        try:
            await self._uploads.info(target, UPLINK_PROBE_BYTES)
        except Exception as exc:  # timed out: that still bounds our uplink from above
            if time.perf_counter() - started < 0.9 * UPLINK_TIMEOUT_S:  # refused or gone, not slow
                logger.debug("uplink probe to %s failed: %s", target[:16], exc)
                return
        elapsed_s = time.perf_counter() - started
        # the padded request's round trip, minus a small one's: the upload itself
        upload_s = max(elapsed_s - rtts_ms[target] / 1e3, 1e-4)
        rate = UPLINK_PROBE_BYTES / upload_s
        previous = self.uplink_bytes_per_s
        self.uplink_bytes_per_s = rate if previous == 0 else (1 - UPLINK_EWMA) * previous + UPLINK_EWMA * rate
