"""Server-to-server push on the in-process swarm: peers hand hidden states to the next peer.

Output stays token-identical to the local model; a peer that cannot reach its successor falls back
to answering the client; failover mid-generation keeps every token; and a peer that is not a
session's predecessor cannot push into it.
"""

from __future__ import annotations

import asyncio

import torch

from peerd.client import Speculation
from peerd.model.local import LocalModel
from protocols import PROTOCOL_VERSION, ErrorCode, Hello, InferencePush
from tests.helpers.raw_stream import error_code, exchange, frames, zero_hidden
from tests.helpers.swarm import MODEL_ID, generate_through_a_crash

PROMPT = [7, 1, 8, 2, 8, 1, 8]


def _pushes(swarm, outcome: str) -> float:
    """Pushes with ``outcome`` ("ok" or "fell_back") counted by every peer of ``swarm``."""
    return sum(p.metrics.requests.labels(rpc="push_out", outcome=outcome)._value.get() for p in swarm.peers)


async def test_push_generation_is_token_identical_and_pushes(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    client.push = True
    try:
        expected = local_model.generate_greedy(PROMPT, 24, eos_token_ids=[])
        client.speculation = Speculation(max_draft_tokens=0)
        plain = await client.generate(PROMPT, max_new_tokens=24, stop_on_eos=False)
        client.speculation = Speculation()
        speculative = await client.generate(PROMPT, max_new_tokens=24, stop_on_eos=False)
        assert plain.token_ids == expected
        assert speculative.token_ids == expected
        # every step of both generations went 0 -> 1 -> 2 by push: two pushes per step, none fell back
        assert _pushes(swarm, "ok") >= 2 * (plain.steps + speculative.steps)
        assert _pushes(swarm, "fell_back") == 0
    finally:
        await client.close()


async def test_session_outputs_match_without_push(make_swarm) -> None:
    """Every span's recorded output (what failover replays and spot checks compare) is the same."""
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        outputs = {}
        for push in (False, True):
            client.push = push
            async with client.inference_session(max_length=16) as session:
                await session.step(client.head.embed(torch.tensor([PROMPT])))
                for token in (3, 4, 5):
                    await session.step(client.head.embed(torch.tensor([[token]])))
                outputs[push] = [s.replay_outputs() for s in session.spans]
        for relayed, pushed in zip(outputs[False], outputs[True], strict=True):
            torch.testing.assert_close(pushed, relayed, atol=0, rtol=0)
    finally:
        await client.close()


async def test_unreachable_successor_falls_back_to_the_client(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()

    async def unreachable(peer_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise ConnectionRefusedError(f"no route to {peer_id}")

    swarm.peers[0].servicer.pusher.opener = unreachable  # peer 0 cannot reach peer 1
    client = await swarm.client()
    client.push = True
    try:
        result = await client.generate(PROMPT, max_new_tokens=16, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 16, eos_token_ids=[])
        assert _pushes(swarm, "fell_back") == 1  # tried once, then the session is unlinked there
        assert _pushes(swarm, "ok") >= result.steps  # peer 1 still pushed to peer 2
    finally:
        await client.close()


async def test_failover_mid_generation_with_push(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm([(0, 3), (0, 3), (3, 6)])
    client = await swarm.client()
    client.push = True
    client.speculation = Speculation(max_draft_tokens=0)
    try:
        result, _ = await generate_through_a_crash(swarm, client, PROMPT, max_new_tokens=32, crash_after=12)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 32, eos_token_ids=[])
        # the replacement was linked: it pushed to the tail after the failover
        replacement = next(p for p in swarm.peers if p.peer_id == result.route[0].peer_id)
        assert replacement.metrics.requests.labels(rpc="push_out", outcome="ok")._value.get() > 0
    finally:
        await client.close()


async def test_push_from_a_peer_that_is_not_the_predecessor_is_refused(make_swarm) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    client.push = True
    try:
        async with client.inference_session(max_length=16) as session:
            await session.step(client.head.embed(torch.tensor([PROMPT])))
            target = session.spans[1]
            assert target.stream is not None
            hidden_size = client.head.embed(torch.tensor([[1]])).shape[-1]
            injection = InferencePush(target.stream.session_id, zero_hidden((1, 1, hidden_size)), len(PROMPT), 99)
            hello = Hello(PROTOCOL_VERSION, MODEL_ID)
            # the client itself (a peer id the session does not name as its predecessor) ...
            reply = await exchange(client.p2p, target.span.peer_id, "push", frames(hello, injection))
            assert error_code(reply) == ErrorCode.NOT_ALLOWED
            # ... and a peer of the swarm that is on the route, but not right before this span
            outsider = next(p for p in swarm.peers if p.peer_id == session.spans[2].span.peer_id)
            reply = await exchange(outsider.p2p, target.span.peer_id, "push", frames(hello, injection))
            assert error_code(reply) == ErrorCode.NOT_ALLOWED
            # the session goes on unharmed: nothing was injected into its cache
            out = await session.step(client.head.embed(torch.tensor([[3]])))
            assert session.length == len(PROMPT) + 1 and out.shape[1] == 1
    finally:
        await client.close()


async def test_peer_pushing_other_states_than_it_reports_is_caught(make_swarm, local_model: LocalModel) -> None:
    """A peer that reports true outputs to the client but pushes zeros: the next peer's input digest
    gives it away, the client relays past it (tokens stay exact) and stops it pushing."""
    swarm = await make_swarm()
    liar = swarm.peers[0].servicer.pusher
    honest_push = liar.push

    async def push_zeros(session, hidden, position, step_id):  # type: ignore[no-untyped-def]
        zeros = zero_hidden(tuple(hidden.shape))
        return await honest_push(session, zeros, position, step_id)

    liar.push = push_zeros
    client = await swarm.client()
    client.push = True
    try:
        result = await client.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 12, eos_token_ids=[])
        # caught at the first step and unlinked: it pushed once, then the client relayed its outputs
        assert swarm.peers[0].metrics.requests.labels(rpc="push_out", outcome="ok")._value.get() == 1
        assert swarm.peers[1].peer_id in {s.peer_id for s in result.route}  # the honest successor stays
    finally:
        await client.close()


async def test_peer_claiming_pushes_it_never_sends_is_relayed_past_and_its_successor_kept(
    make_swarm, local_model: LocalModel
) -> None:
    """From its fourth step on, the first peer answers "pushed" and pushes nothing. The client waits
    for the successor's result until the successor's learned step deadline, then relays the step
    itself; the successor answers it, so the predecessor is the one unlinked: no failover, no ban of
    the honest successor, every token exact."""
    swarm = await make_swarm()
    liar = swarm.peers[0].servicer.pusher
    honest_push, calls = liar.push, []

    async def claim_only(session, hidden, position, step_id):  # type: ignore[no-untyped-def]
        if session.link is None or not session.link.next_peer:
            return False  # unlinked: it answers the client, as an honest peer does
        calls.append(step_id)
        if len(calls) <= 3:
            return await honest_push(session, hidden, position, step_id)
        return True  # "pushed", but nothing was sent

    liar.push = claim_only
    client = await swarm.client()
    client.push = True
    client.speculation = Speculation(max_draft_tokens=0)  # one step per token: the 4th step is known
    try:
        result = await client.generate(PROMPT, max_new_tokens=12, stop_on_eos=False)
        assert result.token_ids == local_model.generate_greedy(PROMPT, 12, eos_token_ids=[])
        assert len(calls) == 4  # it lied once, then it was unlinked and the client relayed its outputs
        successor = swarm.peers[1].peer_id
        assert successor in {s.peer_id for s in result.route}  # no failover of the honest successor
        assert successor not in client.router.banned()
        assert result.stalls_s == []  # the wait was the successor's step deadline, not a failover
    finally:
        await client.close()
