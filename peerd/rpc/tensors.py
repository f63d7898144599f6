"""torch <-> wire tensors (protocols/ is torch-free; this is the one bridge).

Uncompressed tensors, what every decode hop carries, skip numpy: ``to_wire`` hands the wire a
byte view of the tensor's own memory, ``from_wire`` wraps the received bytes with
``torch.frombuffer``; neither copies. The wire is little-endian; on a big-endian host (and for
compressed or bool tensors) both go through :func:`protocols.encode_array` / ``decode_array``.
"""

from __future__ import annotations

import sys
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
_LITTLE_ENDIAN = sys.byteorder == "little"

# Received frames are immutable bytes, so torch warns that it cannot mark a tensor wrapping one as
# read-only. Nothing downstream writes into inputs, and copying every activation would cost
# bandwidth. torch gives that warning once per process: it is given here, silenced, so that no
# decode needs a ``catch_warnings`` block (which cost more than the rest of the decode).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(bytes(4), dtype=torch.float32)


def to_wire(tensor: torch.Tensor, compression: Compression = Compression.NONE) -> WireTensor:
    """Encode a CPU or device tensor (moved to CPU; bf16 travels as its raw 16-bit pattern).

    Uncompressed, the wire tensor's data is a view of the (CPU, contiguous) tensor's memory: do
    not modify the tensor until it is sent.
    """
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent; allowed: {sorted(TORCH_DTYPES)}")
    # a step's answer is encoded right after the forward, with the CPU caches full of weights: every
    # torch call here runs cold (~5x its warm time), so the usual case makes as few as it can
    if tensor.requires_grad or tensor.device.type != "cpu" or not tensor.is_contiguous():
        cpu = tensor.detach().to("cpu").contiguous()
    else:
        cpu = tensor
    if compression is Compression.NONE and _LITTLE_ENDIAN and cpu.numel():
        array = cpu.view(torch.int16).numpy() if tensor.dtype is torch.bfloat16 else cpu.numpy()
        return WireTensor(name, tuple(cpu.shape), array.data.cast("B"))  # the view keeps the tensor alive
    # bf16 travels as its raw 16-bit pattern (numpy has no bfloat16)
    array = cpu.view(torch.int16).numpy().view(np.uint16) if tensor.dtype is torch.bfloat16 else cpu.numpy()
    return encode_array(array, dtype=name, compression=compression)


def from_wire(wire: WireTensor) -> torch.Tensor:
    """Decode to a CPU tensor without copying when the payload is uncompressed.

    The result may share memory with the received frame (read-only bytes), so callers that modify
    it in place must clone first; the model code never does.
    """
    try:
        dtype = TORCH_DTYPES[wire.dtype]
    except KeyError:
        raise ProtocolError(ErrorCode.BAD_TENSOR, f"dtype {wire.dtype!r} not allowed") from None
    shape = tuple(wire.shape)
    if wire.compression is Compression.NONE and _LITTLE_ENDIAN and dtype is not torch.bool:
        # WireTensor checked that the payload holds exactly the shape's elements
        if not wire.data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(wire.data, dtype=dtype).view(shape)
    array = decode_array(wire)  # validates bool bytes, decompresses
    if array.size == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = memoryview(np.ascontiguousarray(array).data).cast("B")
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
