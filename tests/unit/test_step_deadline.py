"""StepDeadline: a peer's hang deadline follows its own decode step times, never below the floor."""

from __future__ import annotations

from peerd.client.deadlines import StepDeadline


def test_an_unmeasured_peer_and_a_prefill_get_the_transport_deadline() -> None:
    d = StepDeadline()
    assert d.deadline_s(1, 30.0) == 30.0  # nothing measured yet
    for _ in range(3):
        d.observe(1, 0.01)
    assert d.deadline_s(1, 30.0) == 1.0  # 10 x 10 ms is under the 1 s floor
    assert d.deadline_s(128, 30.0) == 30.0  # a prefill is not predicted by decode steps
    d.observe(128, 50.0)  # and does not count as a decode step either
    assert d.deadline_s(1, 30.0) == 1.0


def test_the_deadline_is_ten_times_the_p99_and_capped_by_the_transport() -> None:
    d = StepDeadline()
    for i in range(100):
        d.observe(1, 0.2 if i == 50 else 0.1)  # one slow step in 64 recent ones is the p99
    assert abs(d.deadline_s(1, 30.0) - 2.0) < 1e-9
    for _ in range(64):
        d.observe(1, 5.0)  # a peer that became slow: the window follows it
    assert d.deadline_s(1, 30.0) == 30.0
