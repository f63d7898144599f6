"""The options of `peerd finetune`, kept apart from the command (peerd/cli/finetune.py) so that building
the argument parser imports neither torch nor hivemind: every `peerd` command builds it."""

from __future__ import annotations

import argparse

from peerd.client.training_options import DEFAULT_DATA, Aggregation, Averaged
from protocols import Compression

__all__ = ["add_finetune_arguments"]


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
