"""Messages about reaching peers rather than computing: dial-back and peerd's own relay.

A peer behind NAT cannot be dialled. It keeps a *reservation* stream open to a reachable peer
(its relay); a client that wants the NATed peer asks the relay to *connect* it, and the relay
opens a stream to the NATed peer over the connection the NATed peer made itself, then copies
bytes both ways. See protocols/README.md, "Relay".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocols.fields import check_bool, check_float, check_int, check_str

MAX_RELAY_IDLE_S = 86_400.0


@dataclass(frozen=True, slots=True)
class DialBackRequest:
    """Ask a peer to try to dial us back at ``port`` on the address it sees this stream come from.

    Only the observed address is dialled, never one the asker names: otherwise anyone could use
    peers to probe third parties. Answered by DialBackResult.
    """

    TYPE: ClassVar[str] = "dial_back_request"
    port: int

    def __post_init__(self) -> None:
        check_int(self, "port", 1, 65535)


@dataclass(frozen=True, slots=True)
class DialBackResult:
    """Whether a TCP connection to the asker's observed address and port succeeded.

    ``observed`` is that address as ``host:port`` (``""`` when the stream arrived through a
    relay, in which case ``reachable`` is false: nothing could be dialled).
    """

    TYPE: ClassVar[str] = "dial_back_result"
    reachable: bool
    observed: str

    def __post_init__(self) -> None:
        check_bool(self, "reachable")
        check_str(self, "observed")


@dataclass(frozen=True, slots=True)
class RelayReserve:
    """First frame of a reservation stream: "relay streams to me while this stream is open".

    Sent by a peer that nobody can dial to a reachable peer; answered by RelayReserved (or an
    Error: relay service off, full). The stream then stays open: closing it ends the reservation.
    """

    TYPE: ClassVar[str] = "relay_reserve"


@dataclass(frozen=True, slots=True)
class RelayReserved:
    """The relay's terms: relayed streams at once to the reserving peer, bytes each way per
    relayed stream, and how long a relayed stream may sit idle before the relay closes it."""

    TYPE: ClassVar[str] = "relay_reserved"
    max_streams: int
    data_limit_bytes: int
    idle_timeout_s: float

    def __post_init__(self) -> None:
        check_int(self, "max_streams")
        check_int(self, "data_limit_bytes")
        check_float(self, "idle_timeout_s", MAX_RELAY_IDLE_S)


@dataclass(frozen=True, slots=True)
class RelayConnect:
    """First frame of a relayed stream from a client: open ``stream`` (a peerd stream protocol
    name) on ``target`` (a peer id holding a reservation here) and copy bytes both ways.

    The client sends its own first frames right behind this one; if the relay cannot connect it
    answers one Error frame instead (retryable: another relay or peer may work).
    """

    TYPE: ClassVar[str] = "relay_connect"
    target: str
    stream: str

    def __post_init__(self) -> None:
        check_str(self, "target")
        check_str(self, "stream")


@dataclass(frozen=True, slots=True)
class RelayedStream:
    """First frame the relay writes on the stream it opens to the reserving peer: which client
    (``origin``, the peer id libp2p authenticated at the relay) asked for which ``stream``."""

    TYPE: ClassVar[str] = "relayed_stream"
    origin: str
    stream: str

    def __post_init__(self) -> None:
        check_str(self, "origin")
        check_str(self, "stream")
