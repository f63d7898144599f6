"""`peerd status`: the peers of a swarm and the coverage of every block, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from peerd.cli.helpers import connect_client, empty_swarm_reason
from peerd.rpc.speedprobe import SpeedProbe, forward_one_token
from peerd.swarm.status import block_ranges, status_from_views

if TYPE_CHECKING:
    from peerd.client import SwarmClient

__all__ = ["cmd_status", "format_status", "gather_status"]


async def gather_status(client: SwarmClient, *, probe: bool = True) -> dict[str, Any]:
    """The swarm's status as the client's DHT view shows it now; ``probe``: also time one token
    through each online peer (``observed_tokens_per_s``, beside the claimed ``decode_tokens_per_s``)."""
    views = await client.dht.read_blocks(timeout_s=client.router.dht_timeout_s)
    status = status_from_views(client.model_id, client.num_blocks, views)
    if probe:
        online = {p["peer_id"]: (p["start"], p["end"]) for p in status["peers"] if p["state"] == "online"}
        observed = await SpeedProbe(forward_one_token(client.peers, client.config.hidden_size)).tokens_per_s(online)
        for p in status["peers"]:
            p["observed_tokens_per_s"] = observed.get(p["peer_id"])
    return status


def _speed(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _mbit(bytes_per_s: float) -> str:
    """An uplink as people quote it (Mbit/s); "-" until the peer has measured it."""
    return f"{bytes_per_s * 8 / 1e6:.0f} Mbit/s" if bytes_per_s > 0 else "-"


def format_status(status: dict[str, Any]) -> str:
    peers = status["peers"]
    rows = [
        [
            p["name"] or "-",
            p["peer_id"][:16] + "...",
            p["state"],
            f"{p['start']}:{p['end']}",
            f"{p['decode_tokens_per_s']:.0f}",
            _speed(p.get("observed_tokens_per_s")),
            p["device"],
            p["dtype"] if p.get("quant", "none") == "none" else f"{p['dtype']}/{p['quant']}",
            str(p["cache_tokens_free"]),
            p["version"],
            _mbit(p.get("uplink_bytes_per_s", 0.0)),
            p.get("reach", "unknown"),
        ]
        for p in peers
    ]
    text = [f"model {status['model_id']}: {len(peers)} peer(s), {status['num_blocks']} blocks", ""]
    text.append(
        _table(
            [
                "NAME",
                "PEER",
                "STATE",
                "BLOCKS",
                "CLAIMED TOK/S",
                "OBSERVED",
                "DEVICE",
                "DTYPE/QUANT",
                "CACHE FREE",
                "VERSION",
                "UPLINK",
                "REACH",
            ],
            rows,
        )
    )
    text.append(
        "CLAIMED: the peer's announced decode tokens/s per block; OBSERVED: one token through its blocks, "
        "timed from here (network included; '-' = not measured)"
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
        text.append(f"GAPS: block(s) {block_ranges(status['gaps'])} have no online peer")
    else:
        text.append("every block is served")
    return "\n".join(text)


async def cmd_status(args: argparse.Namespace) -> int:
    client = await connect_client(args)
    try:
        status = await gather_status(client, probe=args.probe)
        reason = None
        if not status["peers"]:  # nothing yet: give fresh records a moment, then say why
            reason = await empty_swarm_reason(client, args.swarm)
            status = await gather_status(client, probe=args.probe)
    finally:
        await client.close()
    if reason is not None:
        print(f"peerd status: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0 if not status["gaps"] else 3
