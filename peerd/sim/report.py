"""A run's results on disk: ``summary.json`` and one PNG per question the simulator answers."""

from __future__ import annotations

import json
from pathlib import Path

from peerd.sim.engine import SimResult

__all__ = ["write_report"]

# (file, title, y label, series drawn) -- the bound is drawn with the throughput it caps
PLOTS = [
    (
        "throughput.png",
        "Swarm throughput vs the central bound",
        "decode-equivalent tokens/s",
        ("tokens_per_s", "bound_tokens_per_s"),
    ),
    ("coverage_gaps.png", "Blocks served by no online peer", "blocks", ("gap_blocks",)),
    ("requests.png", "Requests failed (cumulative) and stalled (now)", "requests", ("failed", "stalled")),
    ("cache_used.png", "KV cache slots held, share of online peers' slots", "share", ("cache_used",)),
    ("block_moves.png", "Block moves (cumulative)", "moves", ("moves",)),
    ("dht_messages.png", "DHT messages per online peer per minute", "messages", ("dht_msgs_per_peer_per_min",)),
]


def write_report(result: SimResult, out: Path, stalls_s: list[float]) -> list[Path]:
    """Write the summary and the plots under ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.json"]
    written[0].write_text(json.dumps(result.summary, indent=2, sort_keys=True) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise OSError("plots need matplotlib: pip install 'peerd[simulate]' (summary.json is written)") from exc
    minutes = [t / 60 for t in result.series["t_s"]]
    for name, title, ylabel, keys in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key in keys:
            ax.plot(minutes, result.series[key], label=key)
        ax.set(title=title, xlabel="simulated minutes", ylabel=ylabel)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(out / name)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(stalls_s or [0.0], bins=40)
    ax.set(title="Stall durations (a request waiting for a route)", xlabel="seconds", ylabel="stalls", yscale="log")
    fig.tight_layout()
    fig.savefig(out / "stalls.png", dpi=90)
    plt.close(fig)
    written.append(out / "stalls.png")
    return written
