"""Tensors on the wire: dtypes, shapes, raw little-endian payloads and lossy compression.

A :class:`WireTensor` is the wire form of one tensor: its *logical* dtype and shape, and
the payload bytes exactly as sent. A ``WireTensor`` that exists is structurally valid
(``__post_init__`` checks dtype, shape, and payload lengths against the compression), so
decoding from the wire and constructing locally share one set of checks.

numpy has no bfloat16, so bfloat16 tensors travel and are handed to callers as ``uint16``
arrays holding the raw bf16 bit patterns; :func:`bf16_bits_to_float32` and
:func:`float32_to_bf16_bits` convert. The byte-level format is specified in
protocols/README.md ("Tensors").
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.errors import ErrorCode, ProtocolError

ALLOWED_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")

MAX_TENSOR_ELEMENTS = 2**28
"""Most elements one tensor may declare (a 64 MiB frame holds far fewer float32 anyway)."""
MAX_TENSOR_DIMS = 8
BLOCKWISE8_BLOCK = 64
"""Values per block of the blockwise8 codec (one float32 scale per block)."""

# Wire (numpy) representation of each logical dtype: always little-endian.
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bf16 bits
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "bool": np.dtype("|b1"),
}
ITEM_BYTES: dict[str, int] = {name: dt.itemsize for name, dt in _NUMPY_DTYPES.items()}

# numpy dtype of an array -> logical dtype name, for encode_array(dtype=None).
_INFERRED: dict[np.dtype[Any], str] = {
    np.dtype("float32"): "float32",
    np.dtype("float16"): "float16",
    np.dtype("int64"): "int64",
    np.dtype("int32"): "int32",
    np.dtype("bool"): "bool",
}


class Compression(enum.StrEnum):
    """How a float tensor's values are coded on the wire (the string is the wire value)."""

    NONE = "none"  # raw little-endian values of the logical dtype
    FLOAT16 = "float16"  # IEEE half values; decoders convert back to the logical dtype
    BLOCKWISE8 = "blockwise8"  # int8 values with one float32 absmax scale per 64 values


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_TENSOR, message)


def _as_bytes_view(data: object, what: str) -> memoryview:
    if type(data) is memoryview and data.ndim == 1 and data.format == "B":
        return data  # already flat bytes (a received payload, a sent tensor's buffer)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad(f"tensor {what} must be bytes, got {type(data).__name__}")
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise _bad(f"tensor {what} buffer must be C-contiguous")
        view = view.cast("B")
    return view


def num_elements(shape: tuple[int, ...]) -> int:
    """Product of ``shape`` (1 for a scalar shape ``()``)."""
    return math.prod(shape)


@dataclass(frozen=True, slots=True)
class WireTensor:
    """One tensor as carried on the wire; valid by construction.

    ``data`` (and ``scales``) may be views into a received frame: decoding does not copy
    them. Construction raises ``ProtocolError(BAD_TENSOR)`` when the dtype is not allowed,
    the shape is not a tuple of 0..MAX_TENSOR_ELEMENTS ints with at most MAX_TENSOR_DIMS
    dims and a product of at most MAX_TENSOR_ELEMENTS, compression is used with a non-float
    dtype, or a payload length does not match the shape:

    * NONE: ``len(data) == n * itemsize(dtype)`` (bf16 and float16: 2, bool: 1)
    * FLOAT16: ``len(data) == 2 * n``
    * BLOCKWISE8: ``len(data) == n`` (int8) and ``len(scales) == 4 * ceil(n / 64)``

    ``scales`` must be empty unless compression is BLOCKWISE8.
    """

    dtype: str  # logical dtype of the tensor (one of ALLOWED_DTYPES)
    shape: tuple[int, ...]
    data: bytes | memoryview  # payload bytes as on the wire (raw LE for NONE)
    compression: Compression = Compression.NONE
    scales: bytes | memoryview = b""  # BLOCKWISE8 only: float32 LE absmax per 64-value block

    def __post_init__(self) -> None:
        if type(self.dtype) is not str or self.dtype not in ALLOWED_DTYPES:
            raise _bad(f"dtype {self.dtype!r} is not one of {', '.join(ALLOWED_DTYPES)}")
        if not isinstance(self.shape, tuple | list):
            raise _bad(f"shape must be a tuple of ints, got {type(self.shape).__name__}")
        if len(self.shape) > MAX_TENSOR_DIMS:
            raise _bad(f"tensor has {len(self.shape)} dims; at most {MAX_TENSOR_DIMS} allowed")
        for dim in self.shape:
            if type(dim) is not int or not 0 <= dim <= MAX_TENSOR_ELEMENTS:
                raise _bad(f"shape {self.shape!r}: every dim must be an int in [0, {MAX_TENSOR_ELEMENTS}]")
        if type(self.shape) is not tuple:  # torch.Size, list: store a plain tuple
            object.__setattr__(self, "shape", tuple(self.shape))
        n = num_elements(self.shape)
        if n > MAX_TENSOR_ELEMENTS:
            raise _bad(f"shape {self.shape} has {n} elements; at most {MAX_TENSOR_ELEMENTS} allowed")
        if n == 0 and num_elements(tuple(d for d in self.shape if d)) > MAX_TENSOR_ELEMENTS:
            # an empty tensor's other dims still size numpy's and torch's bookkeeping (found by fuzzing:
            # numpy refuses to even reshape an empty array to [0, 46, 1304, 7222, 45947, 115846])
            raise _bad(f"shape {self.shape}: the non-zero dims multiply to over {MAX_TENSOR_ELEMENTS}")
        if not isinstance(self.compression, Compression):
            raise _bad(f"compression must be a Compression, got {self.compression!r}")
        data = self.data if type(self.data) is bytes else _as_bytes_view(self.data, "data")
        scales = self.scales if type(self.scales) is bytes else _as_bytes_view(self.scales, "scales")
        if data is not self.data:
            object.__setattr__(self, "data", data)
        if scales is not self.scales:
            object.__setattr__(self, "scales", scales)

        if self.compression is Compression.NONE:
            expected = n * ITEM_BYTES[self.dtype]
        else:
            if self.dtype not in FLOAT_DTYPES:
                raise _bad(f"compression {self.compression.value} applies only to float dtypes, not {self.dtype}")
            expected = 2 * n if self.compression is Compression.FLOAT16 else n
        if len(data) != expected:  # bytes, or a flat view of bytes: its length is its size
            raise _bad(
                f"{self.dtype} tensor of shape {self.shape} with compression {self.compression.value} "
                f"needs {expected} data bytes, got {len(data)}"
            )
        expected_scales = 4 * _num_blocks(n) if self.compression is Compression.BLOCKWISE8 else 0
        if len(scales) != expected_scales:
            raise _bad(f"tensor needs {expected_scales} scale bytes, got {len(scales)}")

    @property
    def num_elements(self) -> int:
        """Number of elements (product of the shape)."""
        return num_elements(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the payload occupies on the wire (data plus scales)."""
        return len(self.data) + len(self.scales)


def _num_blocks(n: int) -> int:
    return -(-n // BLOCKWISE8_BLOCK)


# --------------------------------------------------------------------------- bfloat16


def bf16_bits_to_float32(bits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Widen raw bfloat16 bit patterns (uint16) to float32 values. Exact (bf16 is the top half of f32)."""
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def float32_to_bf16_bits(x: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """Round float values to bfloat16 (nearest, ties to even); return the raw uint16 bits.

    Input is first converted to float32 (so a float64 input is rounded twice). NaNs stay
    NaN (quiet NaN with the input's sign), infinities stay infinite, and finite values
    beyond bf16's range round to infinity as IEEE rounding requires.
    """
    values = np.asarray(x, dtype=np.float32)
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds to nearest even.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    result = np.array(rounded, dtype=np.uint16)  # an array even for 0-d input (ufuncs give scalars there)
    nan = np.isnan(values)
    if nan.any():
        result[nan] = ((bits[nan] >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    return result


# --------------------------------------------------------------------------- encode / decode


def _to_float32(array: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float32]:
    """Values of a logical-dtype array (bf16 as bits) as float32; exact for all float dtypes."""
    if dtype == "bfloat16":
        return bf16_bits_to_float32(array)
    return array.astype(np.float32, copy=False)


def _from_float32(values: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[Any]:
    """Round float32 values to the logical dtype (nearest even); bf16 comes back as bits."""
    if dtype == "bfloat16":
        return float32_to_bf16_bits(values)
    with np.errstate(over="ignore"):  # beyond float16's range becomes inf, as IEEE says
        return values.astype(_NUMPY_DTYPES[dtype], copy=False)


def _logical_array(array: npt.NDArray[Any], dtype: str | None) -> tuple[npt.NDArray[Any], str]:
    """Return (array in the wire numpy dtype of its logical dtype, logical dtype name)."""
    if dtype is None:
        name = _INFERRED.get(array.dtype.newbyteorder("="))
        if name is None:
            raise ValueError(
                f"cannot infer a wire dtype from numpy {array.dtype}; pass dtype= "
                f"(one of {', '.join(ALLOWED_DTYPES)}), e.g. dtype='bfloat16' for uint16 bf16 bits"
            )
        dtype = name
    elif dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(ALLOWED_DTYPES)}")
    if dtype == "bfloat16":
        if array.dtype.kind == "u" and array.dtype.itemsize == 2:
            return array, dtype
        if array.dtype.kind == "f":
            return float32_to_bf16_bits(array), dtype
        raise ValueError(f"dtype='bfloat16' needs uint16 bf16 bits or a float array, got {array.dtype}")
    return array.astype(_NUMPY_DTYPES[dtype], copy=False), dtype


def _le_bytes(array: npt.NDArray[Any], wire_dtype: np.dtype[Any]) -> memoryview:
    """Contiguous little-endian bytes of ``array`` as a flat memoryview; no copy when possible."""
    flat = np.ascontiguousarray(array, dtype=wire_dtype).reshape(-1)
    return flat.view(np.uint8).data


def encode_array(
    array: npt.NDArray[Any], dtype: str | None = None, compression: Compression = Compression.NONE
) -> WireTensor:
    """Encode a numpy array as a :class:`WireTensor` of logical dtype ``dtype``.

    ``dtype=None`` takes it from the array (float32, float16, int64, int32, bool). For
    ``dtype="bfloat16"`` pass a uint16 array of bf16 bits (used as is) or a float array
    (rounded to bf16, nearest even). Other explicit dtypes convert with numpy ``astype``.

    With Compression.NONE and a C-contiguous little-endian input, ``data`` is a view of the
    array's memory (no copy): do not mutate the array until the message is encoded.
    FLOAT16 and BLOCKWISE8 are lossy (see protocols/README.md for the bounds); they apply
    only to float dtypes. Misuse by the local caller (non-float compression, unknown
    dtype, non-finite values with BLOCKWISE8) raises ``ValueError``, not ProtocolError:
    it is a bug in the caller, not a remote peer's fault.
    """
    array = np.asarray(array)
    if not isinstance(compression, Compression):
        raise ValueError(f"compression must be a Compression, got {compression!r}")
    logical, name = _logical_array(array, dtype)
    shape = tuple(int(d) for d in logical.shape)
    if compression is Compression.NONE:
        return WireTensor(name, shape, _le_bytes(logical, _NUMPY_DTYPES[name]))
    if name not in FLOAT_DTYPES:
        raise ValueError(f"compression {compression.value} applies only to float dtypes, not {name}")
    if compression is Compression.FLOAT16:
        with np.errstate(over="ignore"):  # beyond +-65504 becomes inf, documented as lossy
            half = _to_float32(logical, name).astype("<f2")
        return WireTensor(name, shape, _le_bytes(half, np.dtype("<f2")), Compression.FLOAT16)
    q, scales = _blockwise8_encode(_to_float32(logical, name).reshape(-1))
    return WireTensor(name, shape, q.view(np.uint8).data, Compression.BLOCKWISE8, scales.view(np.uint8).data)


def _blockwise8_encode(values: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], npt.NDArray[Any]]:
    """Quantise flat float32 values: (int8 codes [n], float32 LE absmax per block [ceil(n/64)])."""
    if not np.isfinite(values).all():
        raise ValueError("blockwise8 cannot encode NaN or infinite values; use float16 or none")
    n = values.size
    blocks = _num_blocks(n)
    flat = np.zeros(blocks * BLOCKWISE8_BLOCK, dtype=np.float64)
    flat[:n] = values
    padded = flat.reshape(blocks, BLOCKWISE8_BLOCK)
    scales = np.abs(padded).max(axis=1) if blocks else np.zeros(0)  # exact float32 values
    # q = round_half_even(x * 127 / s) in binary64: x * 127 is exact, the division rounds once.
    safe = np.where(scales > 0, scales, 1.0)
    q = np.rint(padded * 127.0 / safe[:, None])
    q = np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:n]
    return np.ascontiguousarray(q), scales.astype("<f4")


def _blockwise8_decode(t: WireTensor) -> npt.NDArray[np.float32]:
    n = t.num_elements
    blocks = _num_blocks(n)
    scales = np.frombuffer(t.scales, dtype="<f4").astype(np.float64)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise _bad("blockwise8 scales must be finite and non-negative")
    q = np.zeros(blocks * BLOCKWISE8_BLOCK, dtype=np.float64)
    q[:n] = np.frombuffer(t.data, dtype=np.int8)
    # y = q * s / 127 in binary64 (q * s is exact), rounded once to float32.
    values = (q.reshape(blocks, BLOCKWISE8_BLOCK) * scales[:, None] / 127.0).reshape(-1)[:n]
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def decode_array(t: WireTensor) -> npt.NDArray[Any]:
    """Decode a :class:`WireTensor` to a numpy array of its logical dtype and shape.

    bfloat16 comes back as a uint16 array of raw bf16 bits. For Compression.NONE the
    result is a zero-copy view of ``t.data`` (read-only if the frame was ``bytes``; call
    ``.copy()`` for a writable array). Compressed tensors are decoded into a new array of
    the logical dtype. Raises ``ProtocolError(BAD_TENSOR)`` for a bool payload byte other
    than 0/1 or a negative / non-finite blockwise8 scale.
    """
    wire_dtype = _NUMPY_DTYPES[t.dtype]
    if t.compression is Compression.NONE:
        array = np.frombuffer(t.data, dtype=wire_dtype)
        if t.dtype == "bool" and array.view(np.uint8).max(initial=0) > 1:
            raise _bad("bool tensor bytes must be 0 or 1")
        return array.reshape(t.shape)
    if t.compression is Compression.FLOAT16:
        values = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    else:
        values = _blockwise8_decode(t)
    if t.dtype == "float32":
        return values.reshape(t.shape)
    return _from_float32(values, t.dtype).reshape(t.shape)


def raw_payload(t: WireTensor) -> memoryview:
    """The tensor's values as raw little-endian bytes of its logical dtype (bf16: raw bits).

    Zero copy for Compression.NONE (a view of ``t.data``, e.g. for ``torch.frombuffer``);
    compressed tensors are decoded first, so the view is of a new buffer.
    """
    if t.compression is Compression.NONE:
        if t.dtype == "bool":
            decode_array(t)  # validates 0/1 bytes
        return memoryview(t.data)
    return np.ascontiguousarray(decode_array(t)).reshape(-1).view(np.uint8).data
