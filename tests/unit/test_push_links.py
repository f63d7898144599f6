"""The links a client sends along a route (client/pushing.py) and who may push (server/push.py)."""

from __future__ import annotations

import asyncio

import pytest

from peerd.client.pushing import route_links
from peerd.server.push import PushLink, accept_push, link_of
from protocols import ErrorCode, InferenceLink, InferencePush, InferenceStep, ProtocolError, encode_array

PEERS = ["QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmQusTXc1Z9C1mzxsqC9ZTFXCgSkpBRGgW4Jk2QYHxKE22"]


class _Stream:
    def __init__(self, session_id: bytes) -> None:
        self.session_id = session_id


def test_route_links_name_neighbours_and_skip_unlinked_peers() -> None:
    hops = [("a", _Stream(b"1")), ("b", _Stream(b"2")), ("c", _Stream(b"3"))]
    assert route_links(hops, set()) == [("", "b", b"2"), ("a", "c", b"3"), ("b", "", b"")]  # type: ignore[arg-type]
    # b is not trusted to push: nobody after it is linked as its target, but it may be pushed into
    assert route_links(hops, {"b"}) == [("", "b", b"2"), ("a", "", b""), ("b", "", b"")]  # type: ignore[arg-type]
    # a hop without a stream (failing over) is neither pushed to nor named as a predecessor
    hops[1] = ("b", None)  # type: ignore[assignment]
    assert route_links(hops, set()) == [("", "", b""), ("a", "c", b"3"), ("", "", b"")]  # type: ignore[arg-type]


def test_link_of_refuses_what_is_not_a_peer_id() -> None:
    assert link_of(InferenceLink(PEERS[0], PEERS[1], b"s")) == PushLink(PEERS[0], PEERS[1], b"s")
    with pytest.raises(ProtocolError) as info:
        link_of(InferenceLink("not a peer id"))
    assert info.value.code == ErrorCode.INVALID_MESSAGE


def _session(link: PushLink | None):  # type: ignore[no-untyped-def]
    from peerd.server.sessions import ServerSession

    return ServerSession(b"sid", "client", 0, 2, 1, 16, cache=None, reserved_tokens=0, link=link)  # type: ignore[arg-type]


def test_accept_push_only_from_the_linked_predecessor() -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())  # ServerSession holds an asyncio.Lock
    push = InferencePush(b"sid", encode_array(__import__("numpy").zeros((1, 1, 4), dtype="float32")), 0, 1)
    linked = _session(PushLink(prev_peer=PEERS[0]))
    sessions = {b"sid": linked}
    assert accept_push(push, PEERS[0], sessions, None) is linked
    for owner, table, bound in (
        (PEERS[1], sessions, None),  # not the predecessor
        (PEERS[0], {}, None),  # no such session: the same answer
        (PEERS[0], {b"sid": _session(None)}, None),  # its client never linked it
        (PEERS[0], sessions, _session(PushLink(prev_peer=PEERS[0]))),  # the stream serves another session
    ):
        with pytest.raises(ProtocolError) as info:
            accept_push(push, owner, table, bound)
        assert info.value.code == ErrorCode.NOT_ALLOWED
    linked.push_from = PEERS[0]  # a second stream from the same predecessor
    with pytest.raises(ProtocolError):
        accept_push(push, PEERS[0], sessions, None)
    with pytest.raises(ProtocolError) as info:
        accept_push(InferenceStep(push.hidden, 0, 1), PEERS[0], sessions, None)
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_push_pays_on_far_routes_only() -> None:
    from peerd.client.pushing import PUSH_MIN_RTT_MS, push_pays

    assert not push_pays([0.4, 0.5, 0.6])  # loopback / LAN: each peer writing twice costs more than it saves
    assert push_pays([25.0, 40.0, 80.0])  # the internet: a client round trip less per hop
    assert push_pays([1.0, PUSH_MIN_RTT_MS, 50.0])  # the median decides
    assert not push_pays([1.0, 2.0, 500.0])  # one far peer does not make the route far
    assert push_pays([None, None, 1.0])  # not measured yet: assume the internet
    assert not push_pays([])
