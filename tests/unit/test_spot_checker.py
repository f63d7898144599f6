"""SpotChecker on an in-memory swarm: second opinions, a third to judge, bans for liars."""

from __future__ import annotations

import random

import torch

from peerd.client.router import Router
from peerd.client.routing import Span
from peerd.client.verify import SpotChecker
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


async def test_two_opinions_and_no_judge_leave_both_peers_out() -> None:
    liar, other = FakePeer(record("liar", 0, 4)), FakePeer(record("other", 0, 4))
    checker, router = checker_for([liar, other])
    verdict = await checker.verify(span(liar), X, reference(X, 0, 4) + 1.0)
    assert verdict.span_peer_wrong and verdict.incident is not None and verdict.incident.verdict == "unresolved"
    assert router.banned() == {"liar", "other"}
