"""`peerd finetune`: prompt tuning and client-side LoRA through a swarm whose blocks stay frozen.

The client embeds a batch of text windows (with a trainable soft prompt in front), sends the hidden
states through the swarm in micro-batches (:class:`peerd.client.autograd.RemoteBlocks`), computes
the next-token loss locally with the (LoRA-adapted) LM head, and calls ``loss.backward()``: the
gradient returns through the same peers to the soft prompt and embedding adapter. Only the
client's :class:`~peerd.client.adapters.ClientAdapter` changes; it is saved as safetensors, with
a loss-curve PNG beside it. ``SwarmClient.generate(..., adapter=...)`` uses it afterwards.

Each optimizer step runs in a worker thread (``asyncio.to_thread``), see peerd/client/autograd.py
for why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from peerd.client.adapters import ClientAdapter

if TYPE_CHECKING:
    from peerd.client.swarm import SwarmClient

__all__ = [
    "DEFAULT_DATA",
    "FinetuneResult",
    "TokenBatches",
    "add_finetune_arguments",
    "cmd_finetune",
    "finetune",
    "lm_loss",
    "plot_losses",
    "train_step",
]

DEFAULT_DATA = Path(__file__).parent / "data" / "finetune_sample.txt"

Blocks = Callable[[Tensor], Tensor]  # hidden [batch, n, hidden] -> hidden: RemoteBlocks, or a local Stage


class TokenBatches:
    """Random batches of ``seq_len``-token windows from one long token sequence (reproducible by seed).

    Windows start every ``seq_len // 2`` tokens, so every token is seen in two contexts; a
    sequence shorter than one window raises ValueError.
    """

    def __init__(self, ids: Sequence[int], *, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if seq_len < 2 or batch_size < 1:
            raise ValueError("seq_len must be >= 2 and batch_size >= 1")
        if len(ids) < seq_len:
            raise ValueError(f"the training text has {len(ids)} tokens, fewer than one window of {seq_len}")
        stride = max(1, seq_len // 2)
        tokens = torch.tensor(list(ids), dtype=torch.int64)
        self.windows = tokens.unfold(0, seq_len, stride)  # [num_windows, seq_len]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def sample(self) -> Tensor:
        """A batch ``[batch_size, seq_len]`` of windows drawn without replacement (with it if too few)."""
        n = len(self)
        if n >= self.batch_size:
            rows = torch.randperm(n, generator=self.generator)[: self.batch_size]
        else:
            rows = torch.randint(0, n, (self.batch_size,), generator=self.generator)
        return self.windows[rows]


def lm_loss(adapter: ClientAdapter, blocks: Blocks, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``input_ids [batch, n]`` with the adapter's soft prompt in front.

    With a soft prompt of length p, the output at position p - 1 (the prompt's last vector)
    predicts the first real token, so every token of the window is a target; without one, the
    first token is context only.
    """
    p = adapter.prefix_length
    hidden = adapter.embed(input_ids)  # [batch, p + n, hidden]
    out = blocks(hidden)  # [batch, p + n, hidden]
    if p:
        logits = adapter.logits(out[:, p - 1 : -1])  # [batch, n, vocab]
        targets = input_ids  # [batch, n]
    else:
        logits = adapter.logits(out[:, :-1])  # [batch, n - 1, vocab]
        targets = input_ids[:, 1:]  # [batch, n - 1]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train_step(adapter: ClientAdapter, blocks: Blocks, optimizer: torch.optim.Optimizer, input_ids: Tensor) -> float:
    """One optimizer step on one batch (blocking: run it in a worker thread when ``blocks`` is remote)."""
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(adapter, blocks, input_ids)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(loss.detach())


@dataclass
class FinetuneResult:
    """What a training run produced."""

    adapter: ClientAdapter
    losses: list[float] = field(default_factory=list)  # one per step
    tokens: int = 0  # tokens trained on (soft prompt excluded)
    elapsed_s: float = 0.0
    retries: int = 0  # remote stage calls redone on another peer

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def finetune(
    client: SwarmClient,
    batches: TokenBatches,
    *,
    steps: int,
    adapter: ClientAdapter | None = None,
    lr: float = 5e-3,
    micro_batches: int = 4,
    rng_seed: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Train ``adapter`` (default: a 16-token soft prompt) for ``steps`` steps through the swarm.

    Must be awaited on the client's event loop; each step runs in a worker thread. ``on_step``
    gets (step, loss) after every step (progress bars).
    """
    import random

    from peerd.client.autograd import RemoteBlocks

    adapter = adapter or ClientAdapter(client.head, prompt_tokens=16)
    params = list(adapter.trainable_parameters().values())
    if not params:
        raise ValueError("the adapter has nothing to train: give it prompt_tokens or a LoRA rank")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(rng_seed) if rng_seed is not None else None
    blocks = RemoteBlocks(client, micro_batches=micro_batches, rng=rng)
    result = FinetuneResult(adapter=adapter)
    started = time.perf_counter()
    for step in range(steps):
        ids = batches.sample()
        loss = await asyncio.to_thread(train_step, adapter, blocks, optimizer, ids)
        result.losses.append(loss)
        result.tokens += ids.numel()
        if blocks.last_trace is not None:
            result.retries += blocks.last_trace.retries
        if on_step is not None:
            on_step(step, loss)
    result.elapsed_s = time.perf_counter() - started
    return result


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


# --- the CLI ----------------------------------------------------------------------------------------


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

    from peerd.cli import resolve
    from peerd.client import SwarmClient

    problem = _require_matplotlib()
    if problem:
        print(f"peerd: error: {problem}", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else DEFAULT_DATA
    text = data.read_text(encoding="utf-8")  # OSError -> the CLI's readable error
    model_id, path = resolve(args.model, args.cache_dir)
    model_id = args.model_id or model_id
    out = Path(args.out)
    torch.manual_seed(args.seed)
    client = await SwarmClient.connect(args.initial_peers, path, model_id=model_id, swarm=args.swarm)
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
            )
        adapter_path = adapter.save(out / "adapter.safetensors", model_id=model_id)
        title = f"{model_id}: prompt {args.prompt_tokens}, head LoRA r={args.head_rank}, {data.name}"
        plot_path = plot_losses(result.losses, out / "loss.png", title=title)
        summary = {
            "model_id": model_id,
            "data": str(data),
            "steps": args.steps,
            "losses": result.losses,
            "tokens_per_s": result.tokens_per_s,
            "retries": result.retries,
            "adapter": str(adapter_path),
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
        await client.close()
    return 0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
