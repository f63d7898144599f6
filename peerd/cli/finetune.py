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
from peerd.client.aggregation import Aggregation
from peerd.client.averaging import Averager, AveragingConfig
from peerd.client.collective import optimizer_state
from peerd.client.run_records import Averaged
from peerd.client.training import DEFAULT_DATA, TokenBatches, finetune
from protocols import Compression

__all__ = ["add_finetune_arguments", "cmd_finetune", "plot_losses"]


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


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help=f"UTF-8 text file to train on (default: {DEFAULT_DATA.name})")
    parser.add_argument("--out", default="finetune-out", help="folder for adapter.safetensors and loss.png")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--micro-batches", type=int, default=4, help="pipeline micro-batches per step (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="soft prompt length; 0 = none (default 16)")
    parser.add_argument("--head-rank", type=int, default=8, help="LoRA rank on the LM head; 0 = none (default 8)")
    parser.add_argument("--embed-rank", type=int, default=0, help="LoRA rank on the embeddings; 0 = none")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches and routes")
    collab = parser.add_argument_group("collaborative training (data parallelism across trainers)")
    collab.add_argument(
        "--collaborate",
        metavar="RUN",
        default=None,
        help="join training run RUN: average the adapter with the other trainers of RUN (docs/finetuning.md)",
    )
    collab.add_argument(
        "--average",
        choices=[a.value for a in Averaged],
        default=Averaged.GRADIENTS.value,
        help="gradients (default): every step averages the trainers' gradients, n trainers = one with "
        "their summed batch; parameters: local AdamW steps, adapters averaged every --average-every steps",
    )
    collab.add_argument(
        "--average-every",
        type=int,
        default=1,
        help="local batches per round: accumulated into one step (gradients), or local steps (parameters)",
    )
    collab.add_argument(
        "--target-batch-size",
        type=int,
        default=0,
        metavar="N",
        help="with --average gradients: step when all trainers together hold N samples (replaces --average-every)",
    )
    collab.add_argument(
        "--average-compression",
        choices=[c.value for c in Compression],
        default=Compression.NONE.value,
        help="compression of the updates sent each round (default none)",
    )
    collab.add_argument(
        "--aggregation",
        choices=[a.value for a in Aggregation],
        default=Aggregation.MEAN.value,
        help="how a round combines the updates: mean, or median / trimmed_mean against bad trainers",
    )
    collab.add_argument("--group-window", type=float, default=1.0, help="seconds a round waits for members to join")
    collab.add_argument("--round-timeout", type=float, default=30.0, help="seconds a round waits for pushes")
    collab.add_argument(
        "--listen",
        default=None,
        metavar="MADDR",
        help="multiaddr the other trainers reach this one at (default: /ip4/0.0.0.0/tcp/0 with --collaborate)",
    )
    parser.add_argument(
        "--sample-prompt",
        default="Q: What does a peer do?\nA:",
        help="after training, generate from this prompt with the trained adapter ('' = skip)",
    )


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
