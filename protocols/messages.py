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

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, TypeVar

from protocols.errors import ErrorCode, ProtocolError
from protocols.tensors import ALLOWED_DTYPES, Compression, WireTensor

MAX_STRING_BYTES = 4096
"""Longest string field, in UTF-8 bytes (also the longest ``bytes`` value inside ``extra``)."""
MAX_UINT = 2**63 - 1
"""Largest value of any integer field (they all fit a signed 64-bit integer)."""
MAX_BLOCK_INDEX = 100_000
"""Block indices satisfy 0 <= start < end <= MAX_BLOCK_INDEX."""
MAX_SESSION_ID_BYTES = 64
MAX_VERSION_PART = 65535
MAX_EXTRA_DEPTH = 8
MAX_EXTRA_ITEMS = 4096
MAX_ERROR_CODE = 65535
MAX_COMPUTE_MS = 1e12


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, message)


# --------------------------------------------------------------------------- field checks


def _where(msg: object, name: str) -> str:
    return f"{getattr(type(msg), 'TYPE', type(msg).__name__)}.{name}"


def _check_int(msg: object, name: str, low: int = 0, high: int = MAX_UINT) -> None:
    value = getattr(msg, name)
    if type(value) is not int:
        raise _invalid(f"{_where(msg, name)} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise _invalid(f"{_where(msg, name)} must be in [{low}, {high}], got {value}")


def _check_str(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not str:
        raise _invalid(f"{_where(msg, name)} must be a str, got {type(value).__name__}")
    _check_utf8(value, _where(msg, name))


def _check_utf8(value: str, where: str) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise _invalid(f"{where} is not valid Unicode text (lone surrogate)") from exc
    if size > MAX_STRING_BYTES:
        raise _invalid(f"{where} is {size} UTF-8 bytes; at most {MAX_STRING_BYTES} allowed")


def _check_bool(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not bool:
        raise _invalid(f"{_where(msg, name)} must be a bool, got {type(value).__name__}")


def _check_float(msg: object, name: str, high: float) -> None:
    value = getattr(msg, name)
    if type(value) is int:  # 3 is a fine duration; store it as 3.0 so equality is by value
        value = float(value)
        object.__setattr__(msg, name, value)
    if type(value) is not float:
        raise _invalid(f"{_where(msg, name)} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= high):
        raise _invalid(f"{_where(msg, name)} must be finite and in [0, {high}], got {value}")


def _check_version(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if (
        type(value) is not tuple
        or len(value) != 2
        or not all(type(part) is int and 0 <= part <= MAX_VERSION_PART for part in value)
    ):
        raise _invalid(f"{_where(msg, name)} must be a (major, minor) pair of ints in [0, 65535], got {value!r}")


def _check_span(msg: ForwardRequest | BackwardRequest | InferenceOpen) -> None:
    _check_int(msg, "start", 0, MAX_BLOCK_INDEX)
    _check_int(msg, "end", 0, MAX_BLOCK_INDEX)
    start, end = msg.start, msg.end
    if start >= end:
        raise _invalid(f"{_where(msg, 'start')}..end must be a non-empty block range, got {start}..{end}")


def _check_compression(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if not isinstance(value, Compression):
        raise _invalid(f"{_where(msg, name)} must be a Compression, got {value!r}")


def _check_tensor(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if not isinstance(value, WireTensor):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{_where(msg, name)} must be a WireTensor")


def _check_session_id(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not bytes or not 1 <= len(value) <= MAX_SESSION_ID_BYTES:
        raise _invalid(f"{_where(msg, name)} must be 1..{MAX_SESSION_ID_BYTES} bytes, got {value!r:.80}")


def _check_plain(value: object, where: str, depth: int, budget: list[int]) -> None:
    """Check a JSON-like value (plus bytes) for ``extra``: bounded depth, size and types."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _invalid(f"{where}: more than {MAX_EXTRA_ITEMS} items")
    if value is None or type(value) is bool or type(value) is float:
        return
    if type(value) is int:
        if not -(2**63) <= value < 2**64:
            raise _invalid(f"{where}: int {value} does not fit 64 bits")
        return
    if type(value) is str:
        _check_utf8(value, where)
        return
    if type(value) is bytes:
        if len(value) > MAX_STRING_BYTES:
            raise _invalid(f"{where}: bytes longer than {MAX_STRING_BYTES}")
        return
    if (type(value) is list or type(value) is dict) and depth >= MAX_EXTRA_DEPTH:
        raise _invalid(f"{where}: nested deeper than {MAX_EXTRA_DEPTH}")
    if type(value) is list:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1, budget)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _invalid(f"{where}: keys must be str, got {type(key).__name__}")
            _check_utf8(key, where)
            _check_plain(item, f"{where}[{key!r:.40}]", depth + 1, budget)
        return
    raise _invalid(
        f"{where}: {type(value).__name__} is not allowed (use None, bool, int, float, str, bytes, list, dict)"
    )


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello:
    """Optional first message of a stream: who is calling and which model it wants."""

    TYPE: ClassVar[str] = "hello"
    protocol_version: tuple[int, int]
    model_id: str
    client_name: str = ""

    def __post_init__(self) -> None:
        _check_version(self, "protocol_version")
        _check_str(self, "model_id")
        _check_str(self, "client_name")


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """Ask a peer to describe itself (answered by InfoResponse)."""

    TYPE: ClassVar[str] = "info_request"


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
        _check_str(self, "model_id")
        _check_int(self, "block_start", 0, MAX_BLOCK_INDEX)
        _check_int(self, "block_end", 0, MAX_BLOCK_INDEX)
        _check_int(self, "num_blocks_total", 0, MAX_BLOCK_INDEX)
        if not self.block_start <= self.block_end <= self.num_blocks_total:
            raise _invalid(
                f"info_response needs block_start <= block_end <= num_blocks_total, got "
                f"{self.block_start}, {self.block_end}, {self.num_blocks_total}"
            )
        _check_str(self, "dtype")
        if self.dtype not in ALLOWED_DTYPES:
            raise _invalid(f"info_response.dtype must be one of {', '.join(ALLOWED_DTYPES)}, got {self.dtype!r}")
        for name in ("max_batch_tokens", "max_session_length", "cache_tokens_free", "cache_tokens_total"):
            _check_int(self, name)
        _check_str(self, "state")
        _check_version(self, "protocol_version")
        _check_str(self, "package_version")
        _check_str(self, "public_name")
        if type(self.extra) is not dict:
            raise _invalid(f"info_response.extra must be a dict, got {type(self.extra).__name__}")
        _check_plain(self.extra, "info_response.extra", 0, [MAX_EXTRA_ITEMS])


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
        _check_tensor(self, "hidden")
        _check_span(self)
        _check_int(self, "request_id")
        _check_compression(self, "response_compression")


@dataclass(frozen=True, slots=True)
class ForwardResponse:
    """Output hidden states of a ForwardRequest (same shape as its input)."""

    TYPE: ClassVar[str] = "forward_response"
    hidden: WireTensor
    request_id: int = 0

    def __post_init__(self) -> None:
        _check_tensor(self, "hidden")
        _check_int(self, "request_id")


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
        _check_tensor(self, "hidden")
        _check_tensor(self, "grad_output")
        _check_span(self)
        _check_int(self, "request_id")
        _check_compression(self, "response_compression")


@dataclass(frozen=True, slots=True)
class BackwardResponse:
    """d(loss)/d(input hidden) for a BackwardRequest (same shape as its ``hidden``)."""

    TYPE: ClassVar[str] = "backward_response"
    grad_input: WireTensor
    request_id: int = 0

    def __post_init__(self) -> None:
        _check_tensor(self, "grad_input")
        _check_int(self, "request_id")


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
        _check_session_id(self, "session_id")
        _check_span(self)
        _check_int(self, "max_length", 1)
        _check_int(self, "batch_size", 1)
        _check_compression(self, "response_compression")


@dataclass(frozen=True, slots=True)
class InferenceOpened:
    """The session is open; ``cache_tokens_reserved`` tokens of KV cache are held for it."""

    TYPE: ClassVar[str] = "inference_opened"
    session_id: bytes
    cache_tokens_reserved: int

    def __post_init__(self) -> None:
        _check_session_id(self, "session_id")
        _check_int(self, "cache_tokens_reserved")


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
        _check_tensor(self, "hidden")
        _check_int(self, "position")
        _check_int(self, "step_id")


@dataclass(frozen=True, slots=True)
class InferenceStepResult:
    """Output hidden states of one InferenceStep, with the server's compute time."""

    TYPE: ClassVar[str] = "inference_step_result"
    hidden: WireTensor
    step_id: int
    compute_ms: float = 0.0

    def __post_init__(self) -> None:
        _check_tensor(self, "hidden")
        _check_int(self, "step_id")
        _check_float(self, "compute_ms", MAX_COMPUTE_MS)


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
        _check_int(self, "code", 0, MAX_ERROR_CODE)
        _check_str(self, "message")
        _check_bool(self, "retryable")


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


# --------------------------------------------------------------------------- wire form


def tensor_to_wire(t: WireTensor) -> dict[str, Any]:
    """The msgpack map of a tensor: dtype, shape, compression, data (+ scales for blockwise8)."""
    wire: dict[str, Any] = {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "compression": t.compression.value,
        "data": t.data,
    }
    if t.compression is Compression.BLOCKWISE8:
        wire["scales"] = t.scales
    return wire


def tensor_from_wire(value: Any, where: str = "tensor") -> WireTensor:
    """Build a WireTensor from its decoded msgpack map; anything wrong is BAD_TENSOR."""
    if type(value) is not dict:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where} must be a map, got {type(value).__name__}")
    for key in ("dtype", "shape", "data"):
        if key not in value:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where} is missing {key!r}")
    shape, data = value["shape"], value["data"]
    scales = value.get("scales", b"")
    compression = value.get("compression", Compression.NONE.value)
    if type(shape) is not list:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.shape must be an array")
    if not isinstance(data, memoryview | bytes) or not isinstance(scales, memoryview | bytes):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.data and .scales must be bin")
    try:
        codec = Compression(compression) if type(compression) is str else None
    except ValueError:
        codec = None
    if codec is None:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.compression {compression!r:.40} is not known")
    try:
        return WireTensor(value["dtype"], tuple(shape), data, codec, scales)
    except ProtocolError as exc:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}: {exc.message}") from None


def _plain_from_wire(value: Any) -> Any:
    # bin inside extra arrives as a view of the frame; own it so the frame can be freed.
    if isinstance(value, memoryview):
        return bytes(value)
    if type(value) is list:
        return [_plain_from_wire(item) for item in value]
    if type(value) is dict:
        return {key: _plain_from_wire(item) for key, item in value.items()}
    return value


def _decode_compression(where: str, value: Any) -> Any:
    if type(value) is not str:
        raise _invalid(f"{where} must be a str, got {type(value).__name__}")
    try:
        return Compression(value)
    except ValueError:
        raise _invalid(f"{where}: unknown compression {value!r:.40}") from None


def _decode_dict(where: str, value: Any) -> Any:
    if type(value) is not dict:
        raise _invalid(f"{where} must be a map, got {type(value).__name__}")
    return _plain_from_wire(value)


# How each field type travels: (wire -> field value, field value -> wire). Type checks and
# ranges are left to __post_init__, which sees local and remote values alike.
_Codec = tuple[Callable[[str, Any], Any], Callable[[Any], Any]]
_FIELD_CODECS: dict[str, _Codec] = {
    "int": (lambda where, v: v, lambda v: v),
    "str": (lambda where, v: v, lambda v: v),
    "bool": (lambda where, v: v, lambda v: v),
    "float": (lambda where, v: float(v) if type(v) is int else v, lambda v: v),
    "bytes": (lambda where, v: bytes(v) if isinstance(v, memoryview) else v, lambda v: v),
    "tuple[int, int]": (lambda where, v: tuple(v) if type(v) is list else v, list),
    "Compression": (_decode_compression, lambda v: v.value),
    "WireTensor": (lambda where, v: tensor_from_wire(v, where), tensor_to_wire),
    "dict[str, Any]": (_decode_dict, lambda v: v),
}

# Per message class: (field name, wire->value, value->wire, required).
_FieldSpec = tuple[str, Callable[[str, Any], Any], Callable[[Any], Any], bool]
_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {
    cls: tuple(
        (
            f.name,
            *_FIELD_CODECS[str(f.type)],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )
    for cls in MESSAGE_TYPES.values()
}


def message_to_wire(msg: Message) -> dict[str, Any]:
    """The body map of ``msg`` (field name -> msgpack-ready value), in field order."""
    return {name: to_wire(getattr(msg, name)) for name, _, to_wire, _ in _SPECS[type(msg)]}


def message_from_wire(type_name: str, body: dict[str, Any]) -> Message:
    """Build the message named ``type_name`` from its decoded body map.

    Unknown fields are ignored. Raises ProtocolError: UNKNOWN_MESSAGE for an unknown
    type name, INVALID_MESSAGE for a missing / mistyped / out-of-range field, BAD_TENSOR
    for a bad tensor.
    """
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {type_name!r:.80}")
    kwargs: dict[str, Any] = {}
    for name, from_wire, _, required in _SPECS[cls]:
        if name in body:
            kwargs[name] = from_wire(f"{type_name}.{name}", body[name])
        elif required:
            raise _invalid(f"{type_name} is missing required field {name!r}")
    return cls(**kwargs)
