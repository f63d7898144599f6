"""Swarm status as data (for `peerd status`, the health page and its JSON API) and as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peerd.swarm.dht import BlockView
from peerd.swarm.records import PeerState

if TYPE_CHECKING:
    from peerd.client.swarm import SwarmClient

__all__ = ["format_status", "gather_status", "status_from_views"]


def status_from_views(model_id: str, num_blocks: int, views: list[BlockView]) -> dict[str, Any]:
    """Peers (latest record each) and per-block coverage by online peers; gaps listed."""
    peers: dict[str, Any] = {}
    for view in views:
        for r in view.records:
            current = peers.get(r.peer_id)
            if current is None or r.announced_at > current["announced_at"]:
                peers[r.peer_id] = {
                    "peer_id": r.peer_id,
                    "name": r.public_name,
                    "state": r.state.value,
                    "start": r.start,
                    "end": r.end,
                    "decode_tokens_per_s": r.decode_tokens_per_s,
                    "prefill_tokens_per_s": r.prefill_tokens_per_s,
                    "device": r.device,
                    "dtype": r.dtype,
                    "cache_tokens_free": r.cache_tokens_free,
                    "version": r.package_version,
                    "rtts_ms": dict(r.next_rtts_ms),
                    "announced_at": r.announced_at,
                }
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
        "peers": sorted(peers.values(), key=lambda p: (p["start"], p["peer_id"])),
        "coverage": coverage,
        "gaps": gaps,
    }


async def gather_status(client: SwarmClient) -> dict[str, Any]:
    views = await client.dht.read_blocks(timeout_s=client.dht_timeout_s)
    return status_from_views(client.model_id, client.num_blocks, views)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def format_status(status: dict[str, Any]) -> str:
    peers = status["peers"]
    rows = [
        [
            p["name"] or "-",
            p["peer_id"][:16] + "...",
            p["state"],
            f"{p['start']}:{p['end']}",
            f"{p['decode_tokens_per_s']:.0f}",
            p["device"],
            p["dtype"],
            str(p["cache_tokens_free"]),
            p["version"],
        ]
        for p in peers
    ]
    text = [f"model {status['model_id']}: {len(peers)} peer(s), {status['num_blocks']} blocks", ""]
    text.append(
        _table(
            ["NAME", "PEER", "STATE", "BLOCKS", "TOK/S/BLOCK", "DEVICE", "DTYPE", "CACHE FREE", "VERSION"],
            rows,
        )
    )
    text += ["", "coverage (online peers per block; '.' = gap):"]
    text.append("  " + "".join(str(min(c["peers"], 9)) if c["peers"] else "." for c in status["coverage"]))
    groups: list[list[Any]] = []  # runs of consecutive blocks with the same peers and throughput
    for c in status["coverage"]:
        key = (c["peers"], round(c["decode_tokens_per_s"], 1))
        if groups and groups[-1][2] == key:
            groups[-1][1] = c["block"] + 1
        else:
            groups.append([c["block"], c["block"] + 1, key])
    rows = [[f"{a}:{b}", str(peers), f"{tps:.0f}", "GAP" if peers == 0 else ""] for a, b, (peers, tps) in groups]
    text += ["", _table(["BLOCKS", "PEERS", "TOTAL TOK/S", ""], rows)]
    if status["gaps"]:
        from peerd.client.errors import _ranges

        text.append(f"GAPS: block(s) {_ranges(status['gaps'])} have no online peer")
    else:
        text.append("every block is served")
    return "\n".join(text)
