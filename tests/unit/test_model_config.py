"""ModelConfig from Hugging Face config dicts: both layouts, each supported family, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peerd.model import ModelConfig, RopeScaling

SMOLLM2_135M: dict[str, Any] = {  # SmolLM2-135M's config.json, as transformers 4.x writes it
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}


def test_smollm2_135m() -> None:
    config = ModelConfig.from_hf_dict(SMOLLM2_135M)
    assert config == ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_ids=(0,),
        torch_dtype="bfloat16",
    )
    assert config.num_queries_per_kv == 3
    hash(config)  # frozen: usable as a cache key


def test_llama3_scaling_in_both_layouts() -> None:
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    v4 = {**SMOLLM2_135M, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    v5 = {**SMOLLM2_135M, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    del v5["rope_theta"], v5["rope_scaling"]
    expected = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    for d in (v4, v5):
        config = ModelConfig.from_hf_dict(d)
        assert (config.rope_theta, config.rope_scaling) == (500000.0, expected)


def test_linear_and_default_rope() -> None:
    linear = ModelConfig.from_hf_dict({**SMOLLM2_135M, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == RopeScaling("linear", factor=2.0)
    default = {**SMOLLM2_135M, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    assert ModelConfig.from_hf_dict(default).rope_scaling is None


def test_qwen2_has_qkv_bias_only_and_ignores_an_unused_window() -> None:
    d = {**SMOLLM2_135M, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    config = ModelConfig.from_hf_dict(d)
    assert (config.qkv_bias, config.o_bias, config.sliding_window) == (True, False, None)


def test_llama_attention_bias_means_all_four_projections() -> None:
    config = ModelConfig.from_hf_dict({**SMOLLM2_135M, "attention_bias": True, "mlp_bias": True})
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, True, True)


def test_mistral_sliding_window_and_eos_list() -> None:
    d = {
        **SMOLLM2_135M,
        "model_type": "mistral",
        "sliding_window": 4096,
        "eos_token_id": [2, 7],
        "head_dim": None,
    }
    config = ModelConfig.from_hf_dict(d)
    assert (config.sliding_window, config.eos_token_ids, config.head_dim) == (4096, (2, 7), 64)
    no_window = ModelConfig.from_hf_dict({**d, "sliding_window": None})
    assert no_window.sliding_window is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gemma"}, "unsupported model_type 'gemma'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "unsupported rope scaling type 'dynamic'"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type RoPE"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling is missing"),
        ({"num_key_value_heads": 4}, "must be a positive multiple of num_kv_heads"),
        ({"layer_types": ["chunked_attention"] * 30}, "unsupported layer_types"),
    ],
)
def test_unsupported_features_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**SMOLLM2_135M, **change})


def test_from_pretrained_reads_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    assert ModelConfig.from_pretrained(tmp_path) == ModelConfig.from_hf_dict(SMOLLM2_135M)
    assert ModelConfig.from_pretrained(tmp_path / "config.json").num_layers == 30
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        ModelConfig.from_pretrained(tmp_path / "missing")
