"""Combining the trainers' updates of one averaging round: validity checks, then a (robust) mean.

Pure functions over flat float32 vectors, so every member of a round that holds the same
contributions computes the same result bit for bit: contributions are taken in peer-id order and
every rule below is deterministic.

What is excluded before combining, and why:

* a vector of the wrong length, or with NaN / inf: it would poison every coordinate;
* a vector whose norm is over ``max_norm_factor`` times the *lower median* of the round's norms
  (and over ``min_norm_floor``): with honest trainers on similar data, updates have similar norms,
  so one 1000x larger is an attack or a diverged trainer. The lower median of two norms is the
  smaller one, so in a group of two an absurd update is still caught (a plain median would be
  pulled halfway to it).

Then ``mean`` is the sample-weighted mean (what plain data parallelism computes), ``median`` the
coordinate-wise median and ``trimmed_mean`` the coordinate-wise mean without the lowest and highest
``trim_fraction`` of values (at least one each side once there are three contributions): both
bound what a minority of bad updates that pass the checks can do (Yin et al., 2018, "Byzantine-
robust distributed learning", sections 3-4), at some cost in statistical efficiency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from peerd.client.training_options import Aggregation

__all__ = ["Aggregation", "AggregationResult", "Contribution", "aggregate"]


@dataclass(frozen=True)
class Contribution:
    """One trainer's update for a round: who sent it, the samples behind it, the flat vector."""

    peer_id: str
    weight: float
    vector: Tensor  # [n] float32


@dataclass
class AggregationResult:
    """The combined update and what went into it."""

    update: Tensor  # [n] float32; zeros when nothing was usable
    used: list[str] = field(default_factory=list)  # peer ids, in the order combined
    excluded: dict[str, str] = field(default_factory=dict)  # peer id -> why


def _screen(
    contributions: Sequence[Contribution], size: int, max_norm_factor: float, min_norm_floor: float
) -> tuple[list[Contribution], dict[str, str]]:
    excluded: dict[str, str] = {}
    finite: list[tuple[Contribution, float]] = []
    for c in contributions:
        if c.vector.shape != (size,):
            excluded[c.peer_id] = f"shape {tuple(c.vector.shape)}, expected ({size},)"
        elif not math.isfinite(c.weight) or c.weight <= 0:
            excluded[c.peer_id] = f"weight {c.weight}"
        elif not bool(torch.isfinite(c.vector).all()):
            excluded[c.peer_id] = "NaN or inf in the update"
        else:
            finite.append((c, float(torch.linalg.vector_norm(c.vector))))
    if not finite:
        return [], excluded
    norms = sorted(norm for _, norm in finite)
    lower_median = norms[(len(norms) - 1) // 2]
    limit = max(max_norm_factor * lower_median, min_norm_floor)
    kept = []
    for c, norm in finite:
        if norm > limit:
            excluded[c.peer_id] = f"update norm {norm:.3g} over {limit:.3g} ({max_norm_factor:g}x the median)"
        else:
            kept.append(c)
    return kept, excluded


def aggregate(
    contributions: Sequence[Contribution],
    size: int,
    *,
    method: Aggregation = Aggregation.MEAN,
    max_norm_factor: float = 10.0,
    min_norm_floor: float = 1e-6,
    trim_fraction: float = 0.25,
) -> AggregationResult:
    """Combine the valid contributions (see the module doc); the order of ``contributions`` does not matter."""
    ordered = sorted(contributions, key=lambda c: c.peer_id)
    kept, excluded = _screen(ordered, size, max_norm_factor, min_norm_floor)
    if not kept:
        return AggregationResult(torch.zeros(size), [], excluded)
    stacked = torch.stack([c.vector.float() for c in kept])  # [k, n]
    if method is Aggregation.MEAN:
        weights = torch.tensor([c.weight for c in kept], dtype=torch.float64)
        weights = (weights / weights.sum()).to(torch.float32)  # [k]
        update = weights @ stacked  # [n]
    elif method is Aggregation.MEDIAN:
        update = stacked.median(dim=0).values  # [n] (the lower median for an even count)
    else:
        k = len(kept)
        trim = max(1, int(k * trim_fraction)) if k >= 3 else 0
        ranked = stacked.sort(dim=0).values  # [k, n], each coordinate sorted
        update = ranked[trim : k - trim].mean(dim=0)  # [n]
    return AggregationResult(update.contiguous(), [c.peer_id for c in kept], excluded)
