"""Swarm status as data: peers (latest record each) and per-block coverage, for `peerd status` and the health page."""

from __future__ import annotations

from typing import Any

from peerd.swarm.records import PeerState, latest_per_peer
from peerd.swarm.views import BlockView, records_of

__all__ = ["block_ranges", "status_from_views"]


def status_from_views(model_id: str, num_blocks: int, views: list[BlockView]) -> dict[str, Any]:
    """Peers (latest record each) and per-block coverage by online peers; gaps listed."""
    latest = latest_per_peer(records_of(views))
    peers = [r.to_status() for r in latest.values()]
    coverage = []
    for view in views:
        online = [r for r in view.records if r.state is PeerState.ONLINE]
        coverage.append(
            {
                "block": view.index,
                "peers": len(online),
                "decode_tokens_per_s": sum(r.decode_tokens_per_s for r in online),
            }
        )
    gaps = [c["block"] for c in coverage if c["peers"] == 0]
    return {
        "model_id": model_id,
        "num_blocks": num_blocks,
        "peers": sorted(peers, key=lambda p: (p["start"], p["peer_id"])),
        "coverage": coverage,
        "gaps": gaps,
    }


def block_ranges(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0:3, 5"`` (half-open ranges, as ``--blocks`` takes them)."""
    if not blocks:
        return "-"
    out = []
    first = prev = blocks[0]
    for b in blocks[1:]:
        if b == prev + 1:
            prev = b
            continue
        out.append(f"{first}" if first == prev else f"{first}:{prev + 1}")
        first = prev = b
    out.append(f"{first}" if first == prev else f"{first}:{prev + 1}")
    return ", ".join(out)
