"""The protocol version and the rule for accepting another peer's version."""

from __future__ import annotations

from protocols.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION: tuple[int, int] = (2, 0)
"""(major, minor). Minor bumps only add optional fields or message types; major bumps break."""


def check_version(version: tuple[int, int]) -> None:
    """Refuse an envelope version this implementation cannot read.

    Same major: accepted whatever the minor (a newer minor only adds optional fields,
    which decoders ignore). Any other major: ``ProtocolError(UNSUPPORTED_VERSION)``.
    """
    major, minor = version
    ours_major, ours_minor = PROTOCOL_VERSION
    if major == ours_major:
        return
    relation = "newer" if major > ours_major else "older"
    raise ProtocolError(
        ErrorCode.UNSUPPORTED_VERSION,
        f"message uses protocol {major}.{minor}, a {relation} major version than this peer's "
        f"{ours_major}.{ours_minor}; only major version {ours_major} is understood",
    )
