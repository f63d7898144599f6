"""The handlers' request checks, called directly: each refusal carries the right error code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from peerd.server.limits import Limits
from peerd.server.validation import check_hello, check_hidden, check_open, check_range, check_step
from protocols import PROTOCOL_VERSION, ErrorCode, Hello, InferenceOpen, InfoRequest, ProtocolError

STAGE = SimpleNamespace(start=2, end=6, config=SimpleNamespace(hidden_size=8))
LIMITS = Limits(
    max_frame_bytes=1 << 20,
    max_batch_tokens=16,
    max_session_length=10,
    max_sessions=3,
    request_timeout_s=1.0,
    session_idle_timeout_s=1.0,
    max_sessions_per_peer=2,
)


def code_of(call, *args, **kwargs) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    return info.value.code


def test_hello_must_name_our_model_and_major_version() -> None:
    check_hello(Hello(PROTOCOL_VERSION, "m", "client"), "m")
    assert code_of(check_hello, Hello(PROTOCOL_VERSION, "other", "client"), "m") is ErrorCode.WRONG_MODEL
    newer = (PROTOCOL_VERSION[0] + 1, 0)
    assert code_of(check_hello, Hello(newer, "m", "client"), "m") is ErrorCode.UNSUPPORTED_VERSION
    assert code_of(check_hello, InfoRequest(), "m") is ErrorCode.UNEXPECTED_MESSAGE


def test_only_hosted_blocks_are_served() -> None:
    check_range(STAGE, 2, 6)  # type: ignore[arg-type]
    check_range(STAGE, 3, 4)  # type: ignore[arg-type]
    assert code_of(check_range, STAGE, 0, 4) is ErrorCode.BLOCKS_NOT_SERVED
    assert code_of(check_range, STAGE, 4, 7) is ErrorCode.BLOCKS_NOT_SERVED


@pytest.mark.parametrize(
    ("hidden", "code"),
    [
        (torch.zeros(1, 2, 8, dtype=torch.int64), ErrorCode.WRONG_DTYPE),
        (torch.zeros(1, 2, 7), ErrorCode.WRONG_SHAPE),
        (torch.zeros(2, 8), ErrorCode.WRONG_SHAPE),
        (torch.zeros(1, 0, 8), ErrorCode.WRONG_SHAPE),
        (torch.zeros(4, 5, 8), ErrorCode.REQUEST_TOO_LARGE),
        (torch.zeros(1, 11, 8), ErrorCode.SESSION_TOO_LONG),
    ],
)
def test_hidden_states_are_checked_before_compute(hidden: torch.Tensor, code: ErrorCode) -> None:
    assert code_of(check_hidden, hidden, STAGE, LIMITS) is code


def test_a_session_step_must_match_its_batch() -> None:
    check_hidden(torch.zeros(2, 3, 8), STAGE, LIMITS, batch_size=2)  # type: ignore[arg-type]
    assert code_of(check_hidden, torch.zeros(1, 3, 8), STAGE, LIMITS, batch_size=2) is ErrorCode.WRONG_SHAPE


def test_sessions_are_admitted_within_the_limits() -> None:
    request = InferenceOpen(b"s" * 16, 2, 6, 10, 1)
    check_open(request, LIMITS, open_sessions=2, owner_sessions=1)
    assert code_of(check_open, request, LIMITS, open_sessions=3, owner_sessions=0) is ErrorCode.TOO_MANY_SESSIONS
    assert code_of(check_open, request, LIMITS, open_sessions=2, owner_sessions=2) is ErrorCode.TOO_MANY_SESSIONS
    too_long = InferenceOpen(b"s" * 16, 2, 6, 11, 1)
    assert code_of(check_open, too_long, LIMITS, open_sessions=0, owner_sessions=0) is ErrorCode.SESSION_TOO_LONG


def test_steps_may_rewind_but_never_leave_a_hole_or_overflow() -> None:
    check_step(0, 3, length=5, max_length=10)  # a rewind
    check_step(5, 5, length=5, max_length=10)
    assert code_of(check_step, 6, 1, length=5, max_length=10) is ErrorCode.INVALID_MESSAGE
    assert code_of(check_step, 5, 6, length=5, max_length=10) is ErrorCode.SESSION_TOO_LONG
