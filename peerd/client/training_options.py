"""The choices a fine-tuning run is configured with, without torch: what the `peerd` argument parser
offers (building the parser must not import torch and hivemind, or every command starts slowly)."""

from __future__ import annotations

import enum
from pathlib import Path

__all__ = ["DEFAULT_DATA", "Aggregation", "Averaged"]

DEFAULT_DATA = Path(__file__).parent.parent / "data" / "finetune_sample.txt"


class Averaged(enum.StrEnum):
    """What a run's rounds average (every trainer of a run must use the same).

    GRADIENTS: each round averages the trainers' accumulated gradients, weighted by samples, and
    every trainer then takes the same optimizer step from the same optimizer state: n trainers
    are one trainer with their summed batch (synchronous data parallelism). PARAMETERS: each
    trainer takes its own optimizer steps and rounds average the adapters (local SGD / DiLoCo-like,
    for rounds every k > 1 steps).
    """

    GRADIENTS = "gradients"
    PARAMETERS = "parameters"


class Aggregation(enum.StrEnum):
    """How a round combines the trainers' updates (``peerd.client.aggregation``)."""

    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
