"""Protocol messages: frozen dataclasses that are valid by construction.

Each message class has a wire type name (``TYPE``) and a body of named fields. Every
field is checked in ``__post_init__`` (exact Python type, range, length), so a message
decoded from hostile bytes and one built by local code pass the same checks; a bad value
raises ``ProtocolError(INVALID_MESSAGE)`` (``BAD_TENSOR`` for tensors). The wire form of
every field is described in protocols/README.md; :func:`message_to_wire` and
:func:`message_from_wire` convert between a message and its msgpack body map.

Forward compatibility: unknown body fields are ignored on decode, and a field added in a
later minor version must have a default so older senders stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, TypeVar

from protocols.averaging import AverageAck, AveragePush, StateRequest, StateResponse
from protocols.errors import ErrorCode, ProtocolError
from protocols.fields import (
    MAX_BLOCK_INDEX,
    MAX_COMPUTE_MS,
    MAX_ERROR_CODE,
    MAX_EXTRA_ITEMS,
    MAX_STRING_BYTES,
    Blob,
    check_bool,
    check_compression,
    check_float,
    check_int,
    check_plain,
    check_session_id,
    check_span,
    check_str,
    check_tensor,
    check_version_pair,
    invalid,
)
from protocols.network import (
    DialBackRequest,
    DialBackResult,
    RelayConnect,
    RelayedStream,
    RelayReserve,
    RelayReserved,
)
from protocols.push import INPUT_DIGEST_BYTES, InferenceLink, InferencePush, InferencePushed
from protocols.tensors import ALLOWED_DTYPES, Compression, WireTensor

MAX_INFO_PADDING_BYTES = 1 << 20

# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello:
    """Optional first message of a stream: who is calling and which model it wants."""

    TYPE: ClassVar[str] = "hello"
    protocol_version: tuple[int, int]
    model_id: str
    client_name: str = ""

    def __post_init__(self) -> None:
        check_version_pair(self, "protocol_version")
        check_str(self, "model_id")
        check_str(self, "client_name")


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Ask a peer to describe itself (answered by InfoResponse).

    ``padding`` (ignored by the server, at most 1 MiB) lets a peer time an upload of known size:
    that is how peers measure the uplink bandwidth they publish.
    """

    TYPE: ClassVar[str] = "info_request"
    padding: Blob = b""

    def __post_init__(self) -> None:
        if type(self.padding) is not bytes or len(self.padding) > MAX_INFO_PADDING_BYTES:
            raise invalid(f"info_request.padding must be at most {MAX_INFO_PADDING_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class InfoResponse:
    """What a peer serves and how much room it has, as of now.

    ``block_start..block_end`` is the half-open range of blocks served (empty while the
    peer is still loading), ``state`` a lower-case peer state such as "joining",
    "online" or "draining" (a string so new states need no protocol change), ``extra``
    free-form JSON-like data for extensions.
    """

    TYPE: ClassVar[str] = "info_response"
    model_id: str
    block_start: int
    block_end: int
    num_blocks_total: int
    dtype: str
    max_batch_tokens: int
    max_session_length: int
    cache_tokens_free: int
    cache_tokens_total: int
    state: str
    protocol_version: tuple[int, int]
    package_version: str
    public_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_str(self, "model_id")
        check_int(self, "block_start", 0, MAX_BLOCK_INDEX)
        check_int(self, "block_end", 0, MAX_BLOCK_INDEX)
        check_int(self, "num_blocks_total", 0, MAX_BLOCK_INDEX)
        if not self.block_start <= self.block_end <= self.num_blocks_total:
            raise invalid(
                f"info_response needs block_start <= block_end <= num_blocks_total, got "
                f"{self.block_start}, {self.block_end}, {self.num_blocks_total}"
            )
        check_str(self, "dtype")
        if self.dtype not in ALLOWED_DTYPES:
            raise invalid(f"info_response.dtype must be one of {', '.join(ALLOWED_DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_tokens", "max_session_length", "cache_tokens_free", "cache_tokens_total"):
            check_int(self, name)
        check_str(self, "state")
        check_version_pair(self, "protocol_version")
        check_str(self, "package_version")
        check_str(self, "public_name")
        if type(self.extra) is not dict:
            raise invalid(f"info_response.extra must be a dict, got {type(self.extra).__name__}")
        check_plain(self.extra, "info_response.extra", 0, [MAX_EXTRA_ITEMS])


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """Run blocks ``start..end`` (half-open) on ``hidden`` [batch, seq, hidden_size], no cache."""

    TYPE: ClassVar[str] = "forward_request"
    hidden: WireTensor
    start: int
    end: int
    request_id: int = 0
    response_compression: Compression = Compression.NONE

    def __post_init__(self) -> None:
        check_tensor(self, "hidden")
        check_span(self)
        check_int(self, "request_id")
        check_compression(self, "response_compression")


@dataclass(frozen=True, slots=True)
class ForwardResponse:
    """Output hidden states of a ForwardRequest (same shape as its input)."""

    TYPE: ClassVar[str] = "forward_response"
    hidden: WireTensor
    request_id: int = 0

    def __post_init__(self) -> None:
        check_tensor(self, "hidden")
        check_int(self, "request_id")


@dataclass(frozen=True, slots=True)
class BackwardRequest:
    """Gradient of blocks ``start..end`` w.r.t. their input, given the input and d(loss)/d(output)."""

    TYPE: ClassVar[str] = "backward_request"
    hidden: WireTensor
    grad_output: WireTensor
    start: int
    end: int
    request_id: int = 0
    response_compression: Compression = Compression.NONE

    def __post_init__(self) -> None:
        check_tensor(self, "hidden")
        check_tensor(self, "grad_output")
        check_span(self)
        check_int(self, "request_id")
        check_compression(self, "response_compression")


@dataclass(frozen=True, slots=True)
class BackwardResponse:
    """d(loss)/d(input hidden) for a BackwardRequest (same shape as its ``hidden``)."""

    TYPE: ClassVar[str] = "backward_response"
    grad_input: WireTensor
    request_id: int = 0

    def __post_init__(self) -> None:
        check_tensor(self, "grad_input")
        check_int(self, "request_id")


@dataclass(frozen=True, slots=True)
class InferenceOpen:
    """Open an inference session with a KV cache for ``batch_size`` x ``max_length`` tokens."""

    TYPE: ClassVar[str] = "inference_open"
    session_id: bytes
    start: int
    end: int
    max_length: int
    batch_size: int
    response_compression: Compression = Compression.NONE

    def __post_init__(self) -> None:
        check_session_id(self, "session_id")
        check_span(self)
        check_int(self, "max_length", 1)
        check_int(self, "batch_size", 1)
        check_compression(self, "response_compression")


@dataclass(frozen=True, slots=True)
class InferenceOpened:
    """The session is open; ``cache_tokens_reserved`` tokens of KV cache are held for it."""

    TYPE: ClassVar[str] = "inference_opened"
    session_id: bytes
    cache_tokens_reserved: int

    def __post_init__(self) -> None:
        check_session_id(self, "session_id")
        check_int(self, "cache_tokens_reserved")


@dataclass(frozen=True, slots=True)
class InferenceStep:
    """Next tokens of a session: ``hidden`` is [batch, n_tokens, hidden_size] and its first
    token sits at ``position`` (tokens before it stay cached; a smaller position than the
    cache length rewinds the cache). ``step_id`` is echoed in the result."""

    TYPE: ClassVar[str] = "inference_step"
    hidden: WireTensor
    position: int
    step_id: int

    def __post_init__(self) -> None:
        check_tensor(self, "hidden")
        check_int(self, "position")
        check_int(self, "step_id")


@dataclass(frozen=True, slots=True)
class InferenceStepResult:
    """Output hidden states of one InferenceStep, with the server's compute time; ``pushed`` says
    the next span's peer already has them (see protocols/push.py), so the client must not relay;
    ``input_digest`` is, for a pushed step, the digest of the input pushed (push.input_digest)."""

    TYPE: ClassVar[str] = "inference_step_result"
    hidden: WireTensor
    step_id: int
    compute_ms: float = 0.0
    pushed: bool = False
    input_digest: bytes = b""

    def __post_init__(self) -> None:
        check_tensor(self, "hidden")
        check_int(self, "step_id")
        check_float(self, "compute_ms", MAX_COMPUTE_MS)
        check_bool(self, "pushed")
        if type(self.input_digest) is not bytes or len(self.input_digest) not in (0, INPUT_DIGEST_BYTES):
            raise invalid(f"inference_step_result.input_digest must be empty or {INPUT_DIGEST_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class InferenceClose:
    """End an inference session; the server frees its cache and closes the stream."""

    TYPE: ClassVar[str] = "inference_close"


@dataclass(frozen=True, slots=True)
class Error:
    """A refusal or failure: an ErrorCode number (unknown numbers allowed), text, and
    whether the same request may succeed on another peer."""

    TYPE: ClassVar[str] = "error"
    code: int
    message: str
    retryable: bool = False

    def __post_init__(self) -> None:
        check_int(self, "code", 0, MAX_ERROR_CODE)
        check_str(self, "message")
        check_bool(self, "retryable")


Message: TypeAlias = (
    Hello
    | InfoRequest
    | InfoResponse
    | ForwardRequest
    | ForwardResponse
    | BackwardRequest
    | BackwardResponse
    | InferenceOpen
    | InferenceOpened
    | InferenceStep
    | InferenceStepResult
    | InferenceClose
    | InferenceLink
    | InferencePush
    | InferencePushed
    | DialBackRequest
    | DialBackResult
    | RelayReserve
    | RelayReserved
    | RelayConnect
    | RelayedStream
    | AveragePush
    | AverageAck
    | StateRequest
    | StateResponse
    | Error
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        InfoRequest,
        InfoResponse,
        ForwardRequest,
        ForwardResponse,
        BackwardRequest,
        BackwardResponse,
        InferenceOpen,
        InferenceOpened,
        InferenceStep,
        InferenceStepResult,
        InferenceClose,
        InferenceLink,
        InferencePush,
        InferencePushed,
        DialBackRequest,
        DialBackResult,
        RelayReserve,
        RelayReserved,
        RelayConnect,
        RelayedStream,
        AveragePush,
        AverageAck,
        StateRequest,
        StateResponse,
        Error,
    )
}
"""Wire type name -> message class."""


# --------------------------------------------------------------------------- errors


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8", errors="replace")  # lone surrogates become "?"
    if len(data) <= limit:
        return data.decode("utf-8")
    return data[: limit - 3].decode("utf-8", errors="ignore") + "..."


def error_from_exception(exc: ProtocolError) -> Error:
    """The Error message that reports ``exc`` to the peer (message cut to MAX_STRING_BYTES)."""
    return Error(
        code=int(exc.code),
        message=_truncate_utf8(exc.message, MAX_STRING_BYTES),
        retryable=exc.code.retryable,
    )


def raise_if_error(msg: Message) -> Message:
    """Return ``msg`` unless it is an Error, which is raised as ``ProtocolError(code, message)``.

    A numeric code this version does not know becomes ErrorCode.INTERNAL, with the
    original number kept at the front of the message ("remote error code 777: ...").
    """
    if isinstance(msg, Error):
        try:
            code = ErrorCode(msg.code)
            text = msg.message
        except ValueError:
            code = ErrorCode.INTERNAL
            text = f"remote error code {msg.code}: {msg.message}"
        raise ProtocolError(code, text)
    return msg


_M = TypeVar("_M")


def expect_message(msg: Message, cls: type[_M]) -> _M:
    """Return ``msg`` if it is a ``cls``; raise the peer's Error, or UNEXPECTED_MESSAGE otherwise.

    The usual way to read a reply: ``expect_message(await read_message(reader), ForwardResponse)``.
    """
    raise_if_error(msg)
    if not isinstance(msg, cls):
        raise ProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE,
            f"expected {getattr(cls, 'TYPE', cls.__name__)}, got {type(msg).TYPE}",
        )
    return msg
