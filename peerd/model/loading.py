"""Load slices of a Hugging Face-format checkpoint folder, reading only the tensors a slice needs.

A folder holds ``config.json`` and either ``model.safetensors`` or shards
listed by ``model.safetensors.index.json``. Modules are first built on the
``meta`` device (no memory, no random init), then each needed tensor is read on
its own with ``safetensors.safe_open(...).get_tensor``, converted to the target
dtype/device, and assigned in place of the meta parameter. Peak memory is the
slice itself plus one tensor.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm import tqdm

from peerd.model.config import ModelConfig
from peerd.model.head import ClientHead
from peerd.model.local import LocalModel
from peerd.model.quant import quantize_linears
from peerd.model.stage import Stage

__all__ = [
    "CheckpointFiles",
    "DamagedWeightsError",
    "LoadStats",
    "default_dtype_for",
    "load_client_head",
    "load_local_model",
    "load_stage",
]

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def default_dtype_for(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA (half the memory, tensor cores), float32 elsewhere: on a CPU with
    AVX512-BF16, with float32 products on oneDNN (model/linear.py), a decode step of 10 SmolLM2
    blocks took 7.1 ms in float32 and 6.5 in bfloat16, 16 sessions' steps 19.7 and 14.3 ms: not
    enough to change the numerics by default (docs/benchmarks.md); ``--dtype bfloat16`` opts in."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class LoadStats:
    """What a load actually read: tensor names in order and their bytes as stored on disk."""

    tensor_names: list[str] = field(default_factory=list)
    bytes_read: int = 0
    files_opened: set[str] = field(default_factory=set)


class DamagedWeightsError(ValueError):
    """A weights file cannot be read: truncated by an interrupted copy or download, or not safetensors."""

    def __init__(self, file: Path, cause: Exception) -> None:
        super().__init__(
            f"weights file {file} is damaged or truncated ({cause}); delete it and run `peerd model fetch` "
            "again (or copy the checkpoint anew)"
        )


@contextlib.contextmanager
def _open_weights(file: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise DamagedWeightsError(file, exc) from exc
    with handle as f:
        yield f


def _get_tensor(f: Any, file: Path, name: str) -> Tensor:
    try:
        return f.get_tensor(name)  # type: ignore[no-any-return]
    except (SafetensorError, OSError) as exc:
        raise DamagedWeightsError(file, exc) from exc


class CheckpointFiles:
    """Which safetensors file of a checkpoint folder holds each tensor name (headers only, no data).

    Raises ``FileNotFoundError`` when the folder has neither ``model.safetensors``
    nor ``model.safetensors.index.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / _INDEX_FILE
        single = self.path / _SINGLE_FILE
        self.file_of: dict[str, Path] = {}
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.file_of = {name: self.path / file for name, file in weight_map.items()}
        elif single.is_file():
            with _open_weights(single) as f:
                self.file_of = dict.fromkeys(f.keys(), single)
        else:
            found = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
            raise FileNotFoundError(f"no {_SINGLE_FILE} or {_INDEX_FILE} in {self.path} (found: {found})")

    def describe(self) -> str:
        """The file set, for error messages."""
        files = sorted({p.name for p in self.file_of.values()})
        return f"{self.path} ({', '.join(files)})"

    def read(
        self,
        names: Iterable[str],
        *,
        dtype: torch.dtype,
        device: str | torch.device,
        progress: bool,
        description: str,
        stats: LoadStats | None,
    ) -> dict[str, Tensor]:
        """Read exactly ``names``, converted to dtype/device; ValueError naming every missing tensor first."""
        names = list(names)
        missing = [name for name in names if name not in self.file_of]
        if missing:
            raise ValueError(f"checkpoint {self.describe()} lacks tensors: {', '.join(missing)}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors: dict[str, Tensor] = {}
        with tqdm(total=len(names), desc=description, unit="tensor", disable=not progress) as bar:
            for file, file_names in by_file.items():
                # One open per shard; get_tensor reads a single tensor's bytes, never the file.
                with _open_weights(file) as f:
                    for name in file_names:
                        stored = _get_tensor(f, file, name)
                        if stats is not None:
                            stats.tensor_names.append(name)
                            stats.bytes_read += stored.numel() * stored.element_size()
                            stats.files_opened.add(file.name)
                        tensors[name] = stored.to(device=device, dtype=dtype)
                        del stored
                        bar.update(1)
        return tensors


def _check_shapes(module: nn.Module, state: dict[str, Tensor], prefix: str, files: CheckpointFiles) -> None:
    expected = module.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"tensor {prefix}{name} in {files.describe()} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )


def load_stage(
    path: str | Path,
    start: int,
    end: int,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stats: LoadStats | None = None,
    reuse: Stage | None = None,
    quant: str = "none",
) -> Stage:
    """Load blocks ``[start, end)`` of the checkpoint folder ``path``, reading only their tensors.

    ``dtype`` defaults to :func:`default_dtype_for` the device. ``quant`` ("none", "int8",
    "nf4", "int4") stores the linear weights quantised (``quant.py``); blocks are read and quantised one at
    a time, so the peak is the quantised slice plus one block at full precision. ``stats``, when
    given, records every tensor read. ``reuse``: a stage already in memory (same dtype, device and
    quantization) whose blocks inside ``[start, end)`` are taken as they are instead of read again
    -- a peer that moves keeps the blocks that stay. Raises ``ValueError`` for an unsupported
    config, a block range outside the model, or missing/mis-shaped tensors (naming them and the
    file set).
    """
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    dtype = default_dtype_for(device) if dtype is None else dtype
    files = CheckpointFiles(path)
    with torch.device("meta"):
        stage = Stage(config, start, end)  # validates the range; no memory yet
    same_kind = reuse is not None and (reuse.dtype, reuse.device, reuse.quant) == (dtype, torch.device(device), quant)
    for index in tqdm(range(start, end), desc=f"blocks {start}:{end}", unit="block", disable=not progress):
        key = str(index)
        if same_kind and reuse is not None and reuse.start <= index < reuse.end:
            stage.layers[key] = reuse.layers[key]
            continue
        block = stage.layers[key]
        prefix = f"model.layers.{index}."
        read = files.read(
            (prefix + name for name in block.state_dict()),
            dtype=dtype,
            device=device,
            progress=False,
            description=f"block {index}",
            stats=stats,
        )
        state = {name.removeprefix(prefix): tensor for name, tensor in read.items()}
        _check_shapes(block, state, prefix, files)
        block.load_state_dict(state, assign=True)
        quantize_linears(block, quant, device)
    stage.quant = quant
    return stage.requires_grad_(False).eval()


def load_client_head(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stats: LoadStats | None = None,
) -> ClientHead:
    """Load the embedding, final norm and LM head (the embedding twice over when tied) of ``path``."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    dtype = default_dtype_for(device) if dtype is None else dtype
    files = CheckpointFiles(path)
    with torch.device("meta"):
        head = ClientHead(config)
    hf_names = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        hf_names["lm_head.weight"] = "lm_head.weight"
    read = files.read(
        hf_names.values(),
        dtype=dtype,
        device=device,
        progress=progress,
        description="client head",
        stats=stats,
    )
    state = {name: read[hf_name] for name, hf_name in hf_names.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _check_shapes(head, state, "", files)
    head.load_state_dict(state, assign=True)
    head.tie_weights()  # assign=True replaced the shared Parameter object; share it again
    return head.requires_grad_(False).eval()


def load_local_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stats: LoadStats | None = None,
) -> LocalModel:
    """Load the whole model of ``path`` into one process (head and all blocks)."""
    config = ModelConfig.from_pretrained(path)
    head = load_client_head(path, dtype=dtype, device=device, progress=progress, stats=stats)
    stage = load_stage(path, 0, config.num_layers, dtype=dtype, device=device, progress=progress, stats=stats)
    return LocalModel(head, stage)
