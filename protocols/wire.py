"""The header form of messages and tensors: message <-> body map, tensor <-> map + payload.

Decoding checks every field's wire type here and every value's range in the message class
(``protocols.messages``), so bytes from a hostile peer become a valid message or a ProtocolError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from protocols.errors import ErrorCode, ProtocolError
from protocols.fields import invalid
from protocols.messages import MESSAGE_TYPES, Message
from protocols.tensors import Compression, WireTensor

__all__ = ["Payloads", "message_from_wire", "message_to_wire", "tensor_from_wire", "tensor_to_wire"]

# --------------------------------------------------------------------------- wire form

# Payload segments of one frame: an encoder appends the buffers it will send after the header
# (no copy); a decoder holds zero-copy views of the frame body, indexed from the header.
Payloads = list[bytes | memoryview]


def _add_payload(data: bytes | memoryview, payloads: Payloads) -> int:
    payloads.append(data)
    return len(payloads) - 1


def _payload(value: Any, payloads: Payloads, where: str, code: ErrorCode) -> bytes | memoryview:
    if type(value) is not int or not 0 <= value < len(payloads):
        raise ProtocolError(code, f"{where} must be the index of one of the frame's {len(payloads)} payloads")
    return payloads[value]


def tensor_to_wire(t: WireTensor, payloads: Payloads) -> dict[str, Any]:
    """The header map of a tensor (dtype, shape, compression, payload indices); payloads appended."""
    wire: dict[str, Any] = {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "compression": t.compression.value,
        "data": _add_payload(t.data, payloads),
    }
    if t.compression is Compression.BLOCKWISE8:
        wire["scales"] = _add_payload(t.scales, payloads)
    return wire


def tensor_from_wire(value: Any, payloads: Payloads, where: str = "tensor") -> WireTensor:
    """Build a WireTensor from its header map and the frame's payloads; anything wrong is BAD_TENSOR."""
    if type(value) is not dict:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where} must be a map, got {type(value).__name__}")
    for key in ("dtype", "shape", "data"):
        if key not in value:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where} is missing {key!r}")
    shape = value["shape"]
    if type(shape) is not list:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.shape must be an array")
    data = _payload(value["data"], payloads, f"{where}.data", ErrorCode.BAD_TENSOR)
    scales = _payload(value["scales"], payloads, f"{where}.scales", ErrorCode.BAD_TENSOR) if "scales" in value else b""
    compression = value.get("compression", Compression.NONE.value)
    try:
        codec = Compression(compression) if type(compression) is str else None
    except ValueError:
        codec = None
    if codec is None:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.compression {compression!r:.40} is not known")
    try:
        return WireTensor(value["dtype"], tuple(shape), data, codec, scales)
    except ProtocolError as exc:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}: {exc.message}") from None


def _decode_compression(where: str, value: Any, payloads: Payloads) -> Any:
    if type(value) is not str:
        raise invalid(f"{where} must be a str, got {type(value).__name__}")
    try:
        return Compression(value)
    except ValueError:
        raise invalid(f"{where}: unknown compression {value!r:.40}") from None


def _decode_dict(where: str, value: Any, payloads: Payloads) -> Any:
    if type(value) is not dict:
        raise invalid(f"{where} must be a map, got {type(value).__name__}")
    return value


def _decode_blob(where: str, value: Any, payloads: Payloads) -> Any:
    return bytes(_payload(value, payloads, where, ErrorCode.INVALID_MESSAGE))


# How each field type travels: (wire -> field value, field value -> wire). Type checks and
# ranges are left to __post_init__, which sees local and remote values alike. Tensors and blobs
# travel as payloads after the header; the header holds their index.
_Codec = tuple[Callable[[str, Any, Payloads], Any], Callable[[Any, Payloads], Any]]
_FIELD_CODECS: dict[str, _Codec] = {
    "int": (lambda where, v, p: v, lambda v, p: v),
    "str": (lambda where, v, p: v, lambda v, p: v),
    "bool": (lambda where, v, p: v, lambda v, p: v),
    "float": (lambda where, v, p: float(v) if type(v) is int else v, lambda v, p: v),
    "bytes": (lambda where, v, p: v, lambda v, p: v),
    "Blob": (_decode_blob, _add_payload),
    "tuple[int, int]": (lambda where, v, p: tuple(v) if type(v) is list else v, lambda v, p: list(v)),
    "Compression": (_decode_compression, lambda v, p: v.value),
    "WireTensor": (lambda where, v, p: tensor_from_wire(v, p, where), tensor_to_wire),
    "dict[str, Any]": (_decode_dict, lambda v, p: v),
}

# Per message class: (field name, wire->value, value->wire, required).
_FieldSpec = tuple[str, Callable[[str, Any, Payloads], Any], Callable[[Any, Payloads], Any], bool]
_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {
    cls: tuple(
        (
            f.name,
            *_FIELD_CODECS[str(f.type)],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )
    for cls in MESSAGE_TYPES.values()
}


def message_to_wire(msg: Message, payloads: Payloads) -> dict[str, Any]:
    """The body map of ``msg`` (field name -> msgpack-ready value), in field order.

    Tensor and blob buffers are appended to ``payloads`` (not copied); the map holds their index.
    """
    return {name: to_wire(getattr(msg, name), payloads) for name, _, to_wire, _ in _SPECS[type(msg)]}


def message_from_wire(type_name: str, body: dict[str, Any], payloads: Payloads) -> Message:
    """Build the message named ``type_name`` from its decoded body map and the frame's payloads.

    Unknown fields are ignored. Raises ProtocolError: UNKNOWN_MESSAGE for an unknown
    type name, INVALID_MESSAGE for a missing / mistyped / out-of-range field, BAD_TENSOR
    for a bad tensor.
    """
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {type_name!r:.80}")
    kwargs: dict[str, Any] = {}
    for name, from_wire, _, required in _SPECS[cls]:
        if name in body:
            kwargs[name] = from_wire(f"{type_name}.{name}", body[name], payloads)
        elif required:
            raise invalid(f"{type_name} is missing required field {name!r}")
    return cls(**kwargs)
