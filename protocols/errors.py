"""Error codes of the wire protocol and the one exception type it raises.

Every failure a peer reports to another peer is an :class:`ErrorCode` (an integer on the
wire, grouped by hundreds like HTTP status codes) plus a human-readable message. Decoding
hostile or broken bytes raises :class:`ProtocolError` and nothing else, so a server can
catch exactly one type, answer with an ``Error`` message, and keep serving others.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Numeric error codes carried by ``Error`` messages (see protocols/README.md).

    The hundreds digit is the class: 1xx the bytes were not a valid message, 2xx the
    request does not fit this peer or model, 3xx a resource limit was hit, 4xx the peer's
    state refuses work, 5xx a bug or unexpected failure inside the peer.
    """

    # 1xx: framing / encoding
    MALFORMED_FRAME = 100  # not msgpack, truncated, wrong envelope structure
    FRAME_TOO_LARGE = 101
    UNSUPPORTED_VERSION = 102  # another major protocol version
    UNKNOWN_MESSAGE = 103  # unknown message type name
    INVALID_MESSAGE = 104  # field missing / wrong type / out of range
    BAD_TENSOR = 105  # dtype not allowed, shape/data length mismatch, bad codec
    # 2xx: request does not fit this peer / model
    WRONG_MODEL = 200
    BLOCKS_NOT_SERVED = 201
    WRONG_SHAPE = 202
    WRONG_DTYPE = 203
    REQUEST_TOO_LARGE = 204  # batch x tokens over the peer's limit
    SESSION_TOO_LONG = 205  # position / max_length over the limit
    UNKNOWN_SESSION = 206
    UNEXPECTED_MESSAGE = 207  # valid message, wrong place in the conversation
    # 3xx: resource limits
    CACHE_FULL = 300
    TOO_MANY_SESSIONS = 301
    OVERLOADED = 302
    SESSION_EXPIRED = 303  # idle timeout freed the session
    TIMEOUT = 304
    # 4xx: peer state
    DRAINING = 400  # peer is leaving; client should move its work elsewhere
    NOT_ALLOWED = 401
    NOT_REACHABLE = 402  # a relay holds no reservation for the peer asked for
    # 5xx
    INTERNAL = 500

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed on another peer (see :func:`is_retryable`)."""
        return is_retryable(self)


def is_retryable(code: int) -> bool:
    """Return True for codes that mean "this peer cannot do it now: try another peer".

    That is every 3xx (resource limits), 4xx (peer state) and 5xx (peer failure) code,
    including numeric codes this version does not know, so that a newer peer's new 3xx
    code is handled sensibly by an older client. 1xx and 2xx codes say the request itself
    is wrong or does not fit (wrong model, blocks, shape): resending it unchanged to
    another peer is not expected to help, so the caller must re-plan first.
    """
    return 300 <= int(code) < 600


class ProtocolError(Exception):
    """A protocol-level failure with an :class:`ErrorCode` and a message.

    Raised when decoding remote bytes fails validation, and by ``raise_if_error`` when a
    peer answered with an ``Error`` message. ``str(e)`` is ``"[NAME 123] message"``.
    """

    code: ErrorCode
    message: str

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"[{self.code.name} {int(self.code)}] {message}")

    @property
    def retryable(self) -> bool:
        """Shorthand for ``self.code.retryable``."""
        return self.code.retryable

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[ErrorCode, str]]:
        # Exceptions pickle as cls(*args); our args are the formatted text, not (code, message).
        return (type(self), (self.code, self.message))
