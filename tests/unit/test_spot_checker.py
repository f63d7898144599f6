"""SpotChecker on an in-memory swarm: second opinions, a third to judge, bans for liars."""

from __future__ import annotations

import random

import torch

from peerd.client.disputes import DisputeLedger
from peerd.client.router import Router
from peerd.client.routing import Span
from peerd.client.verify import SpotChecker
from peerd.config import DEFAULT_SPOT_CHECK_RATE
from tests.helpers.fake_swarm import HIDDEN, MODEL_ID, FakeDHT, FakePeer, FakeTransport, record, reference

X = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))


def checker_for(peers: list[FakePeer]) -> tuple[SpotChecker, Router]:
    transport, dht = FakeTransport(peers, 4), FakeDHT(peers, 4)
    router = Router(dht, transport, model_id=MODEL_ID, num_blocks=4)  # type: ignore[arg-type]
    return SpotChecker(router, transport, rate=1.0, rng=random.Random(0)), router  # type: ignore[arg-type]


def span(peer: FakePeer) -> Span:
    return Span(peer.peer_id, 0, 4, peer.record)


async def test_an_honest_answer_stands() -> None:
    a, b = FakePeer(record("a", 0, 4)), FakePeer(record("b", 0, 4))
    checker, router = checker_for([a, b])
    verdict = await checker.verify(span(a), X, reference(X, 0, 4))
    assert verdict.checked and not verdict.span_peer_wrong and verdict.incident is None
    assert b.forwards == 1 and router.banned() == set()


async def test_without_a_second_opinion_nothing_is_checked() -> None:
    a = FakePeer(record("a", 0, 4))
    checker, _ = checker_for([a])
    verdict = await checker.verify(span(a), X, reference(X, 0, 4) + 1.0)
    assert not verdict.checked and not verdict.span_peer_wrong and checker.incidents == []


async def test_a_liar_is_outvoted_and_banned() -> None:
    liar = FakePeer(record("liar", 0, 4))
    checker, router = checker_for([liar, FakePeer(record("b", 0, 4)), FakePeer(record("c", 0, 4))])
    wrong = reference(X, 0, 4)
    wrong[:, 3:] += 1.0  # right for positions 0..2, wrong from 3 on
    verdict = await checker.verify(span(liar), X, wrong)
    assert verdict.span_peer_wrong and verdict.first_bad_position == 3
    assert verdict.incident is not None and verdict.incident.verdict == "lied" and verdict.incident.judge == "peers"
    assert router.banned() == {"liar"}


async def test_a_check_reads_no_dht_it_uses_the_last_view() -> None:
    a, b = FakePeer(record("a", 0, 4)), FakePeer(record("b", 0, 4))
    checker, router = checker_for([a, b])
    await router.servers(refresh=True)
    reads = router.dht.reads  # type: ignore[attr-defined]
    verdict = await checker.verify(span(a), X, reference(X, 0, 4))
    assert verdict.checked and router.dht.reads == reads  # type: ignore[attr-defined]


async def test_two_opinions_and_no_judge_leave_both_peers_out() -> None:
    liar, other = FakePeer(record("liar", 0, 4)), FakePeer(record("other", 0, 4))
    checker, router = checker_for([liar, other])
    verdict = await checker.verify(span(liar), X, reference(X, 0, 4) + 1.0)
    assert verdict.span_peer_wrong and verdict.incident is not None and verdict.incident.verdict == "unresolved"
    assert router.banned() == {"liar", "other"}


async def test_repeated_disagreement_with_independent_peers_bans_the_odd_one_out() -> None:
    # No third opinion at either check: the liar disputes first with `a`, then (a leaves, b joins)
    # with `b`. Two disjoint peers that disputed with nobody else agree against it: it is banned
    # as a liar, and the short bans its disputes cost the honest peers are lifted.
    liar, a, b = FakePeer(record("liar", 0, 4)), FakePeer(record("a", 0, 4)), FakePeer(record("b", 0, 4))
    transport, dht = FakeTransport([liar, a, b], 4), FakeDHT([liar, a], 4)
    router = Router(dht, transport, model_id=MODEL_ID, num_blocks=4)  # type: ignore[arg-type]
    checker = SpotChecker(router, transport, rate=1.0, rng=random.Random(0))  # type: ignore[arg-type]
    first = await checker.verify(span(liar), X, reference(X, 0, 4) + 1.0)
    assert first.span_peer_wrong and first.incident is not None and first.incident.verdict == "unresolved"
    dht.peers = [liar, b]
    await router.servers(refresh=True)  # the client's next plan reads the DHT (checks use that view)
    router.bans.forgive("liar")  # its short ban ran out: it is routed to again
    second = await checker.verify(span(liar), X, reference(X, 0, 4) + 1.0)
    assert second.span_peer_wrong and second.incident is not None
    assert (second.incident.verdict, second.incident.judge, second.incident.peer_ids) == ("lied", "disputes", ("liar",))
    assert router.banned() == {"liar"}


async def test_the_same_two_peers_disputing_again_convict_nobody() -> None:
    liar, other = FakePeer(record("liar", 0, 4)), FakePeer(record("other", 0, 4))
    checker, router = checker_for([liar, other])
    for _ in range(3):
        router.bans.forgive("liar")
        router.bans.forgive("other")
        verdict = await checker.verify(span(liar), X, reference(X, 0, 4) + 1.0)
        assert verdict.incident is not None and verdict.incident.verdict == "unresolved"  # symmetric: no evidence


def test_a_peer_that_agreed_with_another_is_never_the_odd_one_out() -> None:
    # two independent liars each dispute an honest peer that earlier agreed with a third peer
    ledger = DisputeLedger()
    ledger.agreed(["honest", "witness"])
    assert ledger.disputed("liar1", ["honest"]) is None
    assert ledger.disputed("liar2", ["honest"]) is None
    # honest disputed with two peers, so it is no clean witness against either; but a liar that
    # disputes two more disjoint chains is named, and all its counterparts are cleared
    assert ledger.disputed("liar1", ["c", "d"]) is None
    assert ledger.disputed("e", ["liar1"]) == ("liar1", frozenset({"honest", "c", "d", "e"}))
    assert ledger.disputes_of("e") == 0 and ledger.disputes_of("honest") == 1  # still disputes liar2


def test_checks_are_on_by_default_first_answers_always_then_the_rate() -> None:
    router = Router(FakeDHT([], 4), FakeTransport([], 4), model_id=MODEL_ID, num_blocks=4)  # type: ignore[arg-type]
    checker = SpotChecker(router, FakeTransport([], 4), rng=random.Random(1))  # type: ignore[arg-type]
    assert checker.rate == DEFAULT_SPOT_CHECK_RATE == 0.02 and checker.check_first
    assert checker.should_check(first=True)
    later = sum(checker.should_check() for _ in range(10_000))
    assert 100 < later < 300  # about 2% of later steps
    assert checker.should_check_forward("p") and checker.should_check_forward("q")  # each peer's first forward
    off = SpotChecker(router, FakeTransport([], 4), rate=0.0)  # type: ignore[arg-type]
    assert not off.should_check(first=True) and not off.should_check_forward("p")
