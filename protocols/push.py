"""Messages of server-to-server push: a peer hands its output for a step straight to the next peer.

The client links the spans of its route (``inference_link`` on each session stream: who may push
into this session, and where to push its outputs); a peer then sends each step's output to the
next peer on a push stream (``inference_push``), which acknowledges it (``inference_pushed``)
before computing. See protocols/README.md, "Push".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

from protocols.fields import check_int, check_session_id, check_str, check_tensor, invalid
from protocols.tensors import WireTensor

MAX_PEER_ID_CHARS = 128  # a base58 libp2p peer id is about 52 characters
INPUT_DIGEST_BYTES = 16


def input_digest(hidden: WireTensor, position: int) -> bytes:
    """BLAKE2b-128 of a step input as sent: position (uint64 big-endian), tensor data, then scales.

    A peer answers a pushed step with the digest of what it was pushed, and the client compares it
    with the digest of what the pushing peer reported to it: they differ only if that peer lied.
    """
    h = hashlib.blake2b(digest_size=INPUT_DIGEST_BYTES)
    h.update(position.to_bytes(8, "big"))
    h.update(hidden.data)
    h.update(hidden.scales)
    return h.digest()


def _check_peer_id(msg: object, name: str) -> None:
    check_str(msg, name)
    if len(getattr(msg, name)) > MAX_PEER_ID_CHARS:
        raise invalid(f"{type(msg).__name__}.{name} must be at most {MAX_PEER_ID_CHARS} characters")


@dataclass(frozen=True, slots=True)
class InferenceLink:
    """Sent by the client on a session stream (no reply): this session's neighbours on the route.

    ``prev_peer`` is the only peer whose pushes this session accepts (``""``: none), and
    ``next_peer`` / ``next_session_id`` the session this one's outputs are pushed into (``""`` /
    ``b""``: answer the client only). A later link replaces an earlier one.
    """

    TYPE: ClassVar[str] = "inference_link"
    prev_peer: str = ""
    next_peer: str = ""
    next_session_id: bytes = b""

    def __post_init__(self) -> None:
        _check_peer_id(self, "prev_peer")
        _check_peer_id(self, "next_peer")
        if self.next_peer or self.next_session_id:
            check_session_id(self, "next_session_id")
        if self.next_session_id and not self.next_peer:
            raise invalid("inference_link.next_session_id needs a next_peer")


@dataclass(frozen=True, slots=True)
class InferencePush:
    """A step for session ``session_id`` of the receiving peer, pushed by the previous span's peer:
    the same fields as an ``inference_step``. Answered by ``inference_pushed`` or an ``error``."""

    TYPE: ClassVar[str] = "inference_push"
    session_id: bytes
    hidden: WireTensor
    position: int
    step_id: int

    def __post_init__(self) -> None:
        check_session_id(self, "session_id")
        check_tensor(self, "hidden")
        check_int(self, "position")
        check_int(self, "step_id")


@dataclass(frozen=True, slots=True)
class InferencePushed:
    """The pushed step ``step_id`` was accepted; its result goes to the session's client."""

    TYPE: ClassVar[str] = "inference_pushed"
    step_id: int

    def __post_init__(self) -> None:
        check_int(self, "step_id")
