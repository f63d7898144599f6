"""Collaborative fine-tuning, measured: several trainers on one swarm, averaging over their own nodes.

On one running swarm, side by side in one run:

* **throughput** -- samples/s of 1, 2 and 4 trainers, each trainer with the same per-trainer batch
  (so n trainers process n times the samples per step; they share the swarm's peers);
* **bytes per averaging round** -- what one trainer pushes per round with updates sent as float32,
  float16 and blockwise 8-bit, and the loss each run reached;
* **loss curves** -- n trainers on disjoint contiguous shards of the text, the *global* batch fixed
  (each trainer takes batch / n), against one trainer on the union with the whole batch: the
  curves should agree within noise. Written as one PNG.

Standalone: ``python -m peerd.cli.bench_collab [--model ID] [--peers 2] [--steps 20]`` starts its
own local swarm (as ``peerd.cli.bench_train`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "run_collab_bench"]


async def _run(
    initial_peers: Sequence[str],
    model_path: Path,
    model_id: str,
    text: str,
    *,
    trainers: int,
    batch_per_trainer: int,
    seq_len: int,
    steps: int,
    compression: str = "none",
    shard: bool = True,
    run: str,
) -> dict[str, Any]:
    """``trainers`` trainers (each its own client and node) training together; the summary of the run."""
    from peerd.client import SwarmClient
    from peerd.client.adapters import ClientAdapter
    from peerd.client.averaging import Averager, AveragingConfig
    from peerd.client.training import TokenBatches, finetune
    from protocols import Compression

    listen = ["/ip4/127.0.0.1/tcp/0"]  # every trainer of the bench is on this machine
    clients = [
        await SwarmClient.connect(
            initial_peers, model_path, model_id=model_id, host_maddrs=listen, request_timeout_s=300
        )
        for _ in range(trainers)
    ]
    averagers: list[Averager] = []
    try:
        await clients[0].wait_for_route(timeout_s=120)
        ids = clients[0].encode(text)
        part = len(ids) // trainers if shard else len(ids)
        jobs = []
        for i, client in enumerate(clients):
            shard_ids = ids[i * part : (i + 1) * part] if shard else ids
            batches = TokenBatches(shard_ids, seq_len=seq_len, batch_size=batch_per_trainer, seed=i)
            adapter = ClientAdapter(client.head, prompt_tokens=8, head_rank=4, seed=0)
            averager = None
            if trainers > 1:
                config = AveragingConfig(
                    run=run, group_window_s=1.0, round_timeout_s=120.0, compression=Compression(compression)
                )
                flat = torch.cat([p.detach().reshape(-1) for p in adapter.trainable_parameters().values()])
                averager = await Averager.create(client.p2p, client.dht, config, flat)
                averagers.append(averager)
            jobs.append(finetune(client, batches, steps=steps, adapter=adapter, lr=5e-3, averager=averager))
        results = await asyncio.gather(*jobs)
    finally:
        for averager in averagers:
            await averager.close()
        for client in clients:
            await client.close()
    elapsed = max(r.elapsed_s for r in results)
    losses = [statistics.fmean(r.losses[s] for r in results) for s in range(steps)]  # the global batch's loss
    sent = [rep.bytes_sent / (len(rep.group) - 1) for r in results for rep in r.rounds if rep.bytes_sent]
    rounds = [rep for r in results for rep in r.rounds]
    return {
        "trainers": trainers,
        "compression": compression,
        "samples_per_s": trainers * batch_per_trainer * steps / elapsed,
        "losses": losses,
        "last5_loss": statistics.fmean(losses[-5:]),
        "bytes_per_push": statistics.fmean(sent) if sent else 0.0,  # one update to one other member
        "round_s": statistics.fmean(rep.elapsed_s for rep in rounds) if rounds else 0.0,
        "full_rounds": sum(len(rep.group) == trainers and not rep.late for rep in rounds) / max(1, len(rounds)),
    }


async def run_collab_bench(
    initial_peers: Sequence[str], model_path: Path, model_id: str, text: str, *, steps: int, batch: int, seq_len: int
) -> dict[str, Any]:
    """All three measurements (see the module doc); the result as a dict."""

    async def run(trainers: int, per_trainer: int, name: str, **kw: Any) -> dict[str, Any]:
        result = await _run(
            initial_peers,
            model_path,
            model_id,
            text,
            trainers=trainers,
            batch_per_trainer=per_trainer,
            seq_len=seq_len,
            steps=steps,
            run=name,
            **kw,
        )
        print(f"  {name}: {result['samples_per_s']:.2f} samples/s, last-5 loss {result['last5_loss']:.3f}", flush=True)
        return result

    throughput = [await run(n, batch, f"tp{n}") for n in (1, 2, 4)]
    compression = [await run(2, batch, f"c-{c}", compression=c) for c in ("none", "float16", "blockwise8")]
    curves = {n: await run(n, batch // n, f"lc{n}", shard=n > 1) for n in (1, 2, 4)}
    return {"throughput": throughput, "compression": compression, "curves": {str(n): r for n, r in curves.items()}}


def plot_curves(curves: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    for n, run in curves.items():
        label = "1 trainer, whole text" if n == "1" else f"{n} trainers, disjoint shards"
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], label=label)
    ax.set_xlabel("step (same global batch)")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peerd.cli.bench_collab", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="per-trainer batch (throughput); global batch (curves)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--out", default="bench-results/collab.json")
    args = parser.parse_args(argv)

    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve, run_async
    from peerd.client.training import DEFAULT_DATA
    from peerd.model.config import ModelConfig

    torch.set_num_threads(1)
    model_id, path = resolve(args.model, args.cache_dir)
    spans = split_blocks(ModelConfig.from_pretrained(path).num_layers, args.peers)
    text = DEFAULT_DATA.read_text(encoding="utf-8")
    with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(f"peer{i + 1}", span, ["--torch-threads", "1"]) for i, span in enumerate(spans)]
        swarm.wait_ready(procs, timeout_s=300)
        result = run_async(
            run_collab_bench(
                swarm.initial_peers, path, model_id, text, steps=args.steps, batch=args.batch, seq_len=args.seq_len
            )
        )
    for r in result["throughput"]:
        print(
            f"  {r['trainers']} trainer(s): {r['samples_per_s']:.2f} samples/s, round {r['round_s']:.2f} s, "
            f"{r['full_rounds']:.0%} of rounds with every trainer"
        )
    for r in result["compression"]:
        print(
            f"  2 trainers, {r['compression']:>10}: {r['bytes_per_push']:,.0f} B per push, loss {r['last5_loss']:.3f}"
        )
    for n, r in result["curves"].items():
        print(f"  curve {n} trainer(s): last-5 loss {r['last5_loss']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot = plot_curves(result["curves"], out.with_suffix(".png"), f"{model_id}: n trainers vs one on the union")
    print(f"\nwritten to {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
