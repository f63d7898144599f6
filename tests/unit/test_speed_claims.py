"""SpeedBook: unmeasured claims are capped at a few times the median claim; measured peers are planned by what
was seen; a peer far under its claim is overclaiming."""

from __future__ import annotations

from peerd.client.claims import CLAIM_CAP_FACTOR, MIN_SAMPLES, SpeedBook
from tests.helpers.fake_swarm import record


def test_claims_are_capped_until_measured_then_replaced_by_observations() -> None:
    records = {p: record(p, 0, 4, tps=tps) for p, tps in [("a", 100.0), ("b", 200.0), ("liar", 1e9)]}
    book = SpeedBook()
    assert book.planning_speeds(records) == {"a": 100.0, "b": 200.0, "liar": CLAIM_CAP_FACTOR * 200.0}
    for _ in range(MIN_SAMPLES - 1):
        book.observe("liar", blocks=4, tokens=1, elapsed_s=1.0)
    assert book.observed("liar") is None and not book.overclaims(records["liar"])  # too few samples
    book.observe("liar", blocks=4, tokens=1, elapsed_s=1.0)
    assert book.observed("liar") == 4.0 and book.planning_speeds(records)["liar"] == 4.0
    assert book.overclaims(records["liar"])
    for _ in range(MIN_SAMPLES):
        book.observe("a", blocks=4, tokens=1, elapsed_s=0.1)  # 40/s against a claim of 100: honest noise
    assert not book.overclaims(records["a"])
    assert book.claimed_vs_observed(records)["a"] == (100.0, 40.0)
