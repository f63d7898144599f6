"""Llama-family model code: config, blocks, pipeline stages, client head, KV cache and weight loading.

Servers host a :class:`Stage` (blocks ``[start, end)``) loaded with
:func:`load_stage`; clients run a :class:`ClientHead`; :class:`LocalModel` is the
whole model in one process, the reference for tests and benchmarks. Nothing
here imports the network stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peerd.lazy import lazy_attributes

if TYPE_CHECKING:
    from peerd.model.config import ModelConfig, RopeScaling
    from peerd.model.head import ClientHead
    from peerd.model.llama import MLP, Attention, Block, RMSNorm, RotaryEmbedding
    from peerd.model.loading import LoadStats, default_dtype_for, load_client_head, load_local_model, load_stage
    from peerd.model.local import LocalModel
    from peerd.model.stage import KVCache, Stage, cache_bytes_per_token

# Names load on first use (PEP 562), so importing one torch-free module of the package, such as
# ``peerd.model.registry`` while the CLI builds its parser, does not pull in torch.
_HOMES = {
    "MLP": "peerd.model.llama",
    "Attention": "peerd.model.llama",
    "Block": "peerd.model.llama",
    "ClientHead": "peerd.model.head",
    "KVCache": "peerd.model.stage",
    "LoadStats": "peerd.model.loading",
    "LocalModel": "peerd.model.local",
    "ModelConfig": "peerd.model.config",
    "RMSNorm": "peerd.model.llama",
    "RopeScaling": "peerd.model.config",
    "RotaryEmbedding": "peerd.model.llama",
    "Stage": "peerd.model.stage",
    "cache_bytes_per_token": "peerd.model.stage",
    "default_dtype_for": "peerd.model.loading",
    "load_client_head": "peerd.model.loading",
    "load_local_model": "peerd.model.loading",
    "load_stage": "peerd.model.loading",
}


__getattr__ = lazy_attributes(__name__, _HOMES)


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
