"""Field limits and checks shared by every protocol message (see protocols/README.md).

Each check raises ``ProtocolError`` (INVALID_MESSAGE, or BAD_TENSOR for tensors) naming the
message type and field, so a hostile value is refused with a message saying what is wrong.
"""

from __future__ import annotations

import math
from typing import Any, TypeAlias

from protocols.errors import ErrorCode, ProtocolError
from protocols.tensors import Compression, WireTensor

__all__ = [
    "MAX_BLOCK_INDEX",
    "MAX_COMPUTE_MS",
    "MAX_ERROR_CODE",
    "MAX_EXTRA_DEPTH",
    "MAX_EXTRA_ITEMS",
    "MAX_SESSION_ID_BYTES",
    "MAX_STRING_BYTES",
    "MAX_UINT",
    "MAX_VERSION_PART",
    "Blob",
    "check_bool",
    "check_compression",
    "check_float",
    "check_int",
    "check_plain",
    "check_session_id",
    "check_span",
    "check_str",
    "check_tensor",
    "check_utf8",
    "check_version_pair",
    "invalid",
    "where_of",
]

Blob: TypeAlias = bytes
"""A ``bytes`` field that travels as a payload after the frame header (up to the frame limit), not
inside it like ``bytes`` fields (at most MAX_STRING_BYTES there)."""

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


def invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_MESSAGE, message)


# --------------------------------------------------------------------------- field checks


def where_of(msg: object, name: str) -> str:
    return f"{getattr(type(msg), 'TYPE', type(msg).__name__)}.{name}"


def check_int(msg: object, name: str, low: int = 0, high: int = MAX_UINT) -> None:
    value = getattr(msg, name)
    if type(value) is not int:
        raise invalid(f"{where_of(msg, name)} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(f"{where_of(msg, name)} must be in [{low}, {high}], got {value}")


def check_str(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not str:
        raise invalid(f"{where_of(msg, name)} must be a str, got {type(value).__name__}")
    check_utf8(value, where_of(msg, name))


def check_utf8(value: str, where: str) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise invalid(f"{where} is not valid Unicode text (lone surrogate)") from exc
    if size > MAX_STRING_BYTES:
        raise invalid(f"{where} is {size} UTF-8 bytes; at most {MAX_STRING_BYTES} allowed")


def check_bool(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not bool:
        raise invalid(f"{where_of(msg, name)} must be a bool, got {type(value).__name__}")


def check_float(msg: object, name: str, high: float) -> None:
    value = getattr(msg, name)
    if type(value) is int:  # 3 is a fine duration; store it as 3.0 so equality is by value
        value = float(value)
        object.__setattr__(msg, name, value)
    if type(value) is not float:
        raise invalid(f"{where_of(msg, name)} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= high):
        raise invalid(f"{where_of(msg, name)} must be finite and in [0, {high}], got {value}")


def check_version_pair(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if (
        type(value) is not tuple
        or len(value) != 2
        or not all(type(part) is int and 0 <= part <= MAX_VERSION_PART for part in value)
    ):
        raise invalid(f"{where_of(msg, name)} must be a (major, minor) pair of ints in [0, 65535], got {value!r}")


def check_span(msg: Any) -> None:
    check_int(msg, "start", 0, MAX_BLOCK_INDEX)
    check_int(msg, "end", 0, MAX_BLOCK_INDEX)
    start, end = msg.start, msg.end
    if start >= end:
        raise invalid(f"{where_of(msg, 'start')}..end must be a non-empty block range, got {start}..{end}")


def check_compression(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if not isinstance(value, Compression):
        raise invalid(f"{where_of(msg, name)} must be a Compression, got {value!r}")


def check_tensor(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if not isinstance(value, WireTensor):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where_of(msg, name)} must be a WireTensor")


def check_session_id(msg: object, name: str) -> None:
    value = getattr(msg, name)
    if type(value) is not bytes or not 1 <= len(value) <= MAX_SESSION_ID_BYTES:
        raise invalid(f"{where_of(msg, name)} must be 1..{MAX_SESSION_ID_BYTES} bytes, got {value!r:.80}")


def check_plain(value: object, where: str, depth: int, budget: list[int]) -> None:
    """Check a JSON-like value (plus bytes) for ``extra``: bounded depth, size and types."""
    budget[0] -= 1
    if budget[0] < 0:
        raise invalid(f"{where}: more than {MAX_EXTRA_ITEMS} items")
    if value is None or type(value) is bool or type(value) is float:
        return
    if type(value) is int:
        if not -(2**63) <= value < 2**64:
            raise invalid(f"{where}: int {value} does not fit 64 bits")
        return
    if type(value) is str:
        check_utf8(value, where)
        return
    if type(value) is bytes:
        if len(value) > MAX_STRING_BYTES:
            raise invalid(f"{where}: bytes longer than {MAX_STRING_BYTES}")
        return
    if (type(value) is list or type(value) is dict) and depth >= MAX_EXTRA_DEPTH:
        raise invalid(f"{where}: nested deeper than {MAX_EXTRA_DEPTH}")
    if type(value) is list:
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", depth + 1, budget)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise invalid(f"{where}: keys must be str, got {type(key).__name__}")
            check_utf8(key, where)
            check_plain(item, f"{where}[{key!r:.40}]", depth + 1, budget)
        return
    raise invalid(
        f"{where}: {type(value).__name__} is not allowed (use None, bool, int, float, str, bytes, list, dict)"
    )
