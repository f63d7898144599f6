"""Telling apart why no route exists: no peer, a request too large for the swarm, or a busy swarm
(the distinct client errors a user acts on differently), and a prompt that is not UTF-8 text."""

from __future__ import annotations

import dataclasses

import pytest

from peerd.client.shortfall import explain_no_route, longest_session
from peerd.model.chat import PromptTextError, check_text
from peerd.rpc.errors import NoRouteError, RequestTooLargeError, SwarmBusyError
from peerd.swarm.records import PeerState, ServerRecord


def rec(peer: str, start: int, end: int, *, free: int, cap: int = 2048, max_len: int = 2048) -> ServerRecord:
    return ServerRecord(
        peer_id=peer, state=PeerState.ONLINE, start=start, end=end, decode_tokens_per_s=100.0,
        prefill_tokens_per_s=1000.0, device="cpu", memory_total_bytes=1, memory_free_bytes=1, dtype="float32",
        cache_tokens_free=free, protocol_version=(1, 0), package_version="0", public_name=peer,
        session_tokens_max=cap, max_session_length=max_len,
    )  # fmt: skip


def swarm(*records: ServerRecord) -> dict[str, ServerRecord]:
    return {r.peer_id: r for r in records}


def test_a_block_nobody_serves_is_a_plain_no_route() -> None:
    why = explain_no_route(swarm(rec("a", 0, 4, free=8192)), 0, 6, max_length=100)
    assert type(why) is NoRouteError and why.missing_blocks == [4, 5]
    assert "no live peer serves block(s) 4:6" in str(why)


def test_banned_peers_do_not_count_as_serving() -> None:
    why = explain_no_route(swarm(rec("a", 0, 6, free=8192)), 0, 6, max_length=100, banned={"a"})
    assert type(why) is NoRouteError and why.missing_blocks == list(range(6))


def test_over_every_peers_session_cap_is_too_large_and_names_the_swarms_limit() -> None:
    records = swarm(rec("a", 0, 3, free=8192, cap=2048), rec("b", 3, 6, free=8192, cap=1024, max_len=4096),
                    rec("c", 3, 6, free=8192, cap=4096, max_len=1536))  # fmt: skip
    why = explain_no_route(records, 0, 6, max_length=3000)
    assert isinstance(why, RequestTooLargeError) and not isinstance(why, NoRouteError)
    # a takes 2048 at most; b 1024 (its cap), c 1536 (its length): the swarm's limit is the least of
    # each block's best peer, 2048 for 0:3 and 1536 for 3:6
    assert why.limit_tokens == 1536 and why.needed_tokens == 3000
    assert "lower --max-new-tokens" in str(why)


def test_batch_divides_the_per_session_cap() -> None:
    record = rec("a", 0, 6, free=8192, cap=2048, max_len=2048)
    assert longest_session(record, 1) == 2048 and longest_session(record, 4) == 512
    why = explain_no_route(swarm(record), 0, 6, max_length=600, batch_size=4)
    assert isinstance(why, RequestTooLargeError) and why.limit_tokens == 512


def test_room_in_principle_but_not_now_is_busy_and_still_a_no_route_to_wait_on() -> None:
    records = swarm(rec("a", 0, 6, free=100), rec("b", 0, 6, free=300))
    why = explain_no_route(records, 0, 6, max_length=500, reserved_tokens={"b": 50})
    assert isinstance(why, SwarmBusyError) and isinstance(why, NoRouteError)
    assert why.needed_tokens == 500 and why.most_free_tokens == 250
    assert "retry in a moment" in str(why) and "0:6" in str(why)


def test_peers_that_do_not_publish_limits_are_never_called_too_small() -> None:
    old = dataclasses.replace(rec("a", 0, 6, free=100), session_tokens_max=0, max_session_length=0)
    assert longest_session(old, 1) is None
    assert isinstance(explain_no_route(swarm(old), 0, 6, max_length=100_000), SwarmBusyError)


def test_session_limits_round_trip_through_the_record_wire_form() -> None:
    record = rec("a", 0, 6, free=10, cap=1234, max_len=567)
    back = ServerRecord.from_wire(record.to_wire())
    assert (back.session_tokens_max, back.max_session_length) == (1234, 567)
    older = {k: v for k, v in record.to_wire().items() if k not in ("sess_max", "max_len")}
    assert ServerRecord.from_wire(older).session_tokens_max == 0
    for bad in (-1, True, 1.5, 1 << 41):
        with pytest.raises(ValueError):
            ServerRecord.from_wire({**record.to_wire(), "sess_max": bad})


@pytest.mark.parametrize(
    ("text", "detail"),
    [("caf\udce9 au lait", "byte 0xe9 at character 3"), ("x\ud800", "lone surrogate U+D800 at character 1")],
)
def test_a_prompt_that_is_not_utf8_is_named_with_where(text: str, detail: str) -> None:
    with pytest.raises(PromptTextError) as info:
        check_text(text)
    assert detail in str(info.value) and "not valid UTF-8" in str(info.value)
    check_text("café au lait, 東京")  # real text passes


def test_a_peer_banned_for_being_full_is_busy_not_missing() -> None:
    records = swarm(rec("a", 0, 6, free=8192))
    why = explain_no_route(records, 0, 6, max_length=100, banned={"a"}, full={"a"})
    assert isinstance(why, SwarmBusyError) and why.most_free_tokens == 0
