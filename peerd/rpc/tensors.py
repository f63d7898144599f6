"""torch <-> wire tensors (protocols/ is torch-free; this is the one bridge)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from protocols import Compression, ErrorCode, ProtocolError, WireTensor, decode_array, encode_array

__all__ = ["TORCH_DTYPES", "from_wire", "to_wire"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def to_wire(tensor: torch.Tensor, compression: Compression = Compression.NONE) -> WireTensor:
    """Encode a CPU or device tensor (moved to CPU; bf16 travels as its raw 16-bit pattern)."""
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent; allowed: {sorted(TORCH_DTYPES)}")
    cpu = tensor.detach().to("cpu").contiguous()
    # bf16 travels as its raw 16-bit pattern (numpy has no bfloat16)
    array = cpu.view(torch.int16).numpy().view(np.uint16) if tensor.dtype is torch.bfloat16 else cpu.numpy()
    return encode_array(array, dtype=name, compression=compression)


def from_wire(wire: WireTensor) -> torch.Tensor:
    """Decode to a CPU tensor without copying when the payload is uncompressed.

    The result may share memory with the received frame (read-only bytes), so callers that modify
    it in place must clone first; the model code never does.
    """
    array = decode_array(wire)
    try:
        dtype = TORCH_DTYPES[wire.dtype]
    except KeyError:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"dtype {wire.dtype!r} not allowed") from None
    shape = tuple(wire.shape)
    if array.size == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = memoryview(np.ascontiguousarray(array).data).cast("B")
    with warnings.catch_warnings():
        # received frames are immutable bytes; torch warns that it cannot mark the tensor read-only.
        # Nothing downstream writes into inputs, and copying every activation would cost bandwidth.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=dtype)
    return flat.view(shape)
