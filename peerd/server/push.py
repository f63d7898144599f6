"""Server-to-server push: a peer hands each step's output straight to the next span's peer.

Without push the client relays every hop (client -> peer 1 -> client -> peer 2 -> ...), so a route
of n spans costs n client round trips per step. With push, the client links its sessions
(``inference_link``: who comes before and after each one), sends a step to the first span only,
and each peer pushes its output to the next one over a stream of its own; the client still gets
every span's output on its session streams (off the critical path: failover replays them, spot
checks compare them), and the last span's answer ends the step: about n/2 + 1/2 round trips.

Trust: a session accepts pushed steps only from the peer its own client named as its predecessor,
checked against the libp2p peer id of the pushing stream (authenticated by the transport), so no
one else can inject hidden states. Bounds: one push stream per session at a time, bound to that
session; one push in flight on it (the next is read only after the step is answered); frames and
steps under the same limits as a client's. A peer that cannot push (its successor unreachable,
or it refused or never acknowledged the previous push) unlinks and answers the client with
``pushed=False``, and the client relays from then on, as without push. A successor that accepts a
push and then hangs or dies is the client's to notice: it fails that peer over, as it would without
push.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from hivemind.p2p import PeerID

from peerd.server.limits import Limits
from peerd.server.metrics import PeerMetrics
from peerd.server.sessions import PushLink, ServerSession
from protocols import (
    ErrorCode,
    Hello,
    InferenceLink,
    InferencePush,
    InferencePushed,
    Message,
    ProtocolError,
    WireTensor,
    encode_frame,
    expect_message,
    frame_parts,
    read_message,
    write_parts,
)

__all__ = ["PUSH_TIMEOUT_S", "Opener", "PushLink", "Pusher", "accept_push", "link_of"]

logger = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 2.0  # opening (first push), sending and the successor's acknowledgement, together
Opener = Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""Opens a push stream to a peer id (the daemon dials the addresses of that peer's record)."""


def link_of(msg: InferenceLink) -> PushLink:
    """The link a client asked for; INVALID_MESSAGE if a peer id is not a libp2p peer id."""
    for name, peer in (("prev_peer", msg.prev_peer), ("next_peer", msg.next_peer)):
        if peer:
            try:
                PeerID.from_base58(peer)
            except Exception:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE, f"inference_link.{name} is not a base58 peer id: {peer[:60]!r}"
                ) from None
    return PushLink(msg.prev_peer, msg.next_peer, msg.next_session_id)


def accept_push(
    msg: Message, owner: str, sessions: dict[bytes, ServerSession], bound: ServerSession | None
) -> ServerSession:
    """The session a pushed step is for, if ``owner`` (the pushing stream's peer id) may push into it.

    Refused with NOT_ALLOWED unless the session exists, its client linked it with ``owner`` as the
    predecessor, and the stream is not bound to another session (nor ``owner`` already has a push
    stream into this one). The same answer whether or not the
    session id exists, so a push stream cannot probe for live session ids.
    """
    if not isinstance(msg, InferencePush):
        raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"expected inference_push, got {type(msg).__name__}")
    session = sessions.get(msg.session_id)
    refused = (
        session is None
        or session.evicted
        or session.link is None
        or session.link.prev_peer != owner
        or (bound is not None and session is not bound)
        or (bound is None and session.push_from == owner)
    )
    if refused or session is None:
        raise ProtocolError(
            ErrorCode.NOT_ALLOWED,
            "no session here takes pushed steps from your peer id on this stream; only the peer a "
            "session's client names as its predecessor may push into it, over one stream",
        )
    return session


@dataclass
class _Outgoing:
    peer_id: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: int | None = None  # step id of the push whose acknowledgement is not read yet


class Pusher:
    """Pushes sessions' step outputs to their successors, over one stream per session.

    ``opener`` is None on a peer that cannot open streams (then every push falls back); ``hello``
    is what this peer says first on each push stream.
    """

    def __init__(self, opener: Opener | None, hello: Hello, limits: Limits, metrics: PeerMetrics) -> None:
        self.opener = opener
        self.hello = hello
        self.limits = limits
        self.metrics = metrics
        self._out: dict[bytes, _Outgoing] = {}  # by our session id

    async def push(self, session: ServerSession, hidden: WireTensor, position: int, step_id: int) -> bool:
        """Hand one step's output to the session's successor; False (and unlinked) if that failed.

        Returns once the push is written, without waiting for its acknowledgement: the client must
        hear from us at once, or a hung successor would make *us* look hung. The acknowledgement is
        read before the next push (it is there by then: the successor sent it before computing);
        a refusal or none at all unlinks the session, and that step goes to the client instead.
        """
        link = session.link
        if self.opener is None or link is None or not link.next_peer:
            return False
        try:
            async with asyncio.timeout(PUSH_TIMEOUT_S):
                out = await self._stream(session, link.next_peer)
                if out.pending is not None:
                    await self._acknowledged(out, out.pending)
                # the hidden states' own buffer goes to the writer, as in a step's answer (no join)
                sent = write_parts(
                    out.writer, frame_parts([InferencePush(link.next_session_id, hidden, position, step_id)])
                )
                await out.writer.drain()
                out.pending = step_id
                self.metrics.bytes_out.inc(sent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable, refused, slow, garbage: the client relays instead
            logger.info("push to %s failed (%s); answering the client, who relays", link.next_peer[:16], exc)
            self.metrics.requests.labels(rpc="push_out", outcome="fell_back").inc()
            session.link = PushLink(prev_peer=link.prev_peer)
            await self.release(session)
            return False
        self.metrics.requests.labels(rpc="push_out", outcome="ok").inc()
        return True

    async def _acknowledged(self, out: _Outgoing, step_id: int) -> None:
        ack = expect_message(await read_message(out.reader, self.limits.max_frame_bytes), InferencePushed)
        if ack.step_id != step_id:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"acknowledged step {ack.step_id}, not {step_id}")
        out.pending = None

    async def _stream(self, session: ServerSession, peer_id: str) -> _Outgoing:
        out = self._out.get(session.session_id)
        if out is not None and out.peer_id == peer_id and not out.writer.is_closing():
            return out
        await self.release(session)
        assert self.opener is not None  # checked by push()
        reader, writer = await self.opener(peer_id)
        out = self._out[session.session_id] = _Outgoing(peer_id, reader, writer)
        writer.write(encode_frame(self.hello))  # no answer of its own: it rides with the first push
        return out

    async def relink(self, session: ServerSession, link: PushLink) -> None:
        """The client changed the session's neighbours: a stream to a former successor is closed."""
        out = self._out.get(session.session_id)
        session.link = link
        if out is not None and out.peer_id != link.next_peer:
            await self.release(session)

    async def release(self, session: ServerSession) -> None:
        """Close the session's push stream, if any (the session ended, or its successor changed)."""
        out = self._out.pop(session.session_id, None)
        if out is not None:
            out.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await out.writer.wait_closed()
