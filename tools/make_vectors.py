#!/usr/bin/env python3
"""Regenerate the golden protocol vectors in protocols/vectors/.

Each valid case is one message encoded as a full frame (``<name>.bin``: 4-byte length, then
the body: 4-byte header length, msgpack header, raw payloads); each invalid case is a frame a
decoder must refuse with a given error code.
``vectors.json`` indexes them and spells out every decoded field in plain JSON, so that
an implementation in another language can test itself without Python. Everything here is
deterministic (values are small exact binary fractions, no random numbers): running the
script twice gives identical files, and tests/unit/test_protocol_vectors.py checks that
the committed files equal a fresh build.

Usage: python tools/make_vectors.py [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from protocols import (
    PROTOCOL_VERSION,
    AverageAck,
    AveragePush,
    BackwardRequest,
    BackwardResponse,
    Compression,
    DialBackRequest,
    DialBackResult,
    Error,
    ErrorCode,
    ForwardRequest,
    ForwardResponse,
    Hello,
    InferenceClose,
    InferenceLink,
    InferenceOpen,
    InferenceOpened,
    InferencePush,
    InferencePushed,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    RelayConnect,
    RelayedStream,
    RelayReserve,
    RelayReserved,
    StateRequest,
    StateResponse,
    WireTensor,
    bf16_bits_to_float32,
    decode_array,
    encode_array,
    encode_frame,
    float32_to_bf16_bits,
    pack_body,
)

VECTORS_DIR = Path(__file__).resolve().parent.parent / "protocols" / "vectors"


def _ramp(shape: tuple[int, ...], step: float = 0.125, offset: int = 0) -> npt.NDArray[np.float32]:
    """Deterministic float32 values: small multiples of ``step`` (exact in every float dtype)."""
    n = int(np.prod(shape))
    k = (np.arange(n, dtype=np.int64) * 37 + offset) % 101 - 50
    return (k.astype(np.float64) * step).astype(np.float32).reshape(shape)


def _frame(msg: Message) -> bytes:
    return encode_frame(msg)


def _raw_frame(envelope: Any, payloads: tuple[bytes, ...] = ()) -> bytes:
    """A frame from a header value written as given and payloads ("p" is added when there are payloads)."""
    if payloads and isinstance(envelope, dict):
        envelope = {**envelope, "p": [len(data) for data in payloads]}
    body = pack_body(envelope, payloads)
    return struct.pack(">I", len(body)) + body


def valid_cases() -> list[tuple[str, Message]]:
    """(name, message) for every valid vector; names are file stems."""
    hidden = _ramp((1, 2, 4))
    bf16_bits = float32_to_bf16_bits(_ramp((2, 3), step=0.375, offset=5))
    long = _ramp((1, 1, 70), step=0.0625, offset=11)  # two blockwise8 blocks, the last partial
    return [
        (
            "hello",
            Hello(protocol_version=PROTOCOL_VERSION, model_id="smollm2-135m", client_name="peerd-client/0.1"),
        ),
        ("info_request", InfoRequest()),
        ("info_request_padding", InfoRequest(padding=bytes(range(16)))),  # a blob field: one payload
        ("dial_back_request", DialBackRequest(port=31330)),
        ("dial_back_result", DialBackResult(reachable=True, observed="203.0.113.7:31330")),
        ("relay_reserve", RelayReserve()),
        ("relay_reserved", RelayReserved(max_streams=32, data_limit_bytes=1 << 30, idle_timeout_s=300.0)),
        ("relay_connect", RelayConnect(target="12D3KooWTarget", stream="peerd/inference/1")),
        ("relayed_stream", RelayedStream(origin="12D3KooWOrigin", stream="peerd/inference/1")),
        ("average_push", AveragePush(run="poems", round=7, weight=16.0, update=encode_array(hidden.reshape(-1)))),
        ("average_ack", AverageAck(round=7)),
        ("state_request", StateRequest(run="poems")),
        (
            "state_response",
            StateResponse(round=7, state=encode_array(hidden.reshape(-1), compression=Compression.FLOAT16)),
        ),
        (
            "info_response",
            InfoResponse(
                model_id="smollm2-135m",
                block_start=4,
                block_end=12,
                num_blocks_total=30,
                dtype="bfloat16",
                max_batch_tokens=8192,
                max_session_length=2048,
                cache_tokens_free=30000,
                cache_tokens_total=32768,
                state="online",
                protocol_version=PROTOCOL_VERSION,
                package_version="0.1.0",
                public_name="alice's laptop",
                extra={"throughput_tokens_per_s": 123.5, "adapters": ["lora-a"], "gpu": None},
            ),
        ),
        (
            "forward_request_float32",
            ForwardRequest(hidden=encode_array(hidden), start=0, end=30, request_id=1),
        ),
        (
            "forward_request_wants_float16",
            ForwardRequest(
                hidden=encode_array(hidden, dtype="float16"),
                start=3,
                end=5,
                request_id=2**40,
                response_compression=Compression.FLOAT16,
            ),
        ),
        (
            "forward_response_bfloat16",
            ForwardResponse(hidden=encode_array(bf16_bits, dtype="bfloat16"), request_id=1),
        ),
        (
            "backward_request",
            BackwardRequest(
                hidden=encode_array(hidden),
                grad_output=encode_array(_ramp((1, 2, 4), step=0.25, offset=3), compression=Compression.BLOCKWISE8),
                start=10,
                end=20,
                request_id=3,
                response_compression=Compression.BLOCKWISE8,
            ),
        ),
        (
            "backward_response_float16_compressed",
            BackwardResponse(grad_input=encode_array(hidden, compression=Compression.FLOAT16), request_id=3),
        ),
        (
            "inference_open",
            InferenceOpen(
                session_id=bytes(range(16)),
                start=0,
                end=15,
                max_length=512,
                batch_size=2,
                response_compression=Compression.NONE,
            ),
        ),
        ("inference_opened", InferenceOpened(session_id=bytes(range(16)), cache_tokens_reserved=1024)),
        (
            "inference_step_blockwise8",
            InferenceStep(hidden=encode_array(long, compression=Compression.BLOCKWISE8), position=0, step_id=0),
        ),
        (
            "inference_step_bfloat16_blockwise8",
            InferenceStep(
                hidden=encode_array(float32_to_bf16_bits(long), dtype="bfloat16", compression=Compression.BLOCKWISE8),
                position=70,
                step_id=1,
            ),
        ),
        (
            "inference_step_result",
            InferenceStepResult(
                hidden=encode_array(hidden), step_id=1, compute_ms=1.25, pushed=True, input_digest=bytes(range(16))
            ),
        ),
        ("inference_close", InferenceClose()),
        (
            "inference_link",
            InferenceLink(prev_peer="QmPrevPeer", next_peer="QmNextPeer", next_session_id=bytes(range(16, 32))),
        ),
        (
            "inference_push",
            InferencePush(session_id=bytes(range(16)), hidden=encode_array(hidden), position=7, step_id=2),
        ),
        ("inference_pushed", InferencePushed(step_id=2)),
        ("error", Error(code=int(ErrorCode.CACHE_FULL), message="no room for 2048 tokens", retryable=True)),
        (
            "tensor_int64",
            ForwardResponse(hidden=encode_array(np.array([[0, -1, 2**40, -(2**62)]], dtype=np.int64))),
        ),
        ("tensor_int32", ForwardResponse(hidden=encode_array(np.array([7, -7, 2**31 - 1], dtype=np.int32)))),
        ("tensor_bool", ForwardResponse(hidden=encode_array(np.array([[True, False, True]])))),
        ("tensor_scalar", ForwardResponse(hidden=encode_array(np.array(2.5, dtype=np.float32)))),
        ("tensor_empty", ForwardResponse(hidden=encode_array(np.zeros((0, 4), dtype=np.float16)))),
    ]


def _tensor_wire(array: npt.NDArray[Any]) -> tuple[dict[str, Any], bytes]:
    """The header map of an uncompressed tensor whose data is payload 0, and that payload."""
    t = encode_array(array)
    return {"dtype": t.dtype, "shape": list(t.shape), "compression": "none", "data": 0}, bytes(t.data)


def compat_cases() -> list[tuple[str, bytes, Message]]:
    """Frames from a newer minor version with unknown keys: accepted, but not canonical."""
    newer = (PROTOCOL_VERSION[0], PROTOCOL_VERSION[1] + 7)
    tensor, data = _tensor_wire(_ramp((1, 1, 2)))
    frame = _raw_frame(
        {
            "v": list(newer),
            "t": "inference_step",
            "b": {
                "hidden": {**tensor, "future_tensor_key": 1},
                "position": 5,
                "step_id": 9,
                "future_field": {"nested": [1, 2, 3], "future_payload": 1},
            },
            "future_envelope_key": "ignored",
        },
        (data, b"a payload no known field refers to"),
    )
    expected = InferenceStep(hidden=encode_array(_ramp((1, 1, 2))), position=5, step_id=9)
    return [("compat_newer_minor_unknown_fields", frame, expected)]


def invalid_cases() -> list[tuple[str, bytes, ErrorCode]]:
    """(name, frame bytes, error) for frames every decoder must refuse."""
    good, data = _tensor_wire(_ramp((1, 1, 2)))
    step_body = {"hidden": good, "position": 0, "step_id": 0}
    major = PROTOCOL_VERSION[0]
    version = [major, 0]
    hello = _raw_frame({"v": version, "t": "hello", "b": {"protocol_version": version, "model_id": "m"}})

    def step(body: dict[str, Any], payloads: tuple[bytes, ...] = (data,)) -> bytes:
        return _raw_frame({"v": version, "t": "inference_step", "b": body}, payloads)

    newer = {"v": [major + 1, 0], "t": "hello", "b": {"protocol_version": [major + 1, 0], "model_id": "m"}}
    v1_hello = msgpack.packb({"v": [1, 0], "t": "hello", "b": {"protocol_version": [1, 0], "model_id": "m"}})
    header_only = msgpack.packb({"v": version, "t": "info_request", "b": {}})
    return [
        ("invalid_newer_major", _raw_frame(newer), ErrorCode.UNSUPPORTED_VERSION),
        # a version-1 body (one msgpack map, tensors inside) is recognised and refused by its version
        ("invalid_v1_frame", struct.pack(">I", len(v1_hello)) + v1_hello, ErrorCode.UNSUPPORTED_VERSION),
        ("invalid_unknown_type", _raw_frame({"v": version, "t": "teleport", "b": {}}), ErrorCode.UNKNOWN_MESSAGE),
        ("invalid_missing_field", step({"hidden": good, "position": 0}), ErrorCode.INVALID_MESSAGE),
        ("invalid_negative_position", step({**step_body, "position": -1}), ErrorCode.INVALID_MESSAGE),
        ("invalid_bool_as_int", step({**step_body, "step_id": True}), ErrorCode.INVALID_MESSAGE),
        ("invalid_tensor_length", step(step_body, (data[:-1],)), ErrorCode.BAD_TENSOR),
        ("invalid_tensor_dtype", step({**step_body, "hidden": {**good, "dtype": "float64"}}), ErrorCode.BAD_TENSOR),
        ("invalid_tensor_payload_index", step({**step_body, "hidden": {**good, "data": 1}}), ErrorCode.BAD_TENSOR),
        ("invalid_not_msgpack", _header_frame(b"\xc1\xc1\xc1"), ErrorCode.MALFORMED_FRAME),
        ("invalid_envelope_not_map", _raw_frame([1, 2, 3]), ErrorCode.MALFORMED_FRAME),
        ("invalid_duplicate_key", _dup_key_frame(), ErrorCode.MALFORMED_FRAME),
        ("invalid_ext_type", _header_frame(b"\x81\xa1v\xd4\x01\x00"), ErrorCode.MALFORMED_FRAME),
        (
            "invalid_str_over_limit",
            _raw_frame({"v": version, "t": "hello", "b": {"protocol_version": version, "model_id": "m" * 4097}}),
            ErrorCode.MALFORMED_FRAME,
        ),
        # "p" says 8 bytes follow the header; 9 do
        (
            "invalid_payload_lengths",
            _frame_of(pack_body({"v": version, "t": "info_request", "b": {}, "p": [8]}, [b"x" * 9])),
            ErrorCode.MALFORMED_FRAME,
        ),
        (
            "invalid_header_length",
            _frame_of(struct.pack(">I", len(header_only) + 1) + header_only),
            ErrorCode.MALFORMED_FRAME,
        ),
        ("invalid_truncated", hello[:-1], ErrorCode.MALFORMED_FRAME),
        ("invalid_header_4gib", b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE),
        ("invalid_header_over_64kib", _header_frame(b"\xc0" * (65536 + 1)), ErrorCode.FRAME_TOO_LARGE),
    ]


def _frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _header_frame(header: bytes) -> bytes:
    """A frame whose body is ``header`` (any bytes) behind its length, with no payloads."""
    return _frame_of(struct.pack(">I", len(header)) + header)


def _dup_key_frame() -> bytes:
    # fixmap of 4 entries: "v": [major, 0], "v": [major, 0], "t": "info_request", "b": {}
    version = msgpack.packb([PROTOCOL_VERSION[0], 0])
    header = (
        b"\x84"
        + msgpack.packb("v")
        + version
        + msgpack.packb("v")
        + version
        + msgpack.packb("t")
        + msgpack.packb("info_request")
        + msgpack.packb("b")
        + b"\x80"
    )
    return _header_frame(header)


# --------------------------------------------------------------------------- JSON description


def _values(t: WireTensor) -> Any:
    array = decode_array(t)
    if t.dtype == "bfloat16":
        array = bf16_bits_to_float32(array)
    return array.tolist()


def describe_value(value: Any) -> Any:
    """A field value in plain JSON: bytes as {"hex"}, tensors spelled out with decoded values."""
    if isinstance(value, WireTensor):
        described: dict[str, Any] = {
            "dtype": value.dtype,
            "shape": list(value.shape),
            "compression": value.compression.value,
            "data_hex": bytes(value.data).hex(),
        }
        if value.compression is Compression.BLOCKWISE8:
            described["scales_hex"] = bytes(value.scales).hex()
        described["values"] = _values(value)
        return described
    if isinstance(value, Compression):
        return value.value
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, tuple):
        return list(value)
    return value


def describe(msg: Message) -> dict[str, Any]:
    """Every field of ``msg`` (in declaration order) as plain JSON."""
    return {f.name: describe_value(getattr(msg, f.name)) for f in dataclasses.fields(msg)}


def build() -> dict[str, bytes]:
    """All vector files: name -> contents (the .bin frames and vectors.json)."""
    files: dict[str, bytes] = {}
    index: dict[str, Any] = {
        "protocol_version": list(PROTOCOL_VERSION),
        "about": "Golden frames: 4-byte big-endian length, body = 4-byte header length + msgpack header + "
        "raw payloads. See protocols/README.md.",
        "valid": [],
        "invalid": [],
    }
    for name, msg in valid_cases():
        files[f"{name}.bin"] = _frame(msg)
        index["valid"].append(
            {
                "name": name,
                "file": f"{name}.bin",
                "type": msg.TYPE,
                "canonical": True,
                "fields": describe(msg),
            }
        )
    for name, frame, msg in compat_cases():
        files[f"{name}.bin"] = frame
        index["valid"].append(
            {
                "name": name,
                "file": f"{name}.bin",
                "type": msg.TYPE,
                "canonical": False,
                "fields": describe(msg),
            }
        )
    for name, frame, code in invalid_cases():
        files[f"{name}.bin"] = frame
        index["invalid"].append({"name": name, "file": f"{name}.bin", "error": code.name, "code": int(code)})
    files["vectors.json"] = (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed vectors are stale")
    args = parser.parse_args(argv)
    files = build()
    existing = {p.name for p in VECTORS_DIR.glob("*.bin")} | {"vectors.json"}
    if args.check:
        stale = sorted(
            name
            for name in existing | set(files)
            if name not in files
            or not (VECTORS_DIR / name).exists()
            or (VECTORS_DIR / name).read_bytes() != files[name]
        )
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    VECTORS_DIR.mkdir(parents=True, exist_ok=True)
    for name in existing - set(files):
        (VECTORS_DIR / name).unlink(missing_ok=True)
    for name, content in files.items():
        (VECTORS_DIR / name).write_bytes(content)
    print(f"wrote {len(files)} files to {VECTORS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
