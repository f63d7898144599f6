"""Llama-family model code: config, blocks, pipeline stages, client head, KV cache and weight loading.

Servers host a :class:`Stage` (blocks ``[start, end)``) loaded with
:func:`load_stage`; clients run a :class:`ClientHead`; :class:`LocalModel` is the
whole model in one process, the reference for tests and benchmarks. Nothing
here imports the network stack.
"""

from __future__ import annotations

from peerd.model.config import ModelConfig, RopeScaling
from peerd.model.head import ClientHead
from peerd.model.llama import MLP, Attention, Block, RMSNorm, RotaryEmbedding
from peerd.model.loading import (
    LoadStats,
    default_dtype_for,
    load_client_head,
    load_local_model,
    load_stage,
)
from peerd.model.local import LocalModel
from peerd.model.stage import KVCache, Stage, cache_bytes_per_token

__all__ = [
    "MLP",
    "Attention",
    "Block",
    "ClientHead",
    "KVCache",
    "LoadStats",
    "LocalModel",
    "ModelConfig",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "Stage",
    "cache_bytes_per_token",
    "default_dtype_for",
    "load_client_head",
    "load_local_model",
    "load_stage",
]
