"""Tiny random Llama/Qwen2 checkpoints in Hugging Face format, written by transformers itself.

The reference implementation writes the folder (config.json, safetensors,
generation_config.json), so our loader is tested against the real format, not
our idea of it. A byte-level BPE ``tokenizer.json`` is built with the
``tokenizers`` library (no downloads). transformers is imported lazily: the
first call costs its import (several seconds), later calls well under a second.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Weights are re-drawn with this spread (not transformers' 0.02) so attention is far
# from uniform and biases/norm gains are non-trivial: comparisons then test something.
_WEIGHT_STD = 0.1


def make_tiny_checkpoint(
    path: str | Path,
    *,
    num_layers: int = 6,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    qkv_bias: bool = False,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    sharded: bool = False,
) -> Path:
    """Write a random-weight checkpoint folder at ``path`` (created if needed) and return it.

    ``qkv_bias=True`` writes a Qwen2 model (q/k/v biases, none on o_proj);
    ``attention_bias=True`` a Llama with biases on all four projections.
    ``rope_scaling`` is a Hugging Face dict, e.g. ``{"rope_type": "llama3",
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64}``. ``sharded=True`` splits the
    weights over several files with an index. Same arguments, same bytes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=None,
    )
    if rope_scaling is not None:
        common["rope_scaling"] = dict(rope_scaling)  # transformers adds keys to the dict it is given
    model: torch.nn.Module
    # fork_rng: transformers' own init draws from the global generator; callers' seeds stay intact.
    with torch.random.fork_rng(devices=[]):
        if qkv_bias:
            if attention_bias or mlp_bias:
                raise ValueError("Qwen2 has no attention_bias/mlp_bias options")
            model = Qwen2ForCausalLM(Qwen2Config(**common))
        else:
            config = LlamaConfig(**common, attention_bias=attention_bias, mlp_bias=mlp_bias)
            model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(_WEIGHT_STD * noise)
    # ~150 kB per block at the default sizes, so 100 kB shards give several files.
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
    write_tiny_tokenizer(path, vocab_size)
    return path


FAMILIES = ("qwen3", "qwen3_moe", "mixtral", "gemma3")


def make_family_checkpoint(
    path: str | Path, family: str, *, num_layers: int = 4, seed: int = 0, sharded: bool = False
) -> Path:
    """A tiny random checkpoint of a newer ``family`` (one of FAMILIES), written by transformers itself.

    qwen3: per-head q/k norms, explicit head_dim (32, not 64 / 4); qwen3_moe: the same attention, 4
    experts of width 64, top 2 without renormalising, block 1 dense; mixtral: 4 experts, top 2; gemma3: 2-token
    window on sliding blocks (sliding, sliding, full, ...), linearly scaled RoPE on full blocks,
    its own base on sliding ones, GeGLU, (1 + w) sandwich norms, query_pre_attn_scalar 24.
    """
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        pad_token_id=None, max_position_embeddings=2048,
    )  # fmt: skip
    if family == "qwen3":
        config = transformers.Qwen3Config(**common, intermediate_size=128, head_dim=32, tie_word_embeddings=False)
        model = transformers.Qwen3ForCausalLM
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, intermediate_size=128, moe_intermediate_size=64, head_dim=32, num_experts=4,
            num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.Qwen3MoeForCausalLM
    elif family == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM
    elif family == "gemma3":
        layer_types = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(num_layers)]
        config = transformers.Gemma3TextConfig(
            **common, intermediate_size=128, head_dim=16, sliding_window=3, layer_types=layer_types,
            query_pre_attn_scalar=24, rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=1000.0,
            rope_local_base_freq=100.0, final_logit_softcapping=30.0,
        )  # fmt: skip
        model = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    with torch.random.fork_rng(devices=[]):
        hf = model(config)
    _redraw(hf, seed)
    hf.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
    write_tiny_tokenizer(path, 256)
    return path


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' tiny init, so attention is sharp and norms matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_((0.2 if "gemma" in type(model).__name__.lower() else 1.0) + 0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(_WEIGHT_STD * noise)


def _byte_symbols() -> dict[int, str]:
    """The printable stand-in character of every byte, as byte-level BPE (GPT-2) defines it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + i) for i, b in enumerate(others)})
    return symbols


def write_tiny_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """Write a byte-level BPE ``tokenizer.json`` (no merges: a token per byte) and ``tokenizer_config.json``.

    Ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>``; then one id per byte, bytes that
    never occur in UTF-8 last, so a 256-entry vocabulary still covers all text
    (the three bytes left out become ``<unk>``). Ids beyond 259 are filler.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = Path(path)
    never_in_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    byte_order = sorted(range(256), key=lambda b: (b in never_in_utf8, b))
    symbols = _byte_symbols()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for b in byte_order:
        if len(vocab) == vocab_size:
            break
        vocab[symbols[b]] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 2048,
        # ChatML without a default system turn, so the CLI, SDK and API tests have a template to render
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return path


def load_hf_model(path: str | Path) -> Any:
    """The transformers model of a checkpoint folder, float32, eval mode (the reference in tests)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def hf_blocks_forward(hf_model: Any, start: int, end: int, hidden: torch.Tensor, position: int = 0) -> torch.Tensor:
    """What transformers' decoder layers ``[start, end)`` make of ``hidden [batch, n, hidden_size]``.

    Runs the whole reference model, swapping ``hidden`` in as the input of layer
    ``start`` (a forward pre-hook) and capturing the output of layer ``end - 1``;
    positions are ``position .. position + n - 1``. Gradients flow back to
    ``hidden``, so this is also the reference for backward.
    """
    layers = hf_model.model.layers
    captured: list[torch.Tensor] = []

    def swap_input(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def capture_output(module: Any, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    batch, n, _ = hidden.shape
    handles = [
        layers[start].register_forward_pre_hook(swap_input, with_kwargs=True),
        layers[end - 1].register_forward_hook(capture_output),
    ]
    try:
        dummy_ids = torch.zeros((batch, n), dtype=torch.int64)
        position_ids = torch.arange(position, position + n)[None].expand(batch, n)
        hf_model.model(input_ids=dummy_ids, position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured[0]


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the previous count.

    Tiny tensors gain nothing from threads, and on a loaded 2-core runner two
    spinning OpenMP threads made tiny-model tests about 10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
