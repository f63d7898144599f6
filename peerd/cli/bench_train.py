"""Training through a swarm, measured: GPipe micro-batches versus the same batch stage by stage.

One forward+backward of a fixed batch of hidden states through every block, three ways, interleaved
round by round so that a noisy machine hurts all of them alike:

* ``sequential`` -- the whole batch as one request per stage, stage after stage: while one peer
  computes, the others wait (the naive pipeline; no overlap at all);
* ``micro_serial`` -- the same micro-batches as below, one at a time (separates the cost of smaller
  requests from the gain of overlapping them);
* ``pipelined`` -- all micro-batches in flight at once (GPipe: forward of all, then backward of all).

Reported: forward+backward tokens/s of each and the ratio pipelined/sequential; the bubble
fraction observed in the pipelined runs, both as the client sees it (a peer is busy while one of
our requests is outstanding on it, network included) and as the servers' compute threads see it
(``compute_busy_s`` from ``info``), next to GPipe's textbook (S - 1) / (M + S - 1); and memory per
request: the activation bytes each server's backward recompute saved (``info`` ``memory``), which
must return to zero after every request, and on CUDA the allocator's exact peak for the request.

Standalone: ``python -m peerd.cli.bench_train [--model ID] [--peers 3] [--device cpu]`` starts its own
local swarm; ``peerd.cli.bench`` calls :func:`run_training_bench` on the swarm it already runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "run_training_bench", "training_rows"]

MODES = ("sequential", "micro_serial", "pipelined")


async def _measure_rounds(
    client: Any,
    pipelines: dict[str, Any],
    hidden: torch.Tensor,
    grad_out: torch.Tensor,
    peer_ids: list[str],
    rounds: int,
) -> dict[str, Any]:
    """``rounds`` forward+backward passes per mode: wall times, bubbles, server memory, retries."""
    from peerd.client.pipeline import bubble_fraction

    walls: dict[str, list[float]] = {m: [] for m in MODES}
    bubbles_client: list[float] = []
    bubbles_compute: list[float] = []
    memory: dict[str, dict[str, dict[str, Any]]] = {}
    client_saved_bytes: dict[str, int] = {}
    live_after: list[int] = []
    retries = 0
    for _ in range(rounds):
        for mode in MODES:
            pipeline = pipelines[mode]
            before = await _server_counters(client, peer_ids)
            started = time.perf_counter()
            _, trace = await pipeline.forward(hidden)
            grad_in = await pipeline.backward(trace, grad_out)
            wall = time.perf_counter() - started
            after = await _server_counters(client, peer_ids)
            walls[mode].append(wall)
            retries += trace.retries
            client_saved_bytes[mode] = trace.saved_bytes()
            assert grad_in.shape == hidden.shape
            used = sorted({c.peer_id for c in trace.calls})
            memory[mode] = {p: dict(after[p].get("memory", {})) for p in used}
            live_after += [int(m.get("activation_live_bytes", 0)) for m in memory[mode].values()]
            if mode == "pipelined":
                bubbles_client.append(bubble_fraction(trace.calls, wall, peers=used))
                busy = [
                    float(after[p].get("compute_busy_s", 0.0)) - float(before[p].get("compute_busy_s", 0.0))
                    for p in used
                ]
                bubbles_compute.append(max(0.0, 1.0 - sum(busy) / (len(used) * wall)))
    return {
        "walls": walls,
        "bubbles_client": bubbles_client,
        "bubbles_compute": bubbles_compute,
        "memory": memory,
        "client_saved_bytes": client_saved_bytes,
        "live_after": live_after,
        "retries": retries,
    }


async def _server_counters(client: Any, peer_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    infos = await asyncio.gather(*(client.peers.info(p) for p in peer_ids))
    return {p: dict(info.extra) for p, info in zip(peer_ids, infos, strict=True)}


async def _bench(
    initial_peers: Sequence[str],
    model_path: Path | str,
    model_id: str,
    *,
    batch_size: int,
    seq_len: int,
    micro_batches: int,
    rounds: int,
) -> dict[str, Any]:
    from peerd.client import SwarmClient
    from peerd.client.pipeline import RemotePipeline

    client = await SwarmClient.connect(initial_peers, model_path, model_id=model_id, request_timeout_s=300.0)
    try:
        route = await client.wait_for_route(timeout_s=120)
        servers = await client.servers(refresh=True)
        peer_ids = sorted(servers)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, client.config.vocab_size, (batch_size, seq_len), generator=generator)
        with torch.no_grad():
            hidden = client.head.embed(ids)  # [batch, seq_len, hidden]
        grad_out = torch.randn(hidden.shape, generator=generator)  # stands in for d(loss)/d(output)
        pipelines = {
            "sequential": RemotePipeline(client, micro_batches=1, rng=random.Random(0)),
            "micro_serial": RemotePipeline(client, micro_batches=micro_batches, max_in_flight=1, rng=random.Random(0)),
            "pipelined": RemotePipeline(client, micro_batches=micro_batches, rng=random.Random(0)),
        }
        # warm-up: first requests pay for connections, allocator growth, rotary tables
        for pipeline in pipelines.values():
            _, trace = await pipeline.forward(hidden)
            await pipeline.backward(trace, grad_out)

        m = await _measure_rounds(client, pipelines, hidden, grad_out, peer_ids, rounds)
        walls, memory = m["walls"], m["memory"]
        stages = len(route)
        tokens = batch_size * seq_len
        tps = {m: tokens / statistics.median(walls[m]) for m in MODES}
        per_request = {
            mode: max((int(x.get("activation_last_request_bytes", 0)) for x in mem.values()), default=0)
            for mode, mem in memory.items()
        }
        device_peak = {
            mode: max((int(x.get("device_last_request_peak_bytes", 0)) for x in mem.values()), default=0)
            for mode, mem in memory.items()
        }
        return {
            "model": model_id,
            "route": [str(s) for s in route],
            "stages": stages,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "micro_batches": micro_batches,
            "rounds": rounds,
            "tokens_per_step": tokens,
            "tokens_per_s": tps,
            "step_s": {m: statistics.median(walls[m]) for m in MODES},
            "pipelined_vs_sequential": tps["pipelined"] / tps["sequential"],
            "pipelined_vs_micro_serial": tps["pipelined"] / tps["micro_serial"],
            "bubble_fraction_client": statistics.median(m["bubbles_client"]),
            "bubble_fraction_compute": statistics.median(m["bubbles_compute"]),
            "bubble_fraction_gpipe_theory": (stages - 1) / (micro_batches + stages - 1),
            "server_activation_bytes_per_request": per_request,
            "server_device_peak_bytes_per_request": device_peak,
            "server_activation_live_bytes_after_requests": max(m["live_after"], default=0),
            "server_activation_peak_bytes": {
                p[:12]: int(x.get("activation_peak_bytes", 0)) for p, x in memory.get("sequential", {}).items()
            },
            "client_saved_bytes": m["client_saved_bytes"],
            "retries": m["retries"],
        }
    finally:
        await client.close()


async def run_training_bench_async(
    initial_peers: Sequence[str],
    model_path: Path | str,
    model_id: str,
    *,
    batch_size: int = 8,
    seq_len: int = 64,
    micro_batches: int = 4,
    rounds: int = 3,
) -> dict[str, Any]:
    """:func:`run_training_bench` for callers already inside an event loop."""
    return await _bench(
        initial_peers,
        model_path,
        model_id,
        batch_size=batch_size,
        seq_len=seq_len,
        micro_batches=micro_batches,
        rounds=rounds,
    )


def run_training_bench(
    initial_peers: Sequence[str],
    model_path: Path | str,
    model_id: str,
    *,
    batch_size: int = 8,
    seq_len: int = 64,
    micro_batches: int = 4,
    rounds: int = 3,
) -> dict[str, Any]:
    """Measure forward+backward through a running swarm (see the module docstring); returns a dict.

    Starts its own event loop (call it from synchronous code, as ``peerd.cli.bench`` does).
    """
    from peerd.cli.helpers import run_async

    return run_async(
        run_training_bench_async(
            initial_peers,
            model_path,
            model_id,
            batch_size=batch_size,
            seq_len=seq_len,
            micro_batches=micro_batches,
            rounds=rounds,
        )
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def training_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, value, note) rows for a bench table."""
    tps = result["tokens_per_s"]
    m, s = result["micro_batches"], result["stages"]
    shape = f"batch {result['batch_size']} x {result['seq_len']} tokens"
    rows = [
        ("train fwd+bwd pipelined", f"{tps['pipelined']:.1f} tok/s", f"{m} micro-batches in flight, {shape}"),
        ("train fwd+bwd sequential", f"{tps['sequential']:.1f} tok/s", "whole batch, one stage at a time"),
        ("train pipelined / sequential", f"{result['pipelined_vs_sequential']:.3f}", f"{s} stages"),
        (
            "train pipelined / 1-at-a-time",
            f"{result['pipelined_vs_micro_serial']:.3f}",
            f"same {m} micro-batches without overlap: {tps['micro_serial']:.1f} tok/s",
        ),
        (
            "train bubble (client view)",
            f"{result['bubble_fraction_client']:.3f}",
            f"GPipe theory (S-1)/(M+S-1) = {result['bubble_fraction_gpipe_theory']:.3f}",
        ),
        (
            "train bubble (server compute)",
            f"{result['bubble_fraction_compute']:.3f}",
            "1 - sum(compute busy) / (S x wall)",
        ),
        (
            "server activations / request",
            _mib(result["server_activation_bytes_per_request"].get("pipelined", 0)),
            "backward recompute, one micro-batch; whole batch: "
            + _mib(result["server_activation_bytes_per_request"].get("sequential", 0)),
        ),
        (
            "server activations kept",
            f"{result['server_activation_live_bytes_after_requests']} B",
            "after every request (must be 0)",
        ),
    ]
    device_peak = result["server_device_peak_bytes_per_request"].get("pipelined", 0)
    if device_peak:
        rows.append(("server CUDA peak / request", _mib(device_peak), "allocator peak above the request's start"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peerd.cli.bench_train", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="device of the peers (cpu, cuda)")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per peer (default 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-results/train.json")
    args = parser.parse_args(argv)

    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve
    from peerd.model.config import ModelConfig

    torch.set_num_threads(1)
    model_id, path = resolve(args.model, args.cache_dir)
    spans = split_blocks(ModelConfig.from_pretrained(path).num_layers, args.peers)
    print(f"peerd training bench: {model_id}, peers {spans} on {args.device}", flush=True)
    with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
        swarm.start_bootstrap()
        extra = ["--torch-threads", str(args.torch_threads), "--device", args.device]
        procs = [swarm.start_peer(f"peer{i + 1}", span, extra) for i, span in enumerate(spans)]
        swarm.wait_ready(procs, timeout_s=300)
        result = run_training_bench(
            swarm.initial_peers,
            path,
            model_id,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            micro_batches=args.micro_batches,
            rounds=args.rounds,
        )
    result["device"] = args.device
    result["torch_threads_per_peer"] = args.torch_threads
    rows = training_rows(result)
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, note in rows:
        print(f"  {name.ljust(width)}  {value:>14}   {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
