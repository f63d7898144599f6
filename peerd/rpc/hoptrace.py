"""Where a decode hop's time goes: optional checkpoints on both ends of one inference step.

A hop is one ``InferenceStream.step`` and the peer's answer to it. The client and the server each
record ``time.perf_counter()`` checkpoints of the step (keyed by session id and step id) into a
:class:`HopTracer` when one is attached (``PeerClient.tracer``, ``BlockServicer.tracer``); with
none attached, the only cost is a handful of ``perf_counter`` calls per step. The two halves can
only be joined where both ends share one clock, i.e. in one process (a benchmark or a test with an
in-process peer): the spans then telescope, so they add up to the client's wall time of the hop.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["CLIENT_MARKS", "SERVER_MARKS", "SPANS", "HopTracer"]

# checkpoints, in the order they happen
CLIENT_MARKS = ("start", "encoded", "written", "answered", "decoded")
SERVER_MARKS = ("read", "checked", "compute_start", "compute_end", "resumed", "encoded", "written")

# (span name, (side, mark) it starts at, (side, mark) it ends at); consecutive, so they telescope
SPANS: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...] = (
    ("client_encode", ("c", "start"), ("c", "encoded")),  # tensor to wire + frame encode
    ("client_write", ("c", "encoded"), ("c", "written")),  # StreamWriter.write + drain
    ("to_server", ("c", "written"), ("s", "read")),  # p2pd transit + server frame read and decode
    ("server_check", ("s", "read"), ("s", "checked")),  # wire to tensor + validation
    ("queue_wait", ("s", "checked"), ("s", "compute_start")),  # queued, then the compute thread wakes
    ("compute", ("s", "compute_start"), ("s", "compute_end")),  # the forward (maybe batched)
    ("back_to_loop", ("s", "compute_end"), ("s", "resumed")),  # result handed to the event loop
    ("reply_encode", ("s", "resumed"), ("s", "encoded")),  # tensor to wire + frame encode
    ("reply_write", ("s", "encoded"), ("s", "written")),  # write + drain
    ("to_client", ("s", "written"), ("c", "answered")),  # p2pd transit + client frame read and decode
    ("client_decode", ("c", "answered"), ("c", "decoded")),  # wire to tensor
)


@dataclass
class HopTracer:
    """Collects both ends' checkpoints of traced hops and joins them into spans (milliseconds)."""

    client: dict[tuple[bytes, int], tuple[float, ...]] = field(default_factory=dict)
    server: dict[tuple[bytes, int], tuple[float, ...]] = field(default_factory=dict)

    def record_client(self, session_id: bytes, step_id: int, marks: tuple[float, ...]) -> None:
        """The client's :data:`CLIENT_MARKS` of one step."""
        self.client[(session_id, step_id)] = marks

    def record_server(self, session_id: bytes, step_id: int, marks: tuple[float, ...]) -> None:
        """The server's :data:`SERVER_MARKS` of one step."""
        self.server[(session_id, step_id)] = marks

    def hops(self) -> list[dict[str, float]]:
        """One dict per step seen by both ends: each span's milliseconds, plus ``wall`` (client)."""
        out = []
        for key, client in self.client.items():
            server = self.server.get(key)
            if server is None:
                continue
            marks = {("c", m): t for m, t in zip(CLIENT_MARKS, client, strict=True)}
            marks |= {("s", m): t for m, t in zip(SERVER_MARKS, server, strict=True)}
            hop = {name: (marks[end] - marks[begin]) * 1e3 for name, begin, end in SPANS}
            hop["wall"] = (client[-1] - client[0]) * 1e3
            out.append(hop)
        return out

    def summary(self, skip: int = 0) -> dict[str, float]:
        """Median of each span and of the wall time over the traced hops (after the first ``skip``)."""
        hops = self.hops()[skip:]
        if not hops:
            raise ValueError("no hop was traced on both ends: attach the tracer to the client and the peer")
        return {name: statistics.median(h[name] for h in hops) for name in hops[0]}
