"""peerd's wire protocol: messages, framing, tensor codec and versions.

Pure Python + msgpack + numpy, so that the format (specified in protocols/README.md,
with golden vectors in protocols/vectors/) can be implemented in any language.
"""

from __future__ import annotations

from protocols.averaging import MAX_AVERAGE_WEIGHT, AverageAck, AveragePush, StateRequest, StateResponse
from protocols.errors import ErrorCode, ProtocolError, is_retryable
from protocols.fields import MAX_BLOCK_INDEX, MAX_SESSION_ID_BYTES, MAX_STRING_BYTES, MAX_UINT
from protocols.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    HEADER_BYTES,
    MAX_HEADER_BYTES,
    MAX_PAYLOADS,
    FrameDecoder,
    decode_message,
    encode_frame,
    encode_message,
    frame_parts,
    pack_body,
    read_body,
    read_frame,
    read_message,
    write_message,
    write_parts,
)
from protocols.messages import (
    MESSAGE_TYPES,
    BackwardRequest,
    BackwardResponse,
    Error,
    ForwardRequest,
    ForwardResponse,
    Hello,
    InferenceClose,
    InferenceOpen,
    InferenceOpened,
    InferenceStep,
    InferenceStepResult,
    InfoRequest,
    InfoResponse,
    Message,
    error_from_exception,
    expect_message,
    raise_if_error,
)
from protocols.network import (
    DialBackRequest,
    DialBackResult,
    RelayConnect,
    RelayedStream,
    RelayReserve,
    RelayReserved,
)
from protocols.push import InferenceLink, InferencePush, InferencePushed, input_digest
from protocols.tensors import (
    ALLOWED_DTYPES,
    BLOCKWISE8_BLOCK,
    FLOAT_DTYPES,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
    Compression,
    WireTensor,
    bf16_bits_to_float32,
    decode_array,
    encode_array,
    float32_to_bf16_bits,
    raw_payload,
)
from protocols.version import PROTOCOL_VERSION, check_version
from protocols.wire import message_from_wire, message_to_wire

STREAM_INFO = "peerd/info/1"
STREAM_FORWARD = "peerd/forward/1"
STREAM_BACKWARD = "peerd/backward/1"
STREAM_INFERENCE = "peerd/inference/1"
STREAM_DIALBACK = "peerd/dialback/1"
STREAM_RELAY = "peerd/relay/1"  # served by reachable peers: reservations and relayed streams
STREAM_RELAYED = "peerd/relayed/1"  # served by relayed peers: streams their relay opens for clients
STREAM_AVERAGE = "peerd/average/1"  # served by trainers of a collaborative run: pushes of a round
STREAM_STATE = "peerd/state/1"  # served by trainers of a collaborative run: the current adapter
STREAM_PUSH = "peerd/push/1"  # served by peers: the previous span's peer pushes a session's steps
"""libp2p stream (protocol handler) names: one stream per request, one per inference session."""

__all__ = [
    "ALLOWED_DTYPES",
    "BLOCKWISE8_BLOCK",
    "DEFAULT_MAX_FRAME_BYTES",
    "FLOAT_DTYPES",
    "HEADER",
    "HEADER_BYTES",
    "MAX_AVERAGE_WEIGHT",
    "MAX_BLOCK_INDEX",
    "MAX_HEADER_BYTES",
    "MAX_PAYLOADS",
    "MAX_SESSION_ID_BYTES",
    "MAX_STRING_BYTES",
    "MAX_TENSOR_DIMS",
    "MAX_TENSOR_ELEMENTS",
    "MAX_UINT",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "STREAM_AVERAGE",
    "STREAM_BACKWARD",
    "STREAM_DIALBACK",
    "STREAM_FORWARD",
    "STREAM_INFERENCE",
    "STREAM_INFO",
    "STREAM_PUSH",
    "STREAM_RELAY",
    "STREAM_RELAYED",
    "STREAM_STATE",
    "AverageAck",
    "AveragePush",
    "BackwardRequest",
    "BackwardResponse",
    "Compression",
    "DialBackRequest",
    "DialBackResult",
    "Error",
    "ErrorCode",
    "ForwardRequest",
    "ForwardResponse",
    "FrameDecoder",
    "Hello",
    "InferenceClose",
    "InferenceLink",
    "InferenceOpen",
    "InferenceOpened",
    "InferencePush",
    "InferencePushed",
    "InferenceStep",
    "InferenceStepResult",
    "InfoRequest",
    "InfoResponse",
    "Message",
    "ProtocolError",
    "RelayConnect",
    "RelayReserve",
    "RelayReserved",
    "RelayedStream",
    "StateRequest",
    "StateResponse",
    "WireTensor",
    "bf16_bits_to_float32",
    "check_version",
    "decode_array",
    "decode_message",
    "encode_array",
    "encode_frame",
    "encode_message",
    "error_from_exception",
    "expect_message",
    "float32_to_bf16_bits",
    "frame_parts",
    "input_digest",
    "is_retryable",
    "message_from_wire",
    "message_to_wire",
    "pack_body",
    "raise_if_error",
    "raw_payload",
    "read_body",
    "read_frame",
    "read_message",
    "write_message",
    "write_parts",
]
