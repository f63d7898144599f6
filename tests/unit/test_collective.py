"""Pure pieces of gradient averaging: AdamW state as a flat vector, remote counts, the bench's noise measure."""

from __future__ import annotations

import argparse

import pytest
import torch

from peerd.cli.bench_collab import within_noise
from peerd.cli.finetune import _collab_problem
from peerd.client.collective import _bounded, load_optimizer_state, optimizer_state


def params_and_optimizer() -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)


def step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scale: float) -> None:
    for p in params:
        p.grad = torch.full_like(p, scale) + p.detach()
    optimizer.step()


def test_adamw_state_travels_as_a_flat_vector_and_a_copy_steps_exactly_like_the_original() -> None:
    params, optimizer = params_and_optimizer()
    assert torch.equal(optimizer_state(optimizer, params), torch.zeros(2 * 10 + 1))  # before any step
    for k in range(3):
        step(params, optimizer, 0.1 * k)
    flat = optimizer_state(optimizer, params)
    assert flat.shape == (21,) and float(flat[-1]) == 3.0

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.0)
    load_optimizer_state(other, copies, flat)
    step(params, optimizer, 0.5)
    step(copies, other, 0.5)
    assert all(torch.equal(p, q) for p, q in zip(params, copies, strict=True))

    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    load_optimizer_state(torch.optim.AdamW(fresh), fresh, torch.zeros(21))  # zeros: no state, no error
    with pytest.raises(ValueError, match="expected 21"):
        load_optimizer_state(other, copies, torch.zeros(20))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5.0), (2.5, 2.5), (-1, 0.0), (True, 0.0), ("7", 0.0), (float("nan"), 0.0), (1e40, 0.0), (None, 0.0)],
)
def test_counts_from_other_trainers_are_read_defensively(value: object, expected: float) -> None:
    assert _bounded(value, 1e9) == expected


def test_within_noise_compares_at_the_steps_every_curve_has() -> None:
    seeds = [[(0, 5.0), (5, 4.0), (10, 3.0)], [(0, 5.0), (5, 4.2), (10, 3.2)], [(0, 5.0), (5, 3.8), (10, 3.1)]]
    got = within_noise(seeds, [(0, 5.0), (5, 4.5), (10, 3.1)])  # no point at 3, say: one missed step
    assert got["max_gap"] == pytest.approx(0.5) and got["max_seed_spread"] == pytest.approx(0.4)
    assert got["mean_gap"] == pytest.approx(0.5 / 3)


def collab_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "average_every": 1,
        "target_batch_size": 0,
        "collaborate": "run",
        "average": "gradients",
    }
    return argparse.Namespace(**{**values, **overrides})


def test_collaborative_options_that_do_not_fit_together_say_what_to_change() -> None:
    assert _collab_problem(collab_args()) is None
    assert _collab_problem(collab_args(target_batch_size=64)) is None
    assert "--collaborate" in str(_collab_problem(collab_args(target_batch_size=64, collaborate=None)))
    assert "--average gradients" in str(_collab_problem(collab_args(target_batch_size=64, average="parameters")))
    assert "at least 1" in str(_collab_problem(collab_args(average_every=0)))
    assert ">= 1" in str(_collab_problem(collab_args(target_batch_size=-3)))
