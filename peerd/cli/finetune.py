"""`peerd finetune`: train a soft prompt / adapters through a swarm, save them and a loss curve.

The training itself is :mod:`peerd.client.training`; this module parses, prints and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from peerd.cli.helpers import resolve
from peerd.client.adapters import ClientAdapter
from peerd.client.averaging import Averager, AveragingConfig
from peerd.client.collective import optimizer_state
from peerd.client.training import TokenBatches, finetune
from peerd.client.training_options import DEFAULT_DATA, Aggregation, Averaged
from protocols import Compression

__all__ = ["cmd_finetune", "plot_losses"]


def plot_losses(losses: Sequence[float], path: str | Path, *, title: str = "") -> Path:
    """Write the loss curve (raw and smoothed) as a PNG; needs matplotlib (the ``finetune`` extra)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    smoothed: list[float] = []
    for loss in losses:
        smoothed.append(loss if not smoothed else 0.8 * smoothed[-1] + 0.2 * loss)
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="#9bb7d4", linewidth=1, label="loss per step")
    ax.plot(steps, smoothed, color="#1f4e79", linewidth=2, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title(title or "peerd finetune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _require_matplotlib() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "peerd finetune writes a loss-curve PNG and needs matplotlib: "
            "pip install 'peerd[finetune]' (or pip install matplotlib)"
        )
    return None


async def cmd_finetune(args: argparse.Namespace) -> int:
    """Train, save ``adapter.safetensors``, ``loss.png`` and ``losses.json`` under ``--out``."""
    from tqdm import tqdm

    from peerd.client import SwarmClient

    problem = _require_matplotlib() or _collab_problem(args)
    if problem:
        print(f"peerd: error: {problem}", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else DEFAULT_DATA
    text = data.read_text(encoding="utf-8")  # OSError -> the CLI's readable error
    model_id, path = resolve(args.model, args.cache_dir)
    model_id = args.model_id or model_id
    out = Path(args.out)
    torch.manual_seed(args.seed)
    listen = args.listen or ("/ip4/0.0.0.0/tcp/0" if args.collaborate else None)
    client = await SwarmClient.connect(
        args.initial_peers, path, model_id=model_id, swarm=args.swarm, host_maddrs=[listen] if listen else None
    )
    averager: Averager | None = None
    try:
        route = await client.wait_for_route()
        print(f"route: {' -> '.join(str(s) for s in route)}", flush=True)
        ids = client.encode(text)
        batches = TokenBatches(ids, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
        adapter = ClientAdapter(
            client.head,
            prompt_tokens=args.prompt_tokens,
            head_rank=args.head_rank,
            embed_rank=args.embed_rank,
            init_prompt_ids=client.encode(text[:200]),
            seed=args.seed,
        )
        if args.collaborate:
            averager = await _join_run(client, adapter, args)
        n_params = sum(p.numel() for p in adapter.trainable_parameters().values())
        print(
            f"training {n_params:,} client-side parameters on {data.name} ({len(ids):,} tokens, "
            f"{len(batches)} windows of {args.seq_len}); the swarm's blocks stay frozen",
            flush=True,
        )
        with tqdm(total=args.steps, desc="finetune", unit="step") as bar:

            def on_step(step: int, loss: float) -> None:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)

            result = await finetune(
                client,
                batches,
                steps=args.steps,
                adapter=adapter,
                lr=args.lr,
                micro_batches=args.micro_batches,
                rng_seed=args.seed,
                on_step=on_step,
                averager=averager,
                average_every=args.average_every,
            )
        adapter_path = adapter.save(out / "adapter.safetensors", model_id=model_id)
        title = f"{model_id}: prompt {args.prompt_tokens}, head LoRA r={args.head_rank}, {data.name}"
        plot_path = plot_losses(result.losses, out / "loss.png", title=title)
        summary = {
            "model_id": model_id,
            "data": str(data),
            "steps": args.steps,
            "losses": result.losses,
            "step_losses": result.step_losses,
            "tokens_per_s": result.tokens_per_s,
            "retries": result.retries,
            "adapter": str(adapter_path),
            "rounds": [dataclasses.asdict(r) for r in result.rounds],
        }
        (out / "losses.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        first, last = _mean(result.losses[:5]), _mean(result.losses[-5:])
        print(
            f"loss {first:.3f} -> {last:.3f} (first/last 5 steps), {result.tokens_per_s:.0f} tokens/s "
            f"forward+backward, {result.retries} stage retries",
            flush=True,
        )
        print(f"saved {adapter_path} and {plot_path}", flush=True)
        if args.sample_prompt:
            sample = await client.generate(args.sample_prompt, max_new_tokens=48, adapter=adapter)
            print(f"sample with the adapter:\n{args.sample_prompt}{sample.text}", flush=True)
    finally:
        if averager is not None:
            await averager.close()
        await client.close()
    return 0


async def _join_run(client: object, adapter: ClientAdapter, args: argparse.Namespace) -> Averager:
    """Start averaging with run ``args.collaborate`` (downloading its state if it has members)."""
    from peerd.client import SwarmClient

    assert isinstance(client, SwarmClient)  # typed loosely above: the import is lazy
    config = AveragingConfig(
        run=args.collaborate,
        averaged=Averaged(args.average),
        target_batch_size=args.target_batch_size,
        group_window_s=args.group_window,
        round_timeout_s=args.round_timeout,
        compression=Compression(args.average_compression),
        aggregation=Aggregation(args.aggregation),
    )
    params = list(adapter.trainable_parameters().values())
    initial = torch.cat([p.detach().float().reshape(-1) for p in params])
    # gradient averaging: AdamW's moments travel with the adapter to late joiners (fresh ones: zeros)
    extra = optimizer_state(torch.optim.AdamW(params), params) if config.averaged is Averaged.GRADIENTS else None
    averager = await Averager.create(client.p2p, client.dht, config, initial, extra)
    joined = "joined at round" if averager.round else "started"
    print(f"run {args.collaborate!r}: {joined} {averager.round}, reachable at {', '.join(averager.addrs)}", flush=True)
    return averager


def _collab_problem(args: argparse.Namespace) -> str | None:
    """Why the collaborative options do not fit together (None when they do)."""
    if args.average_every < 1:
        return f"--average-every must be at least 1, got {args.average_every}"
    if args.target_batch_size < 0:
        return f"--target-batch-size must be a number of samples (>= 1), got {args.target_batch_size}"
    if args.target_batch_size and not args.collaborate:
        return "--target-batch-size counts samples across the trainers of a run: add --collaborate RUN"
    if args.target_batch_size and args.average != Averaged.GRADIENTS.value:
        return "--target-batch-size needs --average gradients (parameters are averaged every --average-every steps)"
    return None


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
