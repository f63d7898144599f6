"""Client side of one inference session stream: steps, their results, and push links (protocols/push.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, TypeVar

import torch

from peerd.rpc.errors import PeerUnavailable
from peerd.rpc.hoptrace import HopTracer
from peerd.rpc.streams import drain_within
from peerd.rpc.tensors import from_wire, to_wire
from protocols import (
    Compression,
    InferenceClose,
    InferenceLink,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    Message,
    encode_frame,
    frame_parts,
)

M = TypeVar("M", bound=Message)


class PeerClient(Protocol):
    """What a stream needs of transport.PeerClient: its framed send and receive, errors mapped."""

    tracer: HopTracer | None  # records inference steps' checkpoints (benchmarks, tests)

    async def _send(self, peer_id: str, writer: asyncio.StreamWriter, *msgs: Message) -> None: ...

    async def _write(self, peer_id: str, writer: asyncio.StreamWriter, parts: list[bytes | memoryview]) -> None: ...

    async def _receive(
        self, peer_id: str, reader: asyncio.StreamReader, expected: type[M], timeout_s: float | None = None
    ) -> M: ...


__all__ = ["InferenceStream"]


class InferenceStream:
    """One open inference session on one peer: ``step()`` any number of times, then ``close()``.

    With push (``link``), a step's input may come from the previous span's peer instead of the
    client: the client then only ``receive``s its result. Step ids must grow over the stream's life;
    a result for an older step id than the one awaited is a duplicate (a step pushed again after a
    failover upstream) and is skipped.
    """

    def __init__(
        self,
        client: PeerClient,
        peer_id: str,
        session_id: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cm: object,
        compression: Compression,
        *,
        confirmed: bool = True,
    ) -> None:
        self.client = client
        self.peer_id = peer_id
        self.session_id = session_id
        self._reader = reader
        self._writer = writer
        self._cm = cm
        self._compression = compression
        self._step_id = 0
        self.closed = False
        self.last_compute_ms = 0.0
        self.last_pushed = False  # the last result says the next span's peer already has it
        self.last_result: InferenceStepResult | None = None  # as received (digests are of wire bytes)
        # False until the peer's inference_opened is read: an open sent without waiting for it
        # (open_inference(confirm=False)) is confirmed, or its refusal raised, by the first result
        self.confirmed = confirmed

    async def step(
        self, hidden: torch.Tensor, position: int, timeout_s: float | None = None, *, step_id: int | None = None
    ) -> torch.Tensor:
        """Run ``hidden`` [batch, n, hidden] at ``position`` through this peer's span.

        ``timeout_s`` bounds the wait for the answer (default: the client's); after a timeout the
        caller must close the stream, so that a late answer is never read as the next step's.
        """
        step_id = self._step_id + 1 if step_id is None else step_id
        started = time.perf_counter()  # checkpoints for a HopTracer (a few perf_counter calls when off)
        if self.closed:
            raise PeerUnavailable(self.peer_id, "session stream already closed")
        self._step_id = max(self._step_id, step_id)
        frame = frame_parts([InferenceStep(to_wire(hidden, self._compression), position, step_id)])
        encoded = time.perf_counter()
        await self._write(frame, timeout_s)
        written = time.perf_counter()
        result = await self._result(step_id, timeout_s)
        answered = time.perf_counter()
        out = from_wire(result.hidden)
        if self.client.tracer is not None:
            marks = (started, encoded, written, answered, time.perf_counter())
            self.client.tracer.record_client(self.session_id, step_id, marks)
        return out

    async def send(self, hidden: torch.Tensor, position: int, step_id: int) -> None:
        """Send a step without waiting for its result (see ``receive``)."""
        if self.closed:
            raise PeerUnavailable(self.peer_id, "session stream already closed")
        self._step_id = max(self._step_id, step_id)
        await self._write(frame_parts([InferenceStep(to_wire(hidden, self._compression), position, step_id)]), None)

    async def _write(self, frame: list[bytes | memoryview], timeout_s: float | None) -> None:
        try:
            await self.client._write(self.peer_id, self._writer, frame)
        except PeerUnavailable:
            if self.confirmed:
                raise
            # a peer that refused the open closes the stream after saying why: read why
            await self.confirm(timeout_s)
            raise

    async def receive(self, step_id: int, timeout_s: float | None = None) -> torch.Tensor:
        """The result of step ``step_id`` (sent by us, or pushed to the peer by its predecessor)."""
        return from_wire((await self._result(step_id, timeout_s)).hidden)

    async def confirm(self, timeout_s: float | None = None) -> None:
        """Read the peer's ``inference_opened`` (its refusal raised as the peer's error)."""
        await self.client._receive(self.peer_id, self._reader, InferenceOpened, timeout_s)
        self.confirmed = True

    async def _result(self, step_id: int, timeout_s: float | None) -> InferenceStepResult:
        if self.closed:
            raise PeerUnavailable(self.peer_id, "session stream already closed")
        self._step_id = max(self._step_id, step_id)
        if not self.confirmed:
            await self.confirm(timeout_s)
        while True:
            result = await self.client._receive(self.peer_id, self._reader, InferenceStepResult, timeout_s)
            if result.step_id >= step_id:
                break
        if result.step_id != step_id:
            raise PeerUnavailable(self.peer_id, f"answered step {result.step_id}, expected {step_id}")
        self.last_compute_ms = result.compute_ms
        self.last_pushed = result.pushed
        self.last_result = result
        return result

    async def link(self, prev_peer: str, next_peer: str, next_session_id: bytes) -> None:
        """Tell the peer this session's neighbours: who may push into it, where it pushes to."""
        if self.closed:
            raise PeerUnavailable(self.peer_id, "session stream already closed")
        await self.client._send(self.peer_id, self._writer, InferenceLink(prev_peer, next_peer, next_session_id))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._writer.write(encode_frame(InferenceClose()))
            await drain_within(self._writer, 1.0)
        except Exception:
            pass  # closing a dead stream is not an error worth reporting
        finally:
            await self._cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
