"""How one averaging round combines updates: screening, weighted mean, median, trimmed mean."""

from __future__ import annotations

import torch

from peerd.client.aggregation import Aggregation, Contribution, aggregate


def c(peer: str, values: list[float], weight: float = 1.0) -> Contribution:
    return Contribution(peer, weight, torch.tensor(values))


def test_the_mean_is_weighted_by_samples_and_independent_of_arrival_order() -> None:
    updates = [c("b", [3.0, 0.0], weight=3), c("a", [1.0, 4.0], weight=1)]
    first = aggregate(updates, 2)
    second = aggregate(list(reversed(updates)), 2)
    assert torch.equal(first.update, second.update)  # the same bits whatever order pushes came in
    torch.testing.assert_close(first.update, torch.tensor([2.5, 1.0]))
    assert first.used == ["a", "b"] and first.excluded == {}


def test_nan_inf_wrong_shape_and_absurd_norms_are_excluded_even_in_a_group_of_two() -> None:
    result = aggregate([c("honest", [1.0, 1.0]), c("huge", [1e4, 0.0])], 2)
    assert result.used == ["honest"] and "norm" in result.excluded["huge"]  # lower median: the honest norm
    torch.testing.assert_close(result.update, torch.tensor([1.0, 1.0]))

    bad = [c("nan", [float("nan"), 0.0]), c("inf", [float("inf"), 0.0]), c("short", [1.0]), c("w", [1.0, 1.0], 0.0)]
    result = aggregate([c("ok", [2.0, 2.0]), *bad], 2)
    assert result.used == ["ok"] and set(result.excluded) == {"nan", "inf", "short", "w"}
    assert torch.equal(aggregate(bad, 2).update, torch.zeros(2))  # nothing usable: no change


def test_median_and_trimmed_mean_bound_an_outlier_that_passes_the_norm_screen() -> None:
    # "liar" is 5x the others: under the 10x screen, so only the robust rules stop its pull
    updates = [c("a", [1.0, 1.0]), c("b", [1.2, 1.2]), c("d", [0.8, 0.8]), c("liar", [-5.0, 5.0])]
    mean = aggregate(updates, 2).update
    median = aggregate(updates, 2, method=Aggregation.MEDIAN).update
    trimmed = aggregate(updates, 2, method=Aggregation.TRIMMED_MEAN).update
    assert mean[0] < 0  # dragged across zero by one trainer
    torch.testing.assert_close(median, torch.tensor([0.8, 1.0]))  # lower median of 4 values
    torch.testing.assert_close(trimmed, torch.tensor([0.9, 1.1]))  # lowest and highest dropped
