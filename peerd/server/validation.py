"""Checks of a client's request, all made before any compute; each failure is a typed ProtocolError.

Pure functions of the request and what this peer serves, so they are tested directly
(tests/unit/test_server_validation.py) as well as through the handlers and the fuzzer.
"""

from __future__ import annotations

import torch

from peerd.model.stage import Stage
from peerd.server.limits import Limits
from protocols import PROTOCOL_VERSION, ErrorCode, Hello, InferenceOpen, Message, ProtocolError

__all__ = [
    "FLOAT_DTYPES",
    "check_grad_output",
    "check_hello",
    "check_hidden",
    "check_open",
    "check_range",
    "check_step",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_hello(hello: Message, model_id: str) -> None:
    """The first message of every stream: a Hello for our protocol major version and model."""
    if not isinstance(hello, Hello):
        raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"expected hello, got {type(hello).__name__}")
    if hello.protocol_version[0] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"client speaks protocol {hello.protocol_version}, this peer {PROTOCOL_VERSION}",
        )
    if hello.model_id != model_id:
        raise ProtocolError(ErrorCode.WRONG_MODEL, f"this peer serves {model_id!r}, not {hello.model_id!r}")


def check_range(stage: Stage, start: int, end: int) -> None:
    """Blocks [start, end) must be a non-empty part of what ``stage`` hosts."""
    if not (stage.start <= start < end <= stage.end):
        raise ProtocolError(
            ErrorCode.BLOCKS_NOT_SERVED,
            f"blocks {start}:{end} requested, this peer serves {stage.start}:{stage.end}",
        )


def check_hidden(hidden: torch.Tensor, stage: Stage, limits: Limits, *, batch_size: int | None = None) -> None:
    """Hidden states must be float [batch, tokens, hidden_size], within this peer's size limits."""
    if hidden.dtype not in FLOAT_DTYPES:
        raise ProtocolError(ErrorCode.WRONG_DTYPE, f"hidden states must be float, got {hidden.dtype}")
    hidden_size = stage.config.hidden_size
    if hidden.ndim != 3 or hidden.shape[2] != hidden_size or hidden.shape[1] == 0 or hidden.shape[0] == 0:
        raise ProtocolError(
            ErrorCode.WRONG_SHAPE,
            f"hidden states must be [batch, tokens, {hidden_size}] with batch, tokens >= 1, got {list(hidden.shape)}",
        )
    if batch_size is not None and hidden.shape[0] != batch_size:
        raise ProtocolError(ErrorCode.WRONG_SHAPE, f"session batch is {batch_size}, step has batch {hidden.shape[0]}")
    if hidden.shape[0] * hidden.shape[1] > limits.max_batch_tokens:
        raise ProtocolError(
            ErrorCode.REQUEST_TOO_LARGE,
            f"batch x tokens = {hidden.shape[0] * hidden.shape[1]} over this peer's limit "
            f"{limits.max_batch_tokens}; split the request",
        )
    if hidden.shape[1] > limits.max_session_length:
        raise ProtocolError(
            ErrorCode.SESSION_TOO_LONG,
            f"{hidden.shape[1]} tokens over this peer's max length {limits.max_session_length}",
        )


def check_grad_output(grad_output: torch.Tensor, hidden: torch.Tensor) -> None:
    """A backward request's gradient must be a float tensor shaped like its hidden states."""
    if grad_output.shape != hidden.shape or grad_output.dtype not in FLOAT_DTYPES:
        raise ProtocolError(
            ErrorCode.WRONG_SHAPE,
            f"grad_output must be a float tensor shaped like hidden {list(hidden.shape)}, "
            f"got {grad_output.dtype} {list(grad_output.shape)}",
        )


def check_open(request: InferenceOpen, limits: Limits, *, open_sessions: int, owner_sessions: int) -> None:
    """A session's size and the session counts (all, and the client's own) before it is admitted."""
    if not 1 <= request.max_length <= limits.max_session_length:
        raise ProtocolError(
            ErrorCode.SESSION_TOO_LONG,
            f"max_length {request.max_length} outside 1..{limits.max_session_length}",
        )
    if not request.batch_size * request.max_length >= 1 or request.batch_size < 1:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "batch_size must be >= 1")
    if open_sessions >= limits.max_sessions:
        raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"this peer already serves {open_sessions} sessions")
    if owner_sessions >= limits.max_sessions_per_peer:
        raise ProtocolError(
            ErrorCode.TOO_MANY_SESSIONS,
            f"you already have {owner_sessions} sessions open here (limit {limits.max_sessions_per_peer} per client)",
        )


def check_step(position: int, n_tokens: int, *, length: int, max_length: int) -> None:
    """A step must continue or rewind the session's cache (no holes) and stay within max_length."""
    if position > length:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"step at position {position} would leave a hole: the cache holds {length} tokens",
        )
    if position + n_tokens > max_length:
        raise ProtocolError(
            ErrorCode.SESSION_TOO_LONG,
            f"step to position {position + n_tokens} past the session's max_length {max_length}",
        )
