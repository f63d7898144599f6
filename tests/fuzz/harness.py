"""Fuzz targets shared by the hypothesis tests, the corpus replay and the atheris runner.

Every target takes one ``bytes`` input and either returns or raises :class:`FuzzFailure` (or any
unexpected exception, which is also a failure). What a target asserts:

* ``frame``: the incremental frame decoder, fed the input in two pieces, yields messages or raises
  only ``ProtocolError`` with a 1xx code; every decoded message re-encodes and decodes to itself.
* ``tensor``: the input as a frame body holding one tensor (4-byte header length, msgpack header
  ``{"t": <tensor map>, "p": [<payload lengths>]}``, payloads): parsing and decoding raise only ``ProtocolError``
  (``BAD_TENSOR`` or ``MALFORMED_FRAME``); a decoded tensor has the declared shape and converts to
  torch; an uncompressed one re-encodes to the same bytes.
* ``info`` / ``forward`` / ``backward`` / ``inference``: the input is the whole client side of one
  stream, fed to the real :class:`BlockServicer` handler through an in-memory reader/writer pair. The
  handler must finish within a deadline, answer only well-formed frames, never ``INTERNAL``, and
  leave the servicer as it found it (no session, cache reservation or in-flight count left behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch

from peerd.model.config import ModelConfig
from peerd.model.stage import Stage, cache_bytes_per_token
from peerd.rpc.tensors import from_wire
from peerd.server.handlers import BlockServicer
from peerd.server.limits import Limits
from peerd.server.metrics import PeerMetrics
from peerd.server.runtime import ComputeRuntime
from peerd.server.sessions import CacheBudget
from protocols import (
    PROTOCOL_VERSION,
    BackwardRequest,
    Compression,
    Error,
    ErrorCode,
    ForwardRequest,
    FrameDecoder,
    Hello,
    InferenceClose,
    InferenceOpen,
    InferencePush,
    InferenceStep,
    InfoRequest,
    Message,
    ProtocolError,
    WireTensor,
    decode_array,
    encode_array,
    encode_frame,
    pack_body,
)
from protocols.framing import HEADER, HEADER_BYTES, _split_payloads, _unpack_header
from protocols.wire import Payloads, tensor_from_wire, tensor_to_wire

__all__ = [
    "CORPUS_DIR",
    "HANDLER_TARGETS",
    "HIDDEN",
    "MODEL_ID",
    "TARGETS",
    "FuzzFailure",
    "Harness",
    "add_to_corpus",
    "close_shared_harness",
    "corpus_files",
    "frame_target",
    "inline_map",
    "outline",
    "seed_inputs",
    "shared_harness",
    "tensor_input",
    "tensor_target",
]

MODEL_ID = "fuzz"
HIDDEN = 16  # hidden size of the fuzzed stage
NUM_BLOCKS = 2
MAX_FRAME_BYTES = 1 << 16  # small, so hostile declared sizes hit the limit and inputs stay cheap
HANDLER_DEADLINE_S = 10.0  # a handler taking longer than this on one input counts as a hang


class FuzzFailure(AssertionError):
    """A target saw behaviour that is a bug (as opposed to a correct refusal of bad input)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise FuzzFailure(message)


# --- frame parser ------------------------------------------------------------------------------


def _same_message(a: Message, b: Message) -> bool:
    if type(a) is not type(b):
        return False
    for f in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, WireTensor):
            if not isinstance(y, WireTensor):
                return False
            same = (x.dtype, tuple(x.shape), x.compression) == (y.dtype, tuple(y.shape), y.compression)
            if not same or bytes(x.data) != bytes(y.data) or bytes(x.scales or b"") != bytes(y.scales or b""):
                return False
        elif isinstance(x, float) and isinstance(y, float):
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                return False
        elif x != y:
            return False
    return True


def frame_target(data: bytes) -> None:
    split = data[0] % (len(data) + 1) if data else 0
    decoder = FrameDecoder(MAX_FRAME_BYTES)
    messages: list[Message] = []
    try:
        messages += decoder.feed(data[:split])
        messages += decoder.feed(data[split:])
        decoder.eof()
    except ProtocolError as exc:
        _check(100 <= int(exc.code) < 200, f"frame decoder raised a non-1xx code {exc.code!r}")
    for msg in messages:
        again = FrameDecoder(MAX_FRAME_BYTES).feed(encode_frame(msg, MAX_FRAME_BYTES))
        _check(len(again) == 1 and _same_message(msg, again[0]), f"{msg!r:.200} does not survive a round trip")


# --- tensor codec ------------------------------------------------------------------------------


def outline(value: Any, payloads: list[bytes]) -> Any:
    """A tensor-like map with ``bytes`` data/scales turned into payload indices (payloads appended)."""
    if type(value) is not dict:
        return value
    out = dict(value)
    for key in ("data", "scales"):
        if type(out.get(key)) is bytes:
            payloads.append(out[key])
            out[key] = len(payloads) - 1
    return out


def inline_map(t: WireTensor) -> dict[str, Any]:
    """The header map of ``t`` with its data (and scales) inline as ``bytes``, for :func:`outline`."""
    payloads: Payloads = []
    wire = tensor_to_wire(t, payloads)
    for key in ("data", "scales"):
        if key in wire:
            wire[key] = bytes(payloads[wire[key]])
    return wire


def tensor_input(value: Any) -> bytes:
    """The ``tensor`` target's input for a tensor map whose data/scales may be inline ``bytes``."""
    payloads: list[bytes] = []
    header = {"t": outline(value, payloads), "p": [len(data) for data in payloads]}
    return pack_body(header, payloads)


def _parse_tensor_input(data: bytes) -> WireTensor:
    # the same steps and helpers as decode_message, for a header that holds one tensor map
    view = memoryview(data)
    if len(view) < HEADER_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "shorter than a header length")
    (size,) = HEADER.unpack_from(view)
    if not 0 < size <= len(view) - HEADER_BYTES:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "header length out of range")
    header = _unpack_header(view[HEADER_BYTES : HEADER_BYTES + size])
    if type(header) is not dict:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "header is not a map")
    payloads: Payloads = _split_payloads(header.get("p", []), view, HEADER_BYTES + size)
    return tensor_from_wire(header.get("t"), payloads)


def tensor_target(data: bytes) -> None:
    try:
        wire = _parse_tensor_input(data)
    except ProtocolError as exc:
        _check(exc.code in (ErrorCode.MALFORMED_FRAME, ErrorCode.BAD_TENSOR), f"parse raised {exc.code!r}")
        return
    try:
        array = decode_array(wire)
    except ProtocolError as exc:
        _check(exc.code is ErrorCode.BAD_TENSOR, f"decode raised {exc.code!r}")
        return
    _check(tuple(array.shape) == tuple(wire.shape), f"decoded shape {array.shape} != declared {wire.shape}")
    tensor = from_wire(wire)
    _check(tuple(tensor.shape) == tuple(wire.shape), "torch tensor has another shape")
    if wire.compression is Compression.NONE:
        again = encode_array(np.ascontiguousarray(array), dtype=wire.dtype)
        _check(bytes(again.data) == bytes(wire.data), "uncompressed tensor does not re-encode to its bytes")


# --- handlers ----------------------------------------------------------------------------------


@dataclass
class _StreamInfo:
    peer_id: str


@dataclass
class CaptureWriter:
    """The server half of an in-memory stream: collects what the handler writes."""

    buffer: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def write(self, data: bytes) -> None:
        self.buffer += data

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=32,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_layers=NUM_BLOCKS,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )


class Harness:
    """A real :class:`BlockServicer` on a tiny random stage, driven in memory (own event loop)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        config = _tiny_config()
        self.stage = Stage.random(config, 0, NUM_BLOCKS, std=0.1)
        self.runtime = ComputeRuntime(torch_threads=1, name="fuzz-compute")
        self.limits = Limits(
            max_frame_bytes=MAX_FRAME_BYTES,
            max_batch_tokens=64,
            max_session_length=32,
            max_sessions=4,
            request_timeout_s=2.0,
            session_idle_timeout_s=2.0,
            max_sessions_per_peer=2,
            max_inflight_per_peer=4,
        )
        self.budget = CacheBudget(96, cache_bytes_per_token(config, NUM_BLOCKS, torch.float32))
        self.servicer = BlockServicer(
            stage=self.stage,
            model_id=MODEL_ID,
            runtime=self.runtime,
            budget=self.budget,
            limits=self.limits,
            metrics=PeerMetrics(),
        )
        self.servicer.state = "online"
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()
        self.runtime.close()

    def run(self, rpc: str, data: bytes) -> list[Message]:
        """Feed ``data`` as the client's side of one ``rpc`` stream; returns the replies."""
        return self.loop.run_until_complete(self._drive(rpc, data))

    async def _drive(self, rpc: str, data: bytes) -> list[Message]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        writer = CaptureWriter()
        handler = getattr(self.servicer, f"rpc_{rpc}")
        try:
            async with asyncio.timeout(HANDLER_DEADLINE_S):
                await handler(_StreamInfo("fuzzer"), reader, writer)
        except TimeoutError:
            raise FuzzFailure(f"{rpc} handler hung on {len(data)} bytes of input") from None
        _check(writer.closed, "handler did not close its stream")
        decoder = FrameDecoder(self.limits.max_frame_bytes)
        try:
            replies = decoder.feed(bytes(writer.buffer))
            decoder.eof()
        except ProtocolError as exc:
            raise FuzzFailure(f"handler wrote a malformed frame: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Error):
                _check(reply.code != ErrorCode.INTERNAL, f"handler failed internally: {reply.message}")
        s = self.servicer
        _check(not s.sessions and not s._owner_sessions and not s._opening, "a session outlived its stream")
        _check(self.budget.used_tokens == 0, f"{self.budget.used_tokens} cache tokens leaked")
        _check(not s.admission.inflight and not s.admission.waiting, "an in-flight count leaked")
        return replies


HANDLER_TARGETS = ("info", "forward", "backward", "inference", "push")

_harness: Harness | None = None


def shared_harness() -> Harness:
    """One harness per process (a stage, a compute thread and an event loop), made on first use."""
    global _harness
    if _harness is None:
        _harness = Harness()
    return _harness


def close_shared_harness() -> None:
    global _harness
    if _harness is not None:
        _harness.close()
        _harness = None


def _handler_target(rpc: str) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        shared_harness().run(rpc, data)

    target.__name__ = f"{rpc}_target"
    return target


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frame": frame_target,
    "tensor": tensor_target,
    **{rpc: _handler_target(rpc) for rpc in HANDLER_TARGETS},
}


# --- seeds -------------------------------------------------------------------------------------


def _hidden(shape: tuple[int, ...], dtype: str = "float32", compression: str = "none") -> WireTensor:
    rng = np.random.default_rng(sum(shape))
    values = rng.standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        from protocols import float32_to_bf16_bits

        return encode_array(float32_to_bf16_bits(values), dtype=dtype, compression=Compression(compression))
    return encode_array(values.astype(dtype), dtype=dtype, compression=Compression(compression))


def _frames(*msgs: Message) -> bytes:
    return b"".join(encode_frame(m, MAX_FRAME_BYTES) for m in msgs)


HELLO = Hello(PROTOCOL_VERSION, MODEL_ID, "fuzz")


def seed_inputs() -> Iterator[tuple[str, str, bytes]]:
    """(target, name, bytes): valid conversations and near misses that start the corpus."""
    x = _hidden((1, 3, HIDDEN))
    yield "info", "ok", _frames(HELLO, InfoRequest())
    yield "info", "no_hello", _frames(InfoRequest())
    yield "forward", "ok", _frames(HELLO, ForwardRequest(x, 0, NUM_BLOCKS))
    yield "forward", "f16_response", _frames(HELLO, ForwardRequest(x, 0, 1, 7, Compression.FLOAT16))
    yield "forward", "bf16_blockwise8", _frames(HELLO, ForwardRequest(_hidden((2, 2, HIDDEN), "bfloat16"), 1, 2))
    yield "forward", "wrong_shape", _frames(HELLO, ForwardRequest(_hidden((1, 3, HIDDEN + 1)), 0, 1))
    yield "forward", "too_many_tokens", _frames(HELLO, ForwardRequest(_hidden((1, 65, HIDDEN)), 0, 1))
    yield "forward", "blocks_not_served", _frames(HELLO, ForwardRequest(x, 0, NUM_BLOCKS + 1))
    yield "forward", "wrong_model", _frames(Hello(PROTOCOL_VERSION, "other", ""), ForwardRequest(x, 0, 1))
    grad = _hidden((1, 3, HIDDEN), compression="blockwise8")
    yield "backward", "ok", _frames(HELLO, BackwardRequest(x, grad, 0, NUM_BLOCKS))
    yield "backward", "grad_shape", _frames(HELLO, BackwardRequest(x, _hidden((1, 2, HIDDEN)), 0, 1))
    sid = b"s" * 16
    open_ = InferenceOpen(sid, 0, NUM_BLOCKS, 16, 1)
    steps = [InferenceStep(_hidden((1, 4, HIDDEN)), 0, 1), InferenceStep(_hidden((1, 1, HIDDEN)), 4, 2)]
    yield "inference", "ok", _frames(HELLO, open_, *steps, InferenceClose())
    yield "inference", "rewind", _frames(HELLO, open_, *steps, InferenceStep(_hidden((1, 2, HIDDEN)), 1, 3))
    yield "inference", "gap", _frames(HELLO, open_, InferenceStep(_hidden((1, 1, HIDDEN)), 3, 1))
    yield "inference", "too_long", _frames(HELLO, open_, InferenceStep(_hidden((1, 17, HIDDEN)), 0, 1))
    yield "inference", "batch", _frames(HELLO, open_, InferenceStep(_hidden((2, 1, HIDDEN)), 0, 1))
    yield "inference", "step_first", _frames(HELLO, *steps)
    yield "inference", "second_open", _frames(HELLO, open_, open_, *steps)
    yield "inference", "huge_session", _frames(HELLO, InferenceOpen(sid, 0, 1, 33, 1))
    yield "inference", "cache_full", _frames(HELLO, InferenceOpen(sid, 0, 1, 32, 4))
    # a push names a session of this peer and comes from the peer its client named as predecessor:
    # the harness's one stream never opened one, so every push is refused (NOT_ALLOWED), never INTERNAL
    push = InferencePush(sid, _hidden((1, 1, HIDDEN)), 0, 1)
    yield "push", "unknown_session", _frames(HELLO, push, push)
    yield "push", "no_hello", _frames(push)
    yield "push", "not_a_push", _frames(HELLO, InfoRequest())
    for name, data in (("info_ok", _frames(HELLO, InfoRequest())), ("steps", _frames(*steps))):
        yield "frame", name, data
    yield "frame", "oversized_header", (MAX_FRAME_BYTES + 1).to_bytes(4, "big")
    yield "frame", "empty_body", b"\0\0\0\0"
    v1 = msgpack.packb({"v": [1, 0], "t": "hello", "b": {"protocol_version": [1, 0], "model_id": MODEL_ID}})
    yield "frame", "v1_hello", len(v1).to_bytes(4, "big") + v1  # refused as UNSUPPORTED_VERSION
    for name, t in (("f32", x), ("bf16", _hidden((2, 5), "bfloat16")), ("b8", grad)):
        yield "tensor", name, tensor_input(inline_map(t))
    yield "tensor", "int_f16", tensor_input({"dtype": "int32", "shape": [2], "compression": "float16", "data": b"0000"})
    yield "tensor", "bool_bad", tensor_input({"dtype": "bool", "shape": [3], "data": b"\x00\x01\x02"})
    yield (
        "tensor",
        "payload_lengths_lie",
        pack_body({"t": {"dtype": "bool", "shape": [1], "data": 0}, "p": [2]}, [b"\x01"]),
    )


@contextlib.contextmanager
def harness_session() -> Iterator[Harness]:
    """The shared harness, closed at the end (for a test module)."""
    try:
        yield shared_harness()
    finally:
        close_shared_harness()


def run_target(name: str, data: bytes) -> Any:
    return TARGETS[name](data)


CORPUS_DIR = Path(__file__).parent / "corpus"


def corpus_files(target: str) -> list[Path]:
    folder = CORPUS_DIR / target
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def add_to_corpus(target: str, data: bytes, name: str | None = None) -> Path:
    """Save an input under corpus/<target>/ (named by content hash unless given): a regression case."""
    folder = CORPUS_DIR / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or hashlib.sha1(data).hexdigest())
    path.write_bytes(data)
    return path


if __name__ == "__main__":
    # (Re)write the seed part of the corpus: python -m tests.fuzz.harness
    for target, name, data in seed_inputs():
        add_to_corpus(target, data, f"seed-{name}")
