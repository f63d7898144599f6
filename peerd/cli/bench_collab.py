"""Collaborative fine-tuning, measured: several trainers on one swarm, averaging over their own nodes.

On one running swarm, side by side in one run (the text split once: the last tenth is a fixed
held-out set nobody trains on, the rest is the training text, cut into contiguous shards):

* **throughput** -- samples/s of 1, 2 and 4 trainers, each with the same per-trainer batch (so n
  trainers process n times the samples per step; they share the swarm's peers);
* **loss curves** -- one trainer on the whole training text with the global batch, over 3 seeds
  (their spread is the noise), against 2 and 4 trainers on disjoint shards, each with batch / n,
  averaging gradients every step: held-out loss every few steps, one PNG;
* **bandwidth** -- 2 trainers with updates sent as float32, float16 and blockwise 8-bit, and
  averaging parameters every step or every k steps (local SGD): bytes per step and the held-out
  loss each reached.

Standalone: ``python -m peerd.cli.bench_collab [--model ID|PATH] [--peers 2] [--steps 40]``
starts its own local swarm (as ``peerd.cli.bench_train`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["Setting", "main", "run_collab_bench", "within_noise"]


@dataclass(frozen=True)
class Setting:
    """One training run of the bench."""

    name: str
    trainers: int
    batch_per_trainer: int
    steps: int
    averaged: str = "gradients"  # or "parameters" (local SGD)
    average_every: int = 1
    compression: str = "none"
    seed: int = 0
    eval_every: int = 0  # 0: no held-out evaluation
    group_window_s: float = 2.0  # long enough that trainers sharing 2 busy cores make every round


def split_ids(ids: Sequence[int], held_out: float = 0.1) -> tuple[list[int], list[int]]:
    """(training ids, held-out ids): the last ``held_out`` of the text is never trained on."""
    cut = int(len(ids) * (1 - held_out))
    return list(ids[:cut]), list(ids[cut:])


async def _train(
    initial_peers: Sequence[str], model_path: Path, model_id: str, ids: list[int], heldout: Tensor, s: Setting
) -> dict[str, Any]:
    """``s.trainers`` trainers (each its own client and node) training together; the run's summary."""
    from peerd.client import SwarmClient
    from peerd.client.adapters import ClientAdapter
    from peerd.client.averaging import Averager, AveragingConfig
    from peerd.client.collective import optimizer_state
    from peerd.client.run_records import Averaged
    from peerd.client.training import TokenBatches, finetune
    from protocols import Compression

    listen = ["/ip4/127.0.0.1/tcp/0"]  # every trainer of the bench is on this machine
    clients = [
        await SwarmClient.connect(
            initial_peers, model_path, model_id=model_id, host_maddrs=listen, request_timeout_s=300
        )
        for _ in range(s.trainers)
    ]
    averagers: list[Averager] = []
    try:
        await clients[0].wait_for_route(timeout_s=120)
        part = len(ids) // s.trainers
        jobs = []
        for i, client in enumerate(clients):
            batches = TokenBatches(
                ids[i * part : (i + 1) * part],
                seq_len=heldout.shape[1],
                batch_size=s.batch_per_trainer,
                seed=s.seed * 100 + i,
            )
            adapter = ClientAdapter(client.head, prompt_tokens=8, head_rank=4, seed=s.seed)
            averager = None
            if s.trainers > 1:
                config = AveragingConfig(
                    run=f"{s.name}-{s.seed}",
                    averaged=Averaged(s.averaged),
                    group_window_s=s.group_window_s,
                    round_timeout_s=120.0,
                    compression=Compression(s.compression),
                )
                params = list(adapter.trainable_parameters().values())
                flat = torch.cat([p.detach().reshape(-1) for p in params])
                extra = optimizer_state(torch.optim.AdamW(params), params) if s.averaged == "gradients" else None
                averager = await Averager.create(client.p2p, client.dht, config, flat, extra)
                averagers.append(averager)
            evaluates = s.eval_every > 0 and i == 0  # with gradients every trainer holds the same adapter
            jobs.append(
                finetune(
                    client,
                    batches,
                    steps=s.steps,
                    adapter=adapter,
                    lr=5e-3,
                    averager=averager,
                    average_every=s.average_every,
                    eval_windows=heldout if evaluates else None,
                    eval_every=s.eval_every,
                )
            )
        results = await asyncio.gather(*jobs)
    finally:
        for averager in averagers:
            await averager.close()
        for client in clients:
            await client.close()
    return _summary(s, results)


def _summary(s: Setting, results: Sequence[Any]) -> dict[str, Any]:
    steps = min(len(r.step_losses) for r in results)
    losses = [statistics.fmean(r.step_losses[k] for r in results) for k in range(steps)]  # the global batch's
    rounds = [rep for r in results for rep in r.rounds]
    sent = [rep.bytes_sent / (len(rep.group) - 1) for rep in rounds if rep.bytes_sent]
    pushes_per_step = len(sent) / max(1, s.trainers * s.steps)
    elapsed = max(r.elapsed_s for r in results)
    return {
        **dataclasses.asdict(s),
        "samples_per_s": sum(len(r.losses) for r in results) * s.batch_per_trainer / elapsed,
        "losses": losses,
        "eval": results[0].eval_losses,
        "final_eval": results[0].eval_losses[-1][1] if results[0].eval_losses else None,
        "bytes_per_push": statistics.fmean(sent) if sent else 0.0,  # one update to one other member
        "bytes_per_step": statistics.fmean(sent) * pushes_per_step if sent else 0.0,  # per trainer, per peer
        "round_s": statistics.fmean(rep.elapsed_s for rep in rounds) if rounds else 0.0,
        "full_rounds": sum(len(rep.used) == s.trainers for rep in rounds) / max(1, len(rounds)),
    }


def within_noise(single: Sequence[Sequence[Sequence[float]]], other: Sequence[Sequence[float]]) -> dict[str, float]:
    """Compare a curve of (step, loss) points with the single trainer's seeds at the steps all have:
    the largest and mean gap between ``other`` and the seeds' mean, the seeds' largest spread
    (max - min) and standard deviation."""
    seeds = [{int(k): loss for k, loss in curve} for curve in single]
    mine = {int(k): loss for k, loss in other}
    steps = sorted(set(mine).intersection(*seeds))
    points = {k: [seed[k] for seed in seeds] for k in steps}
    gaps = [abs(mine[k] - statistics.fmean(points[k])) for k in steps]
    return {
        "max_gap": max(gaps),
        "mean_gap": statistics.fmean(gaps),
        "max_seed_spread": max(max(p) - min(p) for p in points.values()),
        "max_seed_std": max(statistics.stdev(p) for p in points.values()),
    }


async def run_collab_bench(
    initial_peers: Sequence[str], model_path: Path, model_id: str, text: str, *, steps: int, batch: int, seq_len: int
) -> dict[str, Any]:
    """All three measurements (see the module doc); the result as a dict."""
    from tokenizers import Tokenizer

    from peerd.client.training import TokenBatches

    ids, held = split_ids(Tokenizer.from_file(str(model_path / "tokenizer.json")).encode(text).ids)
    heldout = TokenBatches(held, seq_len=seq_len, batch_size=1).windows  # [k, seq_len]
    eval_every = max(1, steps // 8)

    async def run(s: Setting) -> dict[str, Any]:
        started = time.perf_counter()
        result = await _train(initial_peers, model_path, model_id, ids, heldout, s)
        final = f", held-out {result['final_eval']:.3f}" if result["final_eval"] is not None else ""
        took_s = time.perf_counter() - started
        print(f"  {s.name} seed {s.seed}: {result['samples_per_s']:.2f} samples/s{final} ({took_s:.0f} s)", flush=True)
        return result

    throughput = [await run(Setting(f"tp{n}", n, batch, max(4, steps // 4))) for n in (1, 2, 4)]
    curve = Setting("curve", 1, batch, steps, eval_every=eval_every)
    singles = [await run(replace(curve, seed=seed)) for seed in (0, 1, 2)]
    multi = {n: await run(replace(curve, name=f"curve{n}", trainers=n, batch_per_trainer=batch // n)) for n in (2, 4)}
    two = replace(curve, name="bw", trainers=2, batch_per_trainer=batch // 2)
    bandwidth = [multi[2]] + [await run(replace(two, compression=c)) for c in ("float16", "blockwise8")]
    bandwidth += [await run(replace(two, averaged="parameters", average_every=k)) for k in (1, 4)]
    noise = {str(n): within_noise([r["eval"] for r in singles], r["eval"]) for n, r in multi.items()}
    return {
        "throughput": throughput,
        "singles": singles,
        "multi": {str(n): r for n, r in multi.items()},
        "bandwidth": bandwidth,
        "noise": noise,
    }


def plot_curves(result: dict[str, Any], path: Path, title: str) -> Path:
    """Held-out loss per step: one trainer (mean and min-max of 3 seeds) against 2 and 4 trainers."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = [k for k, _ in result["singles"][0]["eval"]]
    seeds = [[loss for _, loss in r["eval"]] for r in result["singles"]]
    points = list(zip(*seeds, strict=True))
    ax.fill_between(
        steps,
        [min(p) for p in points],
        [max(p) for p in points],
        alpha=0.25,
        color="#1f4e79",
        label="1 trainer, whole text: 3 seeds (min-max)",
    )
    ax.plot(steps, [statistics.fmean(p) for p in points], color="#1f4e79", label="1 trainer: mean of 3 seeds")
    for (n, run), (style, color) in zip(result["multi"].items(), (("--", "#d62728"), (":", "#2ca02c")), strict=False):
        xs, ys = zip(*run["eval"], strict=True)
        ax.plot(xs, ys, style, color=color, linewidth=2, label=f"{n} trainers, disjoint shards, gradients averaged")
    for run in result.get("bandwidth", []):
        if run["averaged"] == "parameters" and run["average_every"] == 1:  # the first delivery's method
            xs, ys = zip(*run["eval"], strict=True)
            ax.plot(xs, ys, "-.", color="#7f7f7f", label="2 trainers, parameters averaged after own AdamW steps")
    ax.set_xlabel("optimizer step (same global batch)")
    ax.set_ylabel("held-out next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _print(result: dict[str, Any]) -> None:
    for r in result["throughput"]:
        print(
            f"  {r['trainers']} trainer(s): {r['samples_per_s']:.2f} samples/s, round {r['round_s']:.2f} s, "
            f"{r['full_rounds']:.0%} of rounds with every trainer"
        )
    for r in result["bandwidth"]:
        how = f"{r['averaged']} every {r['average_every']}, {r['compression']}"
        print(
            f"  2 trainers, {how:>28}: {r['bytes_per_push']:,.0f} B per push, {r['bytes_per_step']:,.0f} B "
            f"per step, held-out {r['final_eval']:.3f}"
        )
    for r in result["singles"]:
        print(f"  1 trainer seed {r['seed']}: held-out {' '.join(f'{x:.3f}' for _, x in r['eval'])}")
    for n, r in result["multi"].items():
        gap = result["noise"][n]
        print(
            f"  {n} trainers: held-out {' '.join(f'{x:.3f}' for _, x in r['eval'])}; gap to the seeds' mean "
            f"max {gap['max_gap']:.3f}, seeds' spread max {gap['max_seed_spread']:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peerd.cli.bench_collab", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="model id or checkpoint folder")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each curve")
    parser.add_argument("--batch", type=int, default=8, help="global batch of the curves (a multiple of 4)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--data", default=None, help="UTF-8 text (default: the shipped sample)")
    parser.add_argument("--out", default="bench-results/collab.json")
    args = parser.parse_args(argv)
    if args.batch % 4:
        parser.error(f"--batch {args.batch}: use a multiple of 4, so 2 and 4 trainers split it evenly")

    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve, run_async
    from peerd.client.training import DEFAULT_DATA
    from peerd.model.config import ModelConfig

    torch.set_num_threads(1)
    model_id, path = resolve(args.model, args.cache_dir)
    spans = split_blocks(ModelConfig.from_pretrained(path).num_layers, args.peers)
    text = Path(args.data or DEFAULT_DATA).read_text(encoding="utf-8")
    with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(f"peer{i + 1}", span, ["--torch-threads", "1"]) for i, span in enumerate(spans)]
        swarm.wait_ready(procs, timeout_s=300)
        result = run_async(
            run_collab_bench(
                swarm.initial_peers, path, model_id, text, steps=args.steps, batch=args.batch, seq_len=args.seq_len
            )
        )
    _print(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot = plot_curves(result, out.with_suffix(".png"), f"{model_id}: n trainers vs one, held-out loss")
    print(f"\nwritten to {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
