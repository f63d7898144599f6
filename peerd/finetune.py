"""`peerd finetune`: train client-side parameters through the swarm (filled in by the fine-tuning work)."""

from __future__ import annotations

import argparse

__all__ = ["add_finetune_arguments", "cmd_finetune"]


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="text file to train on")


async def cmd_finetune(args: argparse.Namespace) -> int:
    raise NotImplementedError("peerd finetune is not implemented yet")
