"""Messages: round trips for every type, field validation, versions, errors."""

from __future__ import annotations

import dataclasses
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocols
from protocols import (
    ALLOWED_DTYPES,
    FLOAT_DTYPES,
    MAX_BLOCK_INDEX,
    MAX_UINT,
    MESSAGE_TYPES,
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
    ProtocolError,
    RelayConnect,
    RelayedStream,
    RelayReserve,
    RelayReserved,
    StateRequest,
    StateResponse,
    WireTensor,
    decode_array,
    decode_message,
    encode_array,
    encode_message,
    error_from_exception,
    expect_message,
    is_retryable,
    pack_body,
    raise_if_error,
)
from protocols.fields import MAX_STRING_BYTES

# --------------------------------------------------------------------------- strategies

uints = st.integers(min_value=0, max_value=MAX_UINT)
small_uints = st.integers(min_value=0, max_value=2**31)
text = st.text(max_size=50)
versions = st.tuples(st.integers(0, 65535), st.integers(0, 65535))
compressions = st.sampled_from(list(Compression))
session_ids = st.binary(min_size=1, max_size=64)


@st.composite
def spans(draw):
    start = draw(st.integers(0, MAX_BLOCK_INDEX - 1))
    return start, draw(st.integers(start + 1, MAX_BLOCK_INDEX))


@st.composite
def wire_tensors(draw):
    """Any valid WireTensor: every dtype, every compression, random payload bytes."""
    dtype = draw(st.sampled_from(ALLOWED_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    n = int(np.prod(shape))
    compression = draw(st.sampled_from(list(Compression))) if dtype in FLOAT_DTYPES else Compression.NONE
    if compression is Compression.BLOCKWISE8:
        scales = np.array(draw(st.lists(st.floats(0, 1e6, width=32), min_size=-(-n // 64), max_size=-(-n // 64))))
        return WireTensor(
            dtype, shape, draw(st.binary(min_size=n, max_size=n)), compression, scales.astype("<f4").tobytes()
        )
    if dtype == "bool":
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        size = n * (2 if compression is Compression.FLOAT16 else protocols.tensors.ITEM_BYTES[dtype])
        data = draw(st.binary(min_size=size, max_size=size))
    return WireTensor(dtype, shape, data, compression)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | text
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(text, children, max_size=5),
    max_leaves=20,
)


@st.composite
def info_responses(draw):
    total = draw(st.integers(0, MAX_BLOCK_INDEX))
    end = draw(st.integers(0, total))
    return InfoResponse(
        model_id=draw(text),
        block_start=draw(st.integers(0, end)),
        block_end=end,
        num_blocks_total=total,
        dtype=draw(st.sampled_from(ALLOWED_DTYPES)),
        max_batch_tokens=draw(uints),
        max_session_length=draw(uints),
        cache_tokens_free=draw(uints),
        cache_tokens_total=draw(uints),
        state=draw(st.sampled_from(["joining", "online", "draining"]) | text),
        protocol_version=draw(versions),
        package_version=draw(text),
        public_name=draw(text),
        extra=draw(st.dictionaries(text, json_like, max_size=5)),
    )


def _with_span(cls, **fields):
    return spans().flatmap(lambda span: st.builds(cls, start=st.just(span[0]), end=st.just(span[1]), **fields))


MESSAGE_STRATEGIES = {
    "hello": st.builds(Hello, protocol_version=versions, model_id=text, client_name=text),
    "info_request": st.builds(InfoRequest, padding=st.binary(max_size=64)),
    "info_response": info_responses(),
    "forward_request": _with_span(
        ForwardRequest, hidden=wire_tensors(), request_id=uints, response_compression=compressions
    ),
    "forward_response": st.builds(ForwardResponse, hidden=wire_tensors(), request_id=uints),
    "backward_request": _with_span(
        BackwardRequest,
        hidden=wire_tensors(),
        grad_output=wire_tensors(),
        request_id=uints,
        response_compression=compressions,
    ),
    "backward_response": st.builds(BackwardResponse, grad_input=wire_tensors(), request_id=uints),
    "inference_open": _with_span(
        InferenceOpen,
        session_id=session_ids,
        max_length=st.integers(1, MAX_UINT),
        batch_size=st.integers(1, 1024),
        response_compression=compressions,
    ),
    "inference_opened": st.builds(InferenceOpened, session_id=session_ids, cache_tokens_reserved=uints),
    "inference_step": st.builds(InferenceStep, hidden=wire_tensors(), position=uints, step_id=uints),
    "inference_step_result": st.builds(
        InferenceStepResult,
        hidden=wire_tensors(),
        step_id=uints,
        compute_ms=st.floats(0, 1e6),
        pushed=st.booleans(),
        input_digest=st.sampled_from([b"", bytes(range(16))]),
    ),
    "inference_close": st.just(InferenceClose()),
    "inference_link": st.builds(
        InferenceLink,
        prev_peer=st.text(max_size=40),
        next_peer=st.text(min_size=1, max_size=40),
        next_session_id=session_ids,
    ),
    "inference_push": st.builds(
        InferencePush, session_id=session_ids, hidden=wire_tensors(), position=uints, step_id=uints
    ),
    "inference_pushed": st.builds(InferencePushed, step_id=uints),
    "dial_back_request": st.builds(DialBackRequest, port=st.integers(1, 65535)),
    "dial_back_result": st.builds(DialBackResult, reachable=st.booleans(), observed=text),
    "relay_reserve": st.builds(RelayReserve),
    "relay_reserved": st.builds(
        RelayReserved,
        max_streams=st.integers(0, 1 << 20),
        data_limit_bytes=st.integers(0, 1 << 40),
        idle_timeout_s=st.floats(0, 86_400, allow_nan=False),
    ),
    "relay_connect": st.builds(RelayConnect, target=text, stream=text),
    "relayed_stream": st.builds(RelayedStream, origin=text, stream=text),
    "average_push": st.builds(
        AveragePush, run=text, round=uints, weight=st.floats(0, 1e12, allow_nan=False), update=wire_tensors()
    ),
    "average_ack": st.builds(AverageAck, round=uints),
    "state_request": st.builds(StateRequest, run=text),
    "state_response": st.builds(StateResponse, round=uints, state=wire_tensors()),
    "error": st.builds(Error, code=st.integers(0, 65535), message=text, retryable=st.booleans()),
}
messages = st.one_of(*MESSAGE_STRATEGIES.values())


def test_every_message_type_has_a_strategy():
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES)
    assert all(name == cls.TYPE for name, cls in MESSAGE_TYPES.items())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("type_name", sorted(MESSAGE_STRATEGIES))
@settings(max_examples=60)
@given(data=st.data())
def test_round_trip(type_name, data):
    msg = data.draw(MESSAGE_STRATEGIES[type_name])
    body = encode_message(msg)
    decoded = decode_message(body)
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert encode_message(decoded) == body  # canonical: re-encoding is byte-identical
    header_size = int.from_bytes(body[:4], "big")
    envelope = msgpack.unpackb(body[4 : 4 + header_size])  # the header is plain msgpack for any other decoder
    assert sum(envelope.get("p", [])) == len(body) - 4 - header_size  # and the payloads fill the rest
    assert envelope["v"] == list(PROTOCOL_VERSION) and envelope["t"] == type_name


def test_round_trip_of_real_tensors_decodes_values():
    hidden = np.linspace(-3, 3, 2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    msg = InferenceStep(hidden=encode_array(hidden), position=5, step_id=1)
    decoded = decode_message(encode_message(msg))
    assert isinstance(decoded, InferenceStep)
    np.testing.assert_array_equal(decode_array(decoded.hidden), hidden)


# --------------------------------------------------------------------------- validation


_PAYLOAD = bytes(encode_array(np.zeros((1, 1, 2), dtype=np.float32)).data)


def _envelope(type_name, body, version=None, **extra):
    """A body whose one payload is the data of :func:`_tensor_map` (unused when no field refers to it)."""
    envelope = {"v": list(version or PROTOCOL_VERSION), "t": type_name, "b": body, "p": [len(_PAYLOAD)], **extra}
    return pack_body(envelope, [_PAYLOAD])


def _tensor_map():
    return {"dtype": "float32", "shape": [1, 1, 2], "compression": "none", "data": 0}


def _step(**changes):
    body = {"hidden": _tensor_map(), "position": 0, "step_id": 0}
    body.update(changes)
    return {key: value for key, value in body.items() if value is not _DROP}


_DROP = object()


def _code_of(body: bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode_message(body)
    return info.value.code


def test_field_types_are_checked():
    assert isinstance(decode_message(_envelope("inference_step", _step())), InferenceStep)
    invalid = ErrorCode.INVALID_MESSAGE
    assert _code_of(_envelope("inference_step", _step(position=-1))) is invalid
    assert _code_of(_envelope("inference_step", _step(position=2**63))) is invalid
    assert _code_of(_envelope("inference_step", _step(position=True))) is invalid
    assert _code_of(_envelope("inference_step", _step(position=1.0))) is invalid
    assert _code_of(_envelope("inference_step", _step(position="1"))) is invalid
    assert _code_of(_envelope("inference_step", _step(step_id=None))) is invalid
    assert _code_of(_envelope("inference_step", _step(step_id=_DROP))) is invalid
    assert _code_of(_envelope("inference_step", _step(hidden=[1, 2]))) is ErrorCode.BAD_TENSOR
    assert _code_of(_envelope("inference_step", _step(hidden={"dtype": "float32"}))) is ErrorCode.BAD_TENSOR
    bad_codec = {**_tensor_map(), "compression": "zstd"}
    assert _code_of(_envelope("inference_step", _step(hidden=bad_codec))) is ErrorCode.BAD_TENSOR
    as_bin = {**_tensor_map(), "data": _PAYLOAD}  # version 1 carried the data inside the map
    assert _code_of(_envelope("inference_step", _step(hidden=as_bin))) is ErrorCode.BAD_TENSOR
    out_of_range = {**_tensor_map(), "data": 1}
    assert _code_of(_envelope("inference_step", _step(hidden=out_of_range))) is ErrorCode.BAD_TENSOR


@pytest.mark.parametrize(
    ("type_name", "body"),
    [
        ("hello", {"protocol_version": [1], "model_id": "m"}),
        ("hello", {"protocol_version": [1, -1], "model_id": "m"}),
        ("hello", {"protocol_version": [1, 0], "model_id": b"m"}),
        ("forward_request", {"hidden": _tensor_map(), "start": 3, "end": 3}),
        ("forward_request", {"hidden": _tensor_map(), "start": 4, "end": 3}),
        ("forward_request", {"hidden": _tensor_map(), "start": 0, "end": MAX_BLOCK_INDEX + 1}),
        ("forward_request", {"hidden": _tensor_map(), "start": 0, "end": 1, "response_compression": "zip"}),
        ("forward_request", {"hidden": _tensor_map(), "start": 0, "end": 1, "response_compression": 1}),
        ("inference_open", {"session_id": b"", "start": 0, "end": 1, "max_length": 8, "batch_size": 1}),
        ("inference_open", {"session_id": b"s" * 65, "start": 0, "end": 1, "max_length": 8, "batch_size": 1}),
        ("inference_open", {"session_id": "s", "start": 0, "end": 1, "max_length": 8, "batch_size": 1}),
        ("inference_open", {"session_id": b"s", "start": 0, "end": 1, "max_length": 0, "batch_size": 1}),
        ("inference_open", {"session_id": b"s", "start": 0, "end": 1, "max_length": 8, "batch_size": 0}),
        ("inference_step_result", {"hidden": _tensor_map(), "step_id": 0, "compute_ms": -1.0}),
        ("inference_step_result", {"hidden": _tensor_map(), "step_id": 0, "compute_ms": float("nan")}),
        ("error", {"code": 100, "message": "m", "retryable": 1}),
        ("error", {"code": 70000, "message": "m"}),
        ("info_response", {}),
    ],
)
def test_invalid_fields_are_refused(type_name, body):
    assert _code_of(_envelope(type_name, body)) is ErrorCode.INVALID_MESSAGE


def test_strings_over_the_limit_are_refused_by_the_header_parser():
    # local construction says INVALID_MESSAGE; on the wire msgpack's max_str_len refuses it first
    with pytest.raises(ProtocolError) as info:
        Hello((1, 0), "x" * (MAX_STRING_BYTES + 1))
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    too_long = {"protocol_version": [1, 0], "model_id": "x" * (MAX_STRING_BYTES + 1)}
    assert _code_of(_envelope("hello", too_long)) is ErrorCode.MALFORMED_FRAME


def test_info_response_block_range_and_extra():
    base = dataclasses.asdict(InfoResponse("m", 0, 1, 2, "float32", 1, 1, 1, 1, "online", (1, 0), "0.1", "p"))
    base["protocol_version"] = [1, 0]
    assert isinstance(decode_message(_envelope("info_response", base)), InfoResponse)
    for changes in (
        {"block_start": 2, "block_end": 1},
        {"block_end": 3},
        {"dtype": "float64"},
        {"extra": [1]},
        {"extra": {"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": {"k": 1}}}}}}}}}},
    ):
        assert _code_of(_envelope("info_response", {**base, **changes})) is ErrorCode.INVALID_MESSAGE
    decoded = decode_message(_envelope("info_response", {**base, "extra": {"blob": b"\x01\x02"}}))
    assert isinstance(decoded, InfoResponse)
    assert type(decoded.extra["blob"]) is bytes  # owned, not a view of the frame


def test_local_construction_is_validated_too():
    with pytest.raises(ProtocolError) as info:
        ForwardRequest(hidden=encode_array(np.zeros(2, dtype=np.float32)), start=5, end=2)
    assert info.value.code is ErrorCode.INVALID_MESSAGE
    with pytest.raises(ProtocolError):
        InferenceStep(hidden=b"raw", position=0, step_id=0)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        InferenceStep(hidden=encode_array(np.zeros(2, dtype=np.float32)), position=np.int64(0), step_id=0)
    with pytest.raises(ProtocolError):
        InfoResponse("m", 0, 1, 1, "float32", 1, 1, 1, 1, "s", (1, 0), "v", "p", extra={"t": (1, 2)})
    assert InferenceStepResult(encode_array(np.zeros(1, dtype=np.float32)), 0, compute_ms=3).compute_ms == 3.0


def test_unknown_fields_are_ignored():
    decoded = decode_message(_envelope("inference_step", _step(future=[1, {"x": b"y"}])))
    assert isinstance(decoded, InferenceStep) and decoded.position == 0
    tensor = {**_tensor_map(), "future_tensor_key": "x"}
    assert isinstance(decode_message(_envelope("inference_step", _step(hidden=tensor))), InferenceStep)


def test_unknown_message_type():
    assert _code_of(_envelope("teleport", {})) is ErrorCode.UNKNOWN_MESSAGE


# --------------------------------------------------------------------------- versions


def test_newer_major_version_is_refused_with_both_versions_named():
    major, minor = PROTOCOL_VERSION
    with pytest.raises(ProtocolError) as info:
        decode_message(_envelope("teleport", {"anything": 1}, version=(major + 1, 3)))
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert f"{major + 1}.3" in info.value.message and f"{major}.{minor}" in info.value.message


def test_older_major_version_is_refused():
    assert (
        _code_of(_envelope("info_request", {}, version=(PROTOCOL_VERSION[0] - 1, 9))) is ErrorCode.UNSUPPORTED_VERSION
    )


def test_newer_minor_version_with_unknown_fields_is_accepted():
    body = _envelope(
        "inference_step",
        _step(new_optional_field={"deep": [1, 2]}),
        version=(PROTOCOL_VERSION[0], PROTOCOL_VERSION[1] + 5),
        new_envelope_key="ignored",
    )
    assert isinstance(decode_message(body), InferenceStep)


@pytest.mark.parametrize(
    "envelope",
    [
        [1, 0],
        {"t": "info_request", "b": {}},
        {"v": "1.0", "t": "info_request", "b": {}},
        {"v": [1], "t": "info_request", "b": {}},
        {"v": [1, -1], "t": "info_request", "b": {}},
        {"v": [1, 0.5], "t": "info_request", "b": {}},
        {"v": [PROTOCOL_VERSION[0], 0], "b": {}},
        {"v": [PROTOCOL_VERSION[0], 0], "t": 5, "b": {}},
        {"v": [PROTOCOL_VERSION[0], 0], "t": "info_request"},
        {"v": [PROTOCOL_VERSION[0], 0], "t": "info_request", "b": []},
    ],
)
def test_malformed_envelopes(envelope):
    assert _code_of(pack_body(envelope)) is ErrorCode.MALFORMED_FRAME


# --------------------------------------------------------------------------- hostile input

_any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=5,
)
_field_names = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})
_tensor_keys = ["dtype", "shape", "compression", "data", "scales"]


@st.composite
def _tensor_like(draw):
    keys = draw(st.lists(st.sampled_from(_tensor_keys), unique=True))
    good = _tensor_map()
    return {key: draw(st.just(good.get(key, b"")) | _any_value) for key in keys}


@settings(max_examples=200)
@given(
    type_name=st.sampled_from(sorted(MESSAGE_TYPES)),
    body=st.dictionaries(st.sampled_from(_field_names), _any_value | _tensor_like(), max_size=6),
)
def test_structured_garbage_raises_only_protocol_error(type_name, body):
    try:
        decode_message(_envelope(type_name, body))
    except ProtocolError:
        pass


@settings(max_examples=120)
@given(msg=messages, data=st.data())
def test_mutated_messages_raise_only_protocol_error(msg, data):
    body = bytearray(encode_message(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    try:
        decode_message(bytes(body))
    except ProtocolError:
        pass


# --------------------------------------------------------------------------- errors


def test_error_code_classes_and_retryability():
    assert str(ProtocolError(ErrorCode.CACHE_FULL, "no room")) == "[CACHE_FULL 300] no room"
    for code in ErrorCode:
        assert code.retryable == (int(code) >= 300)
        assert code.retryable == is_retryable(int(code))
    assert is_retryable(399) and is_retryable(599) and not is_retryable(299) and not is_retryable(600)
    assert ProtocolError(ErrorCode.DRAINING, "x").retryable


def test_protocol_error_pickles():
    exc = pickle.loads(pickle.dumps(ProtocolError(ErrorCode.TIMEOUT, "slow")))
    assert exc.code is ErrorCode.TIMEOUT and exc.message == "slow" and str(exc) == "[TIMEOUT 304] slow"


def test_error_message_round_trip():
    error = error_from_exception(ProtocolError(ErrorCode.OVERLOADED, "busy"))
    assert error == Error(code=302, message="busy", retryable=True)
    decoded = decode_message(encode_message(error))
    with pytest.raises(ProtocolError) as info:
        raise_if_error(decoded)
    assert info.value.code is ErrorCode.OVERLOADED and info.value.message == "busy"
    ok = InferenceClose()
    assert raise_if_error(ok) is ok


def test_unknown_remote_error_code_becomes_internal_keeping_the_number():
    with pytest.raises(ProtocolError) as info:
        raise_if_error(Error(code=777, message="new thing", retryable=True))
    assert info.value.code is ErrorCode.INTERNAL
    assert "777" in info.value.message and "new thing" in info.value.message


def test_long_error_messages_are_truncated_to_fit():
    error = error_from_exception(ProtocolError(ErrorCode.INTERNAL, "é" * 10_000 + "\ud800"))
    assert len(error.message.encode("utf-8")) <= MAX_STRING_BYTES
    decode_message(encode_message(error))


def test_expect_message():
    opened = InferenceOpened(session_id=b"s", cache_tokens_reserved=1)
    assert expect_message(opened, InferenceOpened) is opened
    with pytest.raises(ProtocolError) as info:
        expect_message(opened, ForwardResponse)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(ProtocolError) as info:
        expect_message(Error(code=400, message="bye"), ForwardResponse)
    assert info.value.code is ErrorCode.DRAINING


# --------------------------------------------------------------------------- public API


def test_all_is_explicit_and_complete():
    exported = set(protocols.__all__)
    assert len(exported) == len(protocols.__all__)
    assert all(hasattr(protocols, name) for name in exported)
    public = {
        name
        for name, value in vars(protocols).items()
        if not name.startswith("_") and not isinstance(value, type(protocols)) and name != "annotations"
    }
    assert public == exported
