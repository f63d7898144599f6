"""Hosted blocks with 8-bit or 4-bit linear weights (docs/decisions.md section 9).

``--quant int8`` stores every linear weight of a block as int8 with one scale per output row
(bitsandbytes' LLM.int8 layer: on CUDA inputs are quantised too, their outlier columns above
``INT8_THRESHOLD`` multiplied in 16-bit; on the CPU the rows are dequantised for the matmul).
``--quant nf4`` stores them as 4-bit NormalFloat in blocks of 64 with double-quantised scales
(QLoRA's format). ``--quant int4`` stores them as 4-bit codes in groups of 32 with a float16
scale and minimum each (GGUF Q4_1's layout, 5.0 bits per weight with the scales; ``int4.py``): the
4-bit format that meets the quality target on SmolLM2, whose shipped checkpoint is itself Q4_1.
Norms, biases, the RoPE tables and Mixtral's router stay in the compute dtype:
they are tiny, and the router's choices are discrete (a rounding flip would change which experts
run). Quantization is deterministic, so two peers quantizing the same checkpoint hold the same
weights and a client can recompute a quantized peer's work at the same precision.

bitsandbytes is imported only when a block is quantized to int8 or nf4: a peer with ``--quant none``
or ``int4`` never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peerd.model.int4 import INT4_BITS_PER_WEIGHT, INT4_GROUP, Int4CpuLinear, Int4Linear, cpu_kernel_fits
from peerd.model.linear import Linear
from peerd.model.llama import Attention

__all__ = [
    "BITS_PER_WEIGHT",
    "INT8_THRESHOLD",
    "NF4_BLOCKSIZE",
    "PRECISION_BITS",
    "QUANTS",
    "precision_bits",
    "quantize_linears",
    "weight_bytes",
]

QUANTS = ("none", "int8", "nf4", "int4")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and Petals' default)
NF4_BLOCKSIZE = 64  # weights per 4-bit scale (QLoRA's choice; the scales are quantised again)
# bits per weight of each precision a client may ask for (--min-precision): a peer's precision is its
# quantization if it has one, else its dtype
PRECISION_BITS = {"nf4": 4, "int4": 4, "int8": 8, "float16": 16, "bfloat16": 16, "float32": 32}
# stored bits per weight of a large linear, its scales included (what the memory numbers follow):
# int8 one float32 scale per row, nf4 blocks of 64 with 8-bit scales in float32 groups of 256, int4
# float16 scale and minimum per 32
BITS_PER_WEIGHT = {"int8": 8.0, "nf4": 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * 256), "int4": INT4_BITS_PER_WEIGHT}


def precision_bits(dtype: str, quant: str) -> int:
    """Bits per stored weight of a peer computing in ``dtype`` with ``quant`` (0 when unknown)."""
    if quant and quant != "none":
        return PRECISION_BITS.get(quant, 0)
    return PRECISION_BITS.get(dtype, 0)


_CPU_INT8: type[nn.Module] | None = None


def _bnb() -> Any:
    # bitsandbytes logs on the first CPU 4-bit matmul that an optional hub kernel is missing (peers
    # cannot download kernels; its built-in CPU path is what we measured and use), and on every
    # LLM.int8 matmul that inputs are cast to float16 (which is how that kernel works).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def _cpu_int8_layer(bnb: Any) -> type[nn.Module]:
    """bitsandbytes' int8 layer held in its weight-only mode on the CPU, for accuracy.

    On CUDA, ``Linear8bitLt`` runs LLM.int8 (int8 activations, 16-bit outliers). On the CPU, in eval
    mode it emulates that; in training mode it dequantises the int8 rows and multiplies in the
    input's dtype (``MatMul8bitFp``). Measured on SmolLM2 (docs/decisions.md): the emulation costs
    +2.7% perplexity, the weight-only mode +0.4%, at about the same speed. This layer keeps the
    weight-only mode whatever ``.eval()`` says; its weights stay frozen (``requires_grad=False``),
    so "training" changes nothing else. bfloat16 inputs multiply with torch's int8 kernel instead
    (the same codes and scales; :func:`_int8_cpu_kernel`).
    """
    global _CPU_INT8
    if _CPU_INT8 is None:

        class WeightOnlyInt8Linear(bnb.nn.Linear8bitLt):  # type: ignore[misc, name-defined]
            def train(self, mode: bool = True) -> WeightOnlyInt8Linear:
                return super().train(True)  # type: ignore[no-any-return]

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = _int8_cpu_kernel(self, x)
                return super().forward(x) if out is None else out  # type: ignore[no-any-return]

        _CPU_INT8 = WeightOnlyInt8Linear
    return _CPU_INT8


# torch's int8 weight-only product on the CPU (``x [m, in]`` by int8 rows with one scale each): the
# layout of bitsandbytes' int8 weights (codes and a per-row absmax, w = code * absmax / 127). For
# bfloat16 inputs it is vectorised: a decode step of 10 SmolLM2 blocks took 3.8 ms with it against
# 18.0 ms through bitsandbytes in bfloat16 and 8.1 ms with float32 weights (dev box, one thread); for
# float32 inputs it is a scalar loop (~10x slower than bitsandbytes'), so those keep bitsandbytes.
_INT8_KERNEL = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def _int8_cpu_kernel(layer: Any, x: torch.Tensor) -> torch.Tensor | None:  # a WeightOnlyInt8Linear
    """``layer``'s output for ``x`` from torch's int8 kernel, or None where it does not apply: inputs
    that are not bfloat16 on the CPU, or that need a gradient, or weights not (yet) in int8."""
    weight = layer.weight
    if _INT8_KERNEL is None or x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.int8:
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return None
    absmax = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB  # moved on first use
    if absmax is None:
        return None
    scales = getattr(layer, "_kernel_scales", None)
    if scales is None or scales.shape[0] != absmax.shape[0]:
        scales = layer._kernel_scales = (absmax.float() / 127).to(torch.bfloat16)  # [out]
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel takes dense rows only
    out: torch.Tensor = _INT8_KERNEL(flat, weight.data, scales).reshape(*x.shape[:-1], weight.shape[0])
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


def _linears(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            # Mixtral's router (SparseMoE.gate) stays exact: top-k picks are discrete
            if type(child) in (nn.Linear, Linear) and not (name == "gate" and hasattr(parent, "experts")):
                assert isinstance(child, nn.Linear)  # narrows the type for mypy (checked just above)
                yield parent, name, child


def quantize_linears(module: nn.Module, quant: str, device: str | torch.device) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` by a layer holding its weight in ``quant``.

    The linears must hold real weights (on the CPU or on ``device``) in the compute dtype; the
    quantised layers land on ``device`` and compute in that dtype. ``quant="none"`` changes nothing.
    int8 and nf4 are bitsandbytes layers whose parameter names keep the checkpoint's
    (``...q_proj.weight``, scales beside them); int4 layers hold buffers ``packed``, ``scale``,
    ``minimum`` (:class:`~peerd.model.int4.Int4Linear`).
    """
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; one of {', '.join(QUANTS)}")
    if quant == "none":
        return module
    device = torch.device(device)
    if quant == "int4":
        for parent, name, linear in list(_linears(module)):
            if linear.in_features % INT4_GROUP:
                raise ValueError(
                    f"int4 needs linear inputs in multiples of {INT4_GROUP}; {name} has {linear.in_features} "
                    "(use --quant int8 for this model)"
                )
            # bfloat16 on the CPU: torch's packed int4 kernel (int4.py), ~50x the dequantising layer
            cpu_kernel = device.type == "cpu" and linear.weight.dtype == torch.bfloat16
            if cpu_kernel and cpu_kernel_fits(linear.out_features, linear.in_features):
                setattr(parent, name, Int4CpuLinear.from_linear(linear))
            else:
                setattr(parent, name, Int4Linear.from_linear(linear).to(device))
        return _mark_row_invariant(module)
    bnb = _bnb()
    for parent, name, linear in list(_linears(module)):
        if quant == "nf4" and linear.in_features % NF4_BLOCKSIZE:
            raise ValueError(
                f"nf4 needs linear inputs in multiples of {NF4_BLOCKSIZE}; {name} has {linear.in_features} "
                "(use --quant int8 for this model)"
            )
        weight, bias = linear.weight.data, linear.bias
        dtype = weight.dtype
        layer: nn.Module
        if quant == "int8":
            layer = (_cpu_int8_layer(bnb) if device.type == "cpu" else bnb.nn.Linear8bitLt)(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=INT8_THRESHOLD,
                device="meta",
            )
            # Int8Params quantises only when it moves *from the CPU*; weights read onto a GPU go back first
            layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=bias is not None,
                compute_dtype=dtype,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
        if bias is not None:
            layer.bias = nn.Parameter(bias.data, requires_grad=False)
        setattr(parent, name, layer.to(device))  # bitsandbytes quantises as the weight moves to its device
    return _mark_row_invariant(module)


def _row_invariant(layer: nn.Module) -> bool:
    """Whether ``layer`` computes each row alike whatever rows come with it: torch's int4 and int8 CPU
    kernels do (checked up to 40 rows, every SmolLM2 shape); oneDNN's bfloat16 products over 1536
    inputs do not (2 to 17 rows against one at a time: 78 of 100 random inputs differed)."""
    if isinstance(layer, Int4CpuLinear):
        return True
    weight = getattr(layer, "weight", None)
    return _CPU_INT8 is not None and isinstance(layer, _CPU_INT8) and weight is not None and weight.device.type == "cpu"


def _mark_row_invariant(module: nn.Module) -> nn.Module:
    """Let attention under ``module`` (a block) attend one new token at a time when every product in
    it is row-invariant and computes in bfloat16 (``Attention.one_token_at_a_time``): a step of several
    tokens then computes exactly what as many one-token steps would."""
    products = [m for m in module.modules() if isinstance(m, (nn.Linear, Int4Linear, Int4CpuLinear))]
    norms = [p for n, p in module.named_parameters() if n.endswith("norm.weight")]
    bfloat16 = bool(norms) and all(p.dtype == torch.bfloat16 for p in norms)
    alike = bool(products) and bfloat16 and all(_row_invariant(m) for m in products)
    for m in module.modules():
        if isinstance(m, Attention):
            m.one_token_at_a_time = alike
    return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every tensor the module holds (parameters, buffers, quantisation scales), each storage once.

    This is the real size of loaded weights: for a quantised block it counts the int8/4-bit
    storage plus bitsandbytes' scales and code books, which a parameter count would not.
    """
    seen: set[int] = set()
    total = 0

    def count(tensor: torch.Tensor) -> None:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for tensor in [*module.parameters(), *module.buffers()]:
        count(tensor)
        state = getattr(tensor, "quant_state", None)  # nf4: absmax, code book, nested scales
        if state is not None:
            for value in state.as_dict(packed=True).values():
                if isinstance(value, torch.Tensor):
                    count(value)
    for layer in module.modules():  # int8: one scale per row, kept on the weight's state
        scales = getattr(getattr(layer, "weight", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            count(scales)
    return total
