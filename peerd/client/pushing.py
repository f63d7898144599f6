"""Client side of server-to-server push (server/push.py): the links of a route, and the check that
a peer pushed what it reported."""

from __future__ import annotations

from collections.abc import Sequence, Set

from peerd.rpc.inference import InferenceStream
from protocols import input_digest

__all__ = ["PUSH_MIN_RTT_MS", "PushedOtherwise", "push_pays", "pushed_as_reported", "route_links"]

# Push saves one client round trip per span and step but makes each peer write its output twice
# (to the next peer and to the client): on loopback or a LAN that gains nothing measurable
# (docs/decisions.md), over the internet it saves a round trip per hop. Auto mode pushes when the
# route's median client <-> peer round trip is at least this long.
PUSH_MIN_RTT_MS = 10.0


class PushedOtherwise(Exception):
    """A span computed on other states than its predecessor reported to the client, or got none of
    the states its predecessor said it pushed (the client relays that step itself)."""


def route_links(hops: Sequence[tuple[str, InferenceStream | None]], no_push: Set[str]) -> list[tuple[str, str, bytes]]:
    """(prev peer, next peer, next session id) for each hop ``(peer id, open stream)`` of a route.

    A hop without a stream links to nobody; a peer in ``no_push`` pushes to nobody (the client
    relays its outputs) but may still be pushed into.
    """
    out = []
    for i, (peer, _) in enumerate(hops):
        prev = hops[i - 1] if i > 0 and hops[i - 1][1] is not None else None
        nxt = hops[i + 1] if i + 1 < len(hops) and peer not in no_push else None
        nxt_stream = nxt[1] if nxt is not None else None
        out.append(
            (
                prev[0] if prev is not None else "",
                nxt[0] if nxt is not None and nxt_stream is not None else "",
                nxt_stream.session_id if nxt_stream is not None else b"",
            )
        )
    return out


def pushed_as_reported(prev: InferenceStream | None, got: InferenceStream, position: int) -> bool:
    """Whether ``got``'s last result (of a pushed step) was computed on ``prev``'s last result as the
    client received it, by the input digest the pushed-to peer echoes."""
    reported, result = prev.last_result if prev is not None else None, got.last_result
    return (
        reported is not None and result is not None and result.input_digest == input_digest(reported.hidden, position)
    )


def push_pays(rtts_ms: Sequence[float | None]) -> bool:
    """Whether pushing pays on a route whose peers are ``rtts_ms`` away from the client (None: not
    measured yet). Unmeasured peers count as far: a client that knows nothing assumes the internet."""
    if not rtts_ms:
        return False
    known = sorted(PUSH_MIN_RTT_MS if rtt is None else rtt for rtt in rtts_ms)
    return known[len(known) // 2] >= PUSH_MIN_RTT_MS
