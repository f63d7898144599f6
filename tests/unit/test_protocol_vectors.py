"""Golden vectors: committed frames decode to the JSON expectation and re-encode byte for byte."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import protocols
from protocols import (
    MESSAGE_TYPES,
    Compression,
    FrameDecoder,
    ProtocolError,
    WireTensor,
    bf16_bits_to_float32,
    decode_array,
    encode_frame,
)

ROOT = Path(__file__).resolve().parents[2]
VECTORS = Path(protocols.__file__).parent / "vectors"
INDEX = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))


def _decode_one(frame: bytes):
    decoder = FrameDecoder()
    messages = decoder.feed(frame)
    decoder.eof()
    assert len(messages) == 1
    return messages[0]


def _expected_value(kind: str, value):
    """A field of the JSON index turned into the value the decoded message must hold."""
    if kind == "WireTensor":
        return WireTensor(
            value["dtype"],
            tuple(value["shape"]),
            bytes.fromhex(value["data_hex"]),
            Compression(value["compression"]),
            bytes.fromhex(value.get("scales_hex", "")),
        )
    if kind in ("bytes", "Blob"):
        return bytes.fromhex(value["hex"])
    if kind == "Compression":
        return Compression(value)
    if kind == "tuple[int, int]":
        return tuple(value)
    return value


@pytest.mark.parametrize("case", INDEX["valid"], ids=lambda case: case["name"])
def test_valid_vector(case):
    frame = (VECTORS / case["file"]).read_bytes()
    msg = _decode_one(frame)
    cls = MESSAGE_TYPES[case["type"]]
    assert type(msg) is cls
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    fields = {name: _expected_value(kinds[name], value) for name, value in case["fields"].items()}
    assert msg == cls(**fields)
    for name, value in case["fields"].items():
        if kinds[name] == "WireTensor":
            decoded = decode_array(getattr(msg, name))
            if value["dtype"] == "bfloat16":
                decoded = bf16_bits_to_float32(decoded)
            assert decoded.shape == tuple(value["shape"])
            np.testing.assert_array_equal(decoded, np.array(value["values"]).reshape(value["shape"]))
    if case["canonical"]:
        assert encode_frame(msg) == frame
    else:
        assert encode_frame(msg) != frame and _decode_one(encode_frame(msg)) == msg


@pytest.mark.parametrize("case", INDEX["invalid"], ids=lambda case: case["name"])
def test_invalid_vector(case):
    frame = (VECTORS / case["file"]).read_bytes()
    with pytest.raises(ProtocolError) as info:
        _decode_one(frame)
    assert info.value.code.name == case["error"] and int(info.value.code) == case["code"]


def test_every_message_type_has_a_vector():
    assert {case["type"] for case in INDEX["valid"]} == set(MESSAGE_TYPES)


def test_every_compression_and_dtype_has_a_vector():
    tensors = [
        value
        for case in INDEX["valid"]
        for value in case["fields"].values()
        if isinstance(value, dict) and "data_hex" in value
    ]
    assert {t["compression"] for t in tensors} == {c.value for c in Compression}
    assert {t["dtype"] for t in tensors} == set(protocols.ALLOWED_DTYPES)


def test_vectors_are_up_to_date():
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "tools" / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = module.build()
    on_disk = {path.name for path in VECTORS.iterdir() if path.is_file()}
    assert on_disk == set(files), "run: python tools/make_vectors.py"
    for name, content in files.items():
        assert (VECTORS / name).read_bytes() == content, f"{name} is stale: run python tools/make_vectors.py"
