"""InferenceSession on an in-memory transport: failover with replay, and rewind after a spot check."""

from __future__ import annotations

import asyncio

import pytest
import torch

from peerd.client.router import Router
from peerd.client.session import InferenceSession
from peerd.client.verify import SpotChecker
from peerd.rpc.errors import NoRouteError, PeerError
from protocols import ErrorCode
from tests.helpers.fake_swarm import HIDDEN, MODEL_ID, FakeDHT, FakePeer, FakeTransport, record, reference

NUM_BLOCKS = 4


def setup(peers: list[FakePeer], *, checker_rate: float = 0.0) -> tuple[Router, FakeTransport, SpotChecker]:
    transport, dht = FakeTransport(peers, NUM_BLOCKS), FakeDHT(peers, NUM_BLOCKS)
    router = Router(dht, transport, model_id=MODEL_ID, num_blocks=NUM_BLOCKS)  # type: ignore[arg-type]
    checker = SpotChecker(router, transport, rate=checker_rate)  # type: ignore[arg-type]
    return router, transport, checker


def session(router: Router, transport: FakeTransport, checker: SpotChecker | None = None) -> InferenceSession:
    return InferenceSession(
        router,
        transport,
        max_length=16,
        failover_timeout_s=1.0,
        checker=checker,  # type: ignore[arg-type]
    )


STEPS = [torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(0))] + [
    torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(i)) for i in range(1, 5)
]
EXPECTED = reference(torch.cat(STEPS, dim=1), 0, NUM_BLOCKS)


async def run(s: InferenceSession) -> torch.Tensor:
    async with s:
        return torch.cat([await s.step(x) for x in STEPS], dim=1)


async def test_a_peer_dying_mid_session_is_replaced_and_the_output_is_unchanged() -> None:
    fast = FakePeer(record("fast", 0, 4, tps=1000.0), fail_after_steps=2)
    router, transport, _ = setup([fast, FakePeer(record("slow", 0, 4))])
    s = session(router, transport)
    torch.testing.assert_close(await run(s), EXPECTED)
    assert transport.opened == ["fast", "slow"]
    assert [span.peer_id for span in s.route] == ["slow"] and len(s.stalls_s) == 1
    assert "fast" in router.banned()


@pytest.mark.parametrize("code", [ErrorCode.BLOCKS_NOT_SERVED, ErrorCode.WRONG_MODEL, ErrorCode.CACHE_FULL])
async def test_a_peer_that_cannot_serve_is_routed_around(code: ErrorCode) -> None:
    moved = FakePeer(record("moved", 0, 4, tps=1000.0), error=code)
    router, transport, _ = setup([moved, FakePeer(record("other", 0, 4))])
    torch.testing.assert_close(await run(session(router, transport)), EXPECTED)
    if code is ErrorCode.CACHE_FULL:  # full is not failing: counted full until its next announce
        assert "moved" not in router.banned() and router.cache_book.taken()["moved"] > 1e9
    else:
        assert "moved" in router.banned()


async def test_a_span_refused_at_open_makes_the_whole_route_planned_again() -> None:
    """Every hop costs 20 ms. Blocks 0:2 on `a` and 2:4 on `b` are the fastest route (42 ms by the
    planner's costs, against 46.7 for `c` alone); `b` is full. Replacing only b's blocks would keep
    `a` and add `c` for 2:4 (54.3 ms); planned again whole, the route is `c` alone, and a's session
    is closed again."""

    class SameRtt:  # every peer measured at 20 ms, once
        background = None

        async def rtts_ms(self, peer_ids: list[str], *, stale_in_background: bool = False) -> dict[str, float]:
            return dict.fromkeys(peer_ids, 20.0)

        def measured_at(self, peer_id: str) -> float:
            return 1.0

    a = FakePeer(record("a", 0, 2, tps=2000.0))
    b = FakePeer(record("b", 2, 4, tps=2000.0), error=ErrorCode.CACHE_FULL)
    c = FakePeer(record("c", 0, 4, tps=150.0))
    transport, dht = FakeTransport([a, b, c], NUM_BLOCKS), FakeDHT([a, b, c], NUM_BLOCKS)
    router = Router(dht, transport, model_id=MODEL_ID, num_blocks=NUM_BLOCKS, route_spread=0.0, rtt=SameRtt())  # type: ignore[arg-type]
    s = session(router, transport)
    torch.testing.assert_close(await run(s), EXPECTED)
    assert [span.peer_id for span in s.route] == ["c"]
    assert transport.opened == ["a", "c"]  # b refused its session
    assert "b" not in router.banned() and router.cache_book.taken()["b"] > 1e9  # full, not failing
    assert "a" not in router.cache_book.taken()  # a's reservation went with its closed session


async def test_a_request_the_peer_rejects_as_malformed_is_raised_not_retried() -> None:
    router, transport, _ = setup([FakePeer(record("strict", 0, 4), error=ErrorCode.WRONG_SHAPE)])
    with pytest.raises(PeerError) as info:
        await run(session(router, transport))
    assert info.value.code is ErrorCode.WRONG_SHAPE
    assert router.banned() == set()


async def test_a_spot_check_that_catches_a_liar_rewinds_to_its_first_wrong_output() -> None:
    liar = FakePeer(record("liar", 0, 4, tps=1000.0), lie=lambda out: out + 1.0)
    honest = [FakePeer(record(f"honest{i}", 0, 4)) for i in range(2)]
    router, transport, checker = setup([liar, *honest], checker_rate=1.0)
    checks = iter([False, False, True])  # the liar's first two answers reach the caller unchecked
    checker.should_check = lambda first=False: next(checks, False)  # type: ignore[method-assign]
    s = session(router, transport, checker)
    async with s:
        outs = [await s.step(x) for x in STEPS[:3]]
        correction = s.take_correction()
        assert correction is not None
        first, corrected = correction
        assert first == 0  # it lied from the first step on
        torch.testing.assert_close(corrected, reference(torch.cat(STEPS[:3], dim=1), 0, NUM_BLOCKS))
        torch.testing.assert_close(outs[2], corrected[:, -1:])  # the step's own answer is the corrected one
        assert s.take_correction() is None  # taken once
        rest = [await s.step(x) for x in STEPS[3:]]
    torch.testing.assert_close(torch.cat(rest, dim=1), EXPECTED[:, -2:])
    assert "liar" in router.banned() and "liar" not in {span.peer_id for span in s.route}
    assert [i.verdict for i in checker.incidents] == ["lied"] and checker.incidents[0].peer_ids == ("liar",)


@pytest.mark.parametrize("replica", [False, True])
async def test_a_slow_step_fails_over_only_where_another_peer_serves_the_blocks(replica: bool) -> None:
    """The 5th step (3 decode steps measured, deadline 1 s) is answered after 1.5 s: a lone peer is
    waited for (failing over could not help, and would end the session); with a replica in the view,
    the session moves to it at the step deadline."""
    slow = FakePeer(record("slow", 0, 4, tps=1000.0), pauses_s={4: 1.5})
    router, transport, _ = setup([slow, FakePeer(record("other", 0, 4))] if replica else [slow])
    s = session(router, transport)
    torch.testing.assert_close(await run(s), EXPECTED)
    if replica:
        assert transport.opened == ["slow", "other"] and len(s.stalls_s) == 1 and "slow" in router.banned()
    else:
        assert transport.opened == ["slow"] and s.stalls_s == [] and not router.banned()


async def test_a_peer_that_stops_answering_is_left_after_its_step_deadline_not_the_read_timeout() -> None:
    """The hung peer answers 3 decode steps, then nothing: the session fails over after
    max(1 s, 10 x p99) of its measured steps (1 s here), far before the 30 s read deadline."""
    hung = FakePeer(record("hung", 0, 4, tps=1000.0), hang_after_steps=4)
    router, transport, _ = setup([hung, FakePeer(record("other", 0, 4))])
    s = session(router, transport)
    loop = asyncio.get_running_loop()
    started = loop.time()
    torch.testing.assert_close(await run(s), EXPECTED)
    assert loop.time() - started < transport.timeout_s / 3
    assert [span.peer_id for span in s.route] == ["other"] and len(s.stalls_s) == 1
    assert "hung" in router.banned()


async def test_the_spans_of_a_route_are_opened_all_at_once() -> None:
    """Over long links each open is a round trip: three spans opened one after another took three."""
    peers = [FakePeer(record(p, a, b), open_delay_s=0.05) for p, a, b in [("a", 0, 1), ("b", 1, 3), ("c", 3, 4)]]
    router, transport, _ = setup(peers)
    torch.testing.assert_close(await run(session(router, transport)), EXPECTED)
    assert sorted(transport.opened) == ["a", "b", "c"] and transport.most_opening == 3
    assert transport.confirms == [False] * 3  # the peers' answers are read with the first results


async def test_a_session_refused_at_its_first_step_names_the_blocks_nobody_else_serves() -> None:
    router, transport, _ = setup([FakePeer(record("moved", 0, 4), error=ErrorCode.BLOCKS_NOT_SERVED)])
    s = InferenceSession(router, transport, max_length=16, failover_timeout_s=0.3)  # type: ignore[arg-type]
    with pytest.raises(NoRouteError, match="no live peer serves block"):
        await run(s)
    assert len(transport.streams) == 1 and transport.streams[0].closed and "moved" in router.banned()


async def test_an_open_cancelled_midway_closes_the_streams_that_did_open() -> None:
    quick, slow = FakePeer(record("quick", 0, 2)), FakePeer(record("slow", 2, 4), open_delay_s=10.0)
    router, transport, _ = setup([quick, slow])
    opening = asyncio.ensure_future(session(router, transport).open())
    await asyncio.sleep(0.05)
    assert transport.opened == ["quick"]  # slow is still opening
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert [s.closed for s in transport.streams] == [True]
    assert "quick" not in router.cache_book.taken()  # its reservation went with the session
