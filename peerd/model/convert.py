"""Convert the embedded model's GGUF file into a plain HF Llama folder (float32 safetensors).

transformers dequantises the GGUF; every tensor is cross-checked against an independent
dequantisation done with the ``gguf`` package, and the written folder is reloaded and compared
(config, weights, tokenizer, logits) before :mod:`peerd.model.fetch` moves it into the cache.
transformers, torch and gguf are imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peerd.model.registry import KnownModel, ModelFetchError

if TYPE_CHECKING:
    import torch

__all__ = ["Converted", "Reporter", "convert_gguf", "verify_output", "write_json"]


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- progress


class Reporter:
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


# --------------------------------------------------------------------------- conversion


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


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], report: Reporter) -> None:
    """Write float32 tensors in the safetensors format, one tensor at a time, with a progress bar.

    Format: 8-byte little-endian header length, a JSON header (name -> dtype, shape,
    byte offsets; padded with spaces to 8-byte alignment), then the raw bytes. The
    result is read back with the safetensors library in `verify_output`.
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
class Converted:
    """What the conversion holds in memory, kept for the reload checks."""

    tensors: dict[str, torch.Tensor]  # exactly what model.safetensors holds
    model: Any  # transformers LlamaForCausalLM loaded from the GGUF
    tokenizer: Any  # transformers tokenizer loaded from the GGUF


def convert_gguf(known: KnownModel, gguf_path: Path, out_dir: Path, report: Reporter) -> Converted:
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

    write_json(out_dir / "config.json", config)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _patch_tokenizer_config(out_dir, tokenizer)
    _write_safetensors(out_dir / "model.safetensors", tensors, report)
    return Converted(tensors=tensors, model=model, tokenizer=tokenizer)


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
    write_json(path, data)


def verify_output(known: KnownModel, out_dir: Path, converted: Converted) -> None:
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
