"""Property-based fuzzing of the frame parser, the tensor codec and every RPC handler, plus corpus replay.

Counts are small by default (a local run takes seconds) and large in CI, where ``.ci/run`` sets
``HYPOTHESIS_PROFILE=ci``: tens of thousands of cases in all (see ``EXAMPLES``). Each case that
fails is printed by hypothesis; keep it as a regression input with ``add_to_corpus`` (the replay
test below runs every file in ``tests/fuzz/corpus/<target>/``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import MESSAGE_TYPES, PROTOCOL_VERSION, Compression, encode_array, float32_to_bf16_bits, pack_body
from tests.fuzz.harness import (
    HANDLER_TARGETS,
    HIDDEN,
    MODEL_ID,
    TARGETS,
    close_shared_harness,
    corpus_files,
    inline_map,
    outline,
    seed_inputs,
    shared_harness,
    tensor_input,
)

CI = os.environ.get("HYPOTHESIS_PROFILE") == "ci"

# target -> (examples in a local run, examples in CI). CI total: 34,000 cases, about 5 minutes.
EXAMPLES = {
    "frame": (300, 5_000),
    "tensor": (300, 10_000),
    "info": (50, 2_000),
    "forward": (100, 6_000),
    "backward": (60, 3_000),
    "inference": (100, 8_000),
    "push": (50, 2_000),
}


def fuzz_settings(target: str) -> settings:
    local, ci = EXAMPLES[target]
    return settings(
        max_examples=ci if CI else local,
        deadline=None,  # a case's time varies with the compute thread; hangs are caught by the harness
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        derandomize=not CI,  # local runs are repeatable; CI explores new cases every run
    )


@pytest.fixture(scope="module", autouse=True)
def _harness() -> Iterator[None]:
    yield
    close_shared_harness()


# --- strategies: mostly well-formed frames, then broken in every way ---------------------------

# Strategies are built once at import: building them inside a composite costs more than drawing.
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
DTYPE_ST = st.sampled_from(DTYPES)
small = st.integers(0, 6)
SHAPES = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 5), st.just(HIDDEN)),
    st.lists(small, max_size=4).map(tuple),
    st.lists(st.integers(0, 2**29), min_size=1, max_size=9).map(tuple),
)
COMPRESSIONS = st.sampled_from(list(Compression))
COMPRESSION_NAMES = st.sampled_from([c.value for c in Compression])
SPECIALS = st.sampled_from([np.nan, np.inf, -np.inf, 1e30])
FEW = st.sampled_from([0, 0, 0, 1, 2])
SOME = st.sampled_from([0, 0, 0, 1, 1, 2, 4])
KINDS = st.sampled_from(["forward", "backward", "open", "step", "step", "close", "info", "hello", "other"])
uints = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1), st.integers(-(2**63), -1))


@st.composite
def tensor_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A tensor map: a valid encoding of a hidden-state-like array, or a broken one."""
    dtype = draw(DTYPE_ST)
    shape = draw(SHAPES)
    n = math.prod(shape)
    floats = dtype in ("float32", "float16", "bfloat16")
    compression = draw(COMPRESSIONS) if floats else Compression.NONE
    if n <= 512 and max(shape, default=0) <= 64 and len(shape) <= 8 and draw(st.booleans()):
        values = np.random.default_rng(draw(st.integers(0, 1000))).standard_normal(n).reshape(shape)
        if floats and n and draw(st.integers(0, 9)) == 0:
            values.flat[0] = draw(SPECIALS)
        if dtype == "bfloat16":
            array = float32_to_bf16_bits(values.astype(np.float32))
        elif dtype == "bool":
            array = values > 0
        else:
            with np.errstate(over="ignore"):
                array = values.astype(dtype)
        try:
            tensor = encode_array(np.ascontiguousarray(array), dtype=dtype, compression=compression)
        except ValueError:  # blockwise8 refuses NaN/inf (e.g. 1e30 as float16): send it as float16
            tensor = encode_array(np.ascontiguousarray(array), dtype=dtype, compression=Compression.FLOAT16)
        wire = inline_map(tensor)
    else:
        wire = {"dtype": dtype, "shape": list(shape), "compression": compression.value}
        wire["data"] = draw(st.binary(max_size=256))
        if compression is Compression.BLOCKWISE8 or draw(st.integers(0, 9)) == 0:
            wire["scales"] = draw(st.binary(max_size=32))
    return draw(mutated_map(wire))


_scalars = st.one_of(st.none(), st.booleans(), uints, st.floats(), st.text(max_size=8), st.binary(max_size=16))
# any msgpack value (built once: strategies made inside a composite cost more than the draws)
ANY = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=4),
    st.dictionaries(st.text(max_size=6), _scalars, max_size=4),
)
RANDOM_BODY = st.dictionaries(st.text(max_size=12), ANY, max_size=4)


@st.composite
def mutated_map(draw: st.DrawFn, value: dict[str, Any]) -> dict[str, Any]:
    """``value`` unchanged most of the time; else with keys dropped, retyped or added."""
    out = dict(value)
    for _ in range(draw(FEW)):
        keys = [*sorted(out), "extra"]
        key = keys[draw(st.integers(0, len(keys) - 1))]
        action = draw(st.integers(0, 2))
        if action == 0:
            out.pop(key, None)
        else:
            out[key] = draw(ANY)
    return out


TYPE_NAMES = st.sampled_from([*sorted(MESSAGE_TYPES), "nonsense"])
sessions = st.sampled_from([b"a" * 16, b"b" * 16, b"", b"x" * 65])


@st.composite
def message_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(type name, fields) of a request-side message, valid-looking then possibly broken."""
    kind = draw(KINDS)
    span = {"start": draw(st.integers(0, 3)), "end": draw(st.integers(0, 3))}
    compression = {"response_compression": draw(COMPRESSION_NAMES)}
    if kind == "forward":
        body = {"hidden": draw(tensor_maps()), **span, "request_id": draw(uints), **compression}
        name = "forward_request"
    elif kind == "backward":
        body = {"hidden": draw(tensor_maps()), "grad_output": draw(tensor_maps()), **span, **compression}
        name = "backward_request"
    elif kind == "open":
        body = {
            "session_id": draw(sessions),
            **span,
            "max_length": draw(st.integers(0, 40)),
            "batch_size": draw(st.integers(0, 4)),
            **compression,
        }
        name = "inference_open"
    elif kind == "step":
        body = {"hidden": draw(tensor_maps()), "position": draw(st.integers(0, 40)), "step_id": draw(uints)}
        name = "inference_step"
    elif kind == "close":
        body, name = {}, "inference_close"
    elif kind == "info":
        body, name = {}, "info_request"
    elif kind == "hello":
        body = {"protocol_version": list(PROTOCOL_VERSION), "model_id": MODEL_ID, "client_name": "fuzz"}
        name = "hello"
    else:
        name = draw(TYPE_NAMES)
        body = draw(RANDOM_BODY)
    return name, draw(mutated_map(body))


def frame_of(name: str, body: dict[str, Any], version: list[int] | None = None) -> bytes:
    """A frame whose tensor-like fields' inline ``bytes`` travel as payloads, as an encoder sends them."""
    payloads: list[bytes] = []
    fields = {key: outline(value, payloads) for key, value in body.items()}
    envelope = {"v": version or list(PROTOCOL_VERSION), "t": name, "b": fields, "p": [len(p) for p in payloads]}
    frame_body = pack_body(envelope, payloads)
    return len(frame_body).to_bytes(4, "big") + frame_body


HELLO = frame_of("hello", {"protocol_version": list(PROTOCOL_VERSION), "model_id": MODEL_ID})
_V1_BODY = msgpack.packb({"v": [1, 0], "t": "hello", "b": {"protocol_version": [1, 0], "model_id": MODEL_ID}})
V1_HELLO = len(_V1_BODY).to_bytes(4, "big") + _V1_BODY  # a version-1 client's first frame


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip, cut, insert and duplicate bytes: what a broken or hostile sender produces."""
    out = bytearray(data)
    for _ in range(draw(SOME)):
        action = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(out))) if out else 0
        if action == 0 and at < len(out):
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif action == 1:
            del out[at:]
        elif action == 2:
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            out[at:at] = out[max(0, at - 16) : at]
    return bytes(out)


HEADS = st.sampled_from(
    [
        HELLO,
        HELLO,
        HELLO,
        b"",
        frame_of("hello", {"protocol_version": [PROTOCOL_VERSION[0] + 1, 0], "model_id": MODEL_ID}),
        frame_of("hello", {"protocol_version": list(PROTOCOL_VERSION), "model_id": "other"}),
        frame_of("hello", {}, version=[PROTOCOL_VERSION[0], 7]),
        frame_of("hello", {}, version=[1, 7]),
        V1_HELLO,
    ]
)


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    """The client side of one stream: (usually) a hello, then a few frames, maybe mangled."""
    head = draw(HEADS)
    frames = [frame_of(*draw(message_bodies())) for _ in range(draw(st.integers(0, 5)))]
    if draw(st.integers(0, 9)) == 0:
        frames.append(draw(st.binary(max_size=64)))
    return draw(byte_mutations(head + b"".join(frames)))


# --- the properties ----------------------------------------------------------------------------


@fuzz_settings("frame")
@given(st.one_of(client_streams(), st.binary(max_size=256)))
def test_frame_parser_survives_any_stream(data: bytes) -> None:
    TARGETS["frame"](data)


@fuzz_settings("tensor")
@given(st.one_of(tensor_maps().map(tensor_input), st.binary(max_size=128)))
def test_tensor_codec_survives_any_tensor_map(data: bytes) -> None:
    TARGETS["tensor"](data)


def _handler_test(rpc: str) -> Any:
    @fuzz_settings(rpc)
    @given(client_streams())
    def test(data: bytes) -> None:
        TARGETS[rpc](data)

    test.__name__ = f"test_{rpc}_handler_survives_any_stream"
    return test


test_info_handler_survives_any_stream = _handler_test("info")
test_forward_handler_survives_any_stream = _handler_test("forward")
test_backward_handler_survives_any_stream = _handler_test("backward")
test_inference_handler_survives_any_stream = _handler_test("inference")
test_push_handler_survives_any_stream = _handler_test("push")


def test_handlers_still_serve_after_fuzzing() -> None:
    """After whatever the fuzz tests sent, the same servicer still answers a valid request correctly."""
    harness = shared_harness()
    seeds = {(t, n): d for t, n, d in seed_inputs()}
    replies = harness.run("inference", seeds[("inference", "ok")])
    assert [type(r).__name__ for r in replies] == ["InferenceOpened", "InferenceStepResult", "InferenceStepResult"]
    assert harness.runtime.queued == 0


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays_cleanly(target: str) -> None:
    files = corpus_files(target)
    assert files, f"tests/fuzz/corpus/{target}/ is empty: run `python -m tests.fuzz.harness`"
    for path in files:
        try:
            TARGETS[target](path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"corpus input {path.name} of {target}: {exc}") from exc


def test_seed_corpus_is_current() -> None:
    """The seed files in the corpus are what ``seed_inputs`` makes (regenerate after a protocol change)."""
    for target, name, data in seed_inputs():
        path = next((p for p in corpus_files(target) if p.name == f"seed-{name}"), None)
        assert path is not None and path.read_bytes() == data, f"stale corpus seed {target}/seed-{name}"


def test_handler_targets_cover_every_stream() -> None:
    from peerd.rpc.streams import STREAM_NAMES

    assert set(HANDLER_TARGETS) == set(STREAM_NAMES)
