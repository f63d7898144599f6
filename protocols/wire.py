"""The msgpack wire form of messages and tensors: message <-> body map, tensor <-> map.

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

__all__ = ["message_from_wire", "message_to_wire", "tensor_from_wire", "tensor_to_wire"]

# --------------------------------------------------------------------------- wire form


def tensor_to_wire(t: WireTensor) -> dict[str, Any]:
    """The msgpack map of a tensor: dtype, shape, compression, data (+ scales for blockwise8)."""
    wire: dict[str, Any] = {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "compression": t.compression.value,
        "data": t.data,
    }
    if t.compression is Compression.BLOCKWISE8:
        wire["scales"] = t.scales
    return wire


def tensor_from_wire(value: Any, where: str = "tensor") -> WireTensor:
    """Build a WireTensor from its decoded msgpack map; anything wrong is BAD_TENSOR."""
    if type(value) is not dict:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where} must be a map, got {type(value).__name__}")
    for key in ("dtype", "shape", "data"):
        if key not in value:
            raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where} is missing {key!r}")
    shape, data = value["shape"], value["data"]
    scales = value.get("scales", b"")
    compression = value.get("compression", Compression.NONE.value)
    if type(shape) is not list:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.shape must be an array")
    if not isinstance(data, memoryview | bytes) or not isinstance(scales, memoryview | bytes):
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"{where}.data and .scales must be bin")
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


def _plain_from_wire(value: Any) -> Any:
    # bin inside extra arrives as a view of the frame; own it so the frame can be freed.
    if isinstance(value, memoryview):
        return bytes(value)
    if type(value) is list:
        return [_plain_from_wire(item) for item in value]
    if type(value) is dict:
        return {key: _plain_from_wire(item) for key, item in value.items()}
    return value


def _decode_compression(where: str, value: Any) -> Any:
    if type(value) is not str:
        raise invalid(f"{where} must be a str, got {type(value).__name__}")
    try:
        return Compression(value)
    except ValueError:
        raise invalid(f"{where}: unknown compression {value!r:.40}") from None


def _decode_dict(where: str, value: Any) -> Any:
    if type(value) is not dict:
        raise invalid(f"{where} must be a map, got {type(value).__name__}")
    return _plain_from_wire(value)


# How each field type travels: (wire -> field value, field value -> wire). Type checks and
# ranges are left to __post_init__, which sees local and remote values alike.
_Codec = tuple[Callable[[str, Any], Any], Callable[[Any], Any]]
_FIELD_CODECS: dict[str, _Codec] = {
    "int": (lambda where, v: v, lambda v: v),
    "str": (lambda where, v: v, lambda v: v),
    "bool": (lambda where, v: v, lambda v: v),
    "float": (lambda where, v: float(v) if type(v) is int else v, lambda v: v),
    "bytes": (lambda where, v: bytes(v) if isinstance(v, memoryview) else v, lambda v: v),
    "tuple[int, int]": (lambda where, v: tuple(v) if type(v) is list else v, list),
    "Compression": (_decode_compression, lambda v: v.value),
    "WireTensor": (lambda where, v: tensor_from_wire(v, where), tensor_to_wire),
    "dict[str, Any]": (_decode_dict, lambda v: v),
}

# Per message class: (field name, wire->value, value->wire, required).
_FieldSpec = tuple[str, Callable[[str, Any], Any], Callable[[Any], Any], bool]
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


def message_to_wire(msg: Message) -> dict[str, Any]:
    """The body map of ``msg`` (field name -> msgpack-ready value), in field order."""
    return {name: to_wire(getattr(msg, name)) for name, _, to_wire, _ in _SPECS[type(msg)]}


def message_from_wire(type_name: str, body: dict[str, Any]) -> Message:
    """Build the message named ``type_name`` from its decoded body map.

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
            kwargs[name] = from_wire(f"{type_name}.{name}", body[name])
        elif required:
            raise invalid(f"{type_name} is missing required field {name!r}")
    return cls(**kwargs)
