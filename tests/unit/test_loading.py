"""Loading slices of a checkpoint folder reads exactly the slice's tensors, lazily, in the asked dtype."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peerd.model.loading as loading
from peerd.model import LoadStats, default_dtype_for, load_client_head, load_local_model, load_stage
from tests.helpers.tiny_model import make_tiny_checkpoint, single_torch_thread

TENSORS_PER_BLOCK = 9  # q, k, v, o, gate, up, down, two norms


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@pytest.fixture(scope="module", params=["single", "sharded"])
def deep_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param),
        num_layers=30,
        hidden_size=32,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        vocab_size=64,
        sharded=request.param == "sharded",
    )


class SpyOpen:
    """Wraps safe_open to record every tensor actually read, independently of LoadStats."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read: list[str] = []
        self.real = safe_open
        monkeypatch.setattr(loading, "safe_open", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spy = self

        class Handle:
            def __enter__(self) -> Handle:
                self.inner = spy.real(*args, **kwargs).__enter__()  # type: ignore[no-untyped-call]
                return self

            def __exit__(self, *exc: object) -> None:
                self.inner.__exit__(*exc)

            def keys(self) -> list[str]:
                return list(self.inner.keys())

            def get_tensor(self, name: str) -> torch.Tensor:
                spy.read.append(name)
                return self.inner.get_tensor(name)  # type: ignore[no-any-return]

        return Handle()


def test_a_slice_reads_only_its_blocks(deep_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SpyOpen(monkeypatch)
    stats = LoadStats()
    stage = load_stage(deep_checkpoint, 3, 5, progress=False, stats=stats)

    assert len(stats.tensor_names) == 2 * TENSORS_PER_BLOCK
    assert all(name.startswith(("model.layers.3.", "model.layers.4.")) for name in stats.tensor_names)
    assert sorted(spy.read) == sorted(stats.tensor_names)
    params = list(stage.parameters())
    assert stats.bytes_read == sum(p.numel() * p.element_size() for p in params)
    assert all(p.device.type == "cpu" for p in params)  # nothing left on meta
    block_params = sum(p.numel() for p in stage.layers["3"].parameters())
    assert sum(p.numel() for p in params) == 2 * block_params
    if (deep_checkpoint / "model.safetensors.index.json").exists():
        all_files = set(
            json.loads((deep_checkpoint / "model.safetensors.index.json").read_text())["weight_map"].values()
        )
        assert stats.files_opened < all_files  # the other shards were never opened


def test_loaded_slice_holds_the_checkpoint_values(deep_checkpoint: Path) -> None:
    stage = load_stage(deep_checkpoint, 29, 30, dtype=torch.float64, progress=False)
    files = sorted(deep_checkpoint.glob("*.safetensors"))
    stored = {name: t for f in files for name, t in load_file(f).items()}
    for name, tensor in stage.state_dict().items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(tensor, stored["model." + name].double(), atol=0, rtol=0)


def test_client_head_reads_only_its_three_tensors(deep_checkpoint: Path) -> None:
    stats = LoadStats()
    load_client_head(deep_checkpoint, progress=False, stats=stats)
    assert sorted(stats.tensor_names) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


def test_tied_embeddings_share_one_matrix(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, num_layers=1, tie_word_embeddings=True)
    stats = LoadStats()
    head = load_client_head(path, progress=False, stats=stats)
    assert "lm_head.weight" not in stats.tensor_names
    assert head.lm_head.weight is head.embed_tokens.weight


def test_bfloat16_conversion_and_default_dtype(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, num_layers=2)
    model = load_local_model(path, dtype=torch.bfloat16, progress=False)
    assert model.stage.dtype == torch.bfloat16 and model.head.dtype == torch.bfloat16
    logits = model.forward(torch.tensor([[1, 5, 9]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert default_dtype_for("cpu") == torch.float32
    assert default_dtype_for("cuda:0") == torch.bfloat16
    assert load_stage(path, 0, 1, progress=False).dtype == torch.float32


def test_missing_tensor_is_named_with_the_file_set(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, num_layers=2)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    load_stage(path, 0, 1, progress=False)  # block 0 is intact
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as info:
        load_stage(path, 1, 2, progress=False)
    assert "model.safetensors" in str(info.value)


def test_wrong_shape_and_missing_files_are_reported(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "model", num_layers=1)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight .* has shape"):
        load_stage(path, 0, 1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_stage(empty, 0, 1, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 2\) must be a non-empty part of \[0, 1\)"):
        load_stage(path, 0, 2, progress=False)


def test_progress_bar_reports_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_tiny_checkpoint(tmp_path, num_layers=2)
    capsys.readouterr()
    load_stage(path, 0, 2, progress=True)
    assert "blocks 0:2" in capsys.readouterr().err
    load_stage(path, 0, 2, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_are_one_clear_error_through_the_cli(tmp_path: Path, keep: float, capsys) -> None:
    """An interrupted copy leaves a short file: the loader names it and says what to do, no traceback."""
    from peerd.cli.main import main

    path = make_tiny_checkpoint(tmp_path / "tiny", num_layers=2)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(loading.DamagedWeightsError, match="damaged or truncated"):
        load_stage(path, 0, 2, progress=False)
    capsys.readouterr()  # the checkpoint writer's progress bar
    code = main(["status", "--model", str(path), "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"weights file {weights} is damaged or truncated" in err and "peerd model fetch" in err
