"""Observed decode speed of other peers, for `peerd status` and the health page (docs/security.md).

A record's throughput is its owner's claim. What a viewer can trust is what it measures itself:
here, one stateless ``forward`` of a single token through all of a peer's blocks, timed from
request to answer (stream, network and queueing included, as a client's decode steps are), and
reported in the record's unit: tokens/s per block (blocks / seconds). Values are cached per peer for
:data:`SPEED_TTL_S`, and one call probes at most ``max_probes`` peers (anyone can put records in the
DHT), so showing the page or the status costs each peer one tiny forward a minute per viewer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import torch

from peerd.rpc.rtt import RttProbe
from peerd.rpc.transport import PeerClient

__all__ = ["MAX_SPEED_PROBES", "SPEED_TIMEOUT_S", "SPEED_TTL_S", "SpeedProbe", "forward_one_token"]

SPEED_TTL_S = 60.0  # re-measure a peer after this long
SPEED_TIMEOUT_S = 5.0  # a peer slower than this for one token shows as not measured
MAX_SPEED_PROBES = 16  # forwards sent per call at most

Forward = Callable[[str, int, int], Awaitable[object]]  # (peer id, start, end): one timed forward


def forward_one_token(peers: PeerClient, hidden_size: int) -> Forward:
    """A :class:`SpeedProbe` forward: one token of small fixed hidden states through [start, end)."""
    hidden = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1  # [1, 1, h]

    async def forward(peer_id: str, start: int, end: int) -> object:
        return await peers.forward(peer_id, hidden, start, end)

    return forward


class SpeedProbe:
    """Per peer, the per-block decode tokens/s this viewer observed (None: not measured, or failed)."""

    def __init__(
        self,
        forward: Forward,
        *,
        ttl_s: float = SPEED_TTL_S,
        timeout_s: float = SPEED_TIMEOUT_S,
        max_probes: int = MAX_SPEED_PROBES,
    ) -> None:
        self._forward = forward
        self._spans: dict[str, tuple[int, int]] = {}
        # the same cache, TTL and probe cap as RTTs; a "round trip" here is one forward
        self._timer = RttProbe(self._one, ttl_s=ttl_s, timeout_s=timeout_s, max_probes=max_probes)

    async def _one(self, peer_id: str) -> object:
        start, end = self._spans[peer_id]
        return await self._forward(peer_id, start, end)

    async def tokens_per_s(self, spans: Mapping[str, tuple[int, int]]) -> dict[str, float | None]:
        """Observed speed of each peer of ``spans`` (peer id -> the blocks [start, end) it serves)."""
        self._spans = dict(spans)
        elapsed_ms = await self._timer.rtts_ms(spans)
        return {
            peer_id: (end - start) * 1e3 / ms if (ms := elapsed_ms.get(peer_id)) else None
            for peer_id, (start, end) in spans.items()
        }
