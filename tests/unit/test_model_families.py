"""Qwen3, Qwen3-MoE, Mixtral and Gemma 3 blocks against transformers on tiny random checkpoints (float32, 1e-5).

Each family is loaded per block from a sharded safetensors folder written by transformers, then
checked through prefill, cached decode, and a failover replay (a fresh stage rebuilds the cache from
the inputs so far and continues), the three ways a peer runs its blocks. Sequences are longer than
Gemma's 3-token window, so its sliding blocks really slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.model import ModelConfig, load_client_head, load_stage
from tests.helpers.tiny_model import (
    FAMILIES,
    hf_blocks_forward,
    load_hf_model,
    make_family_checkpoint,
    single_torch_thread,
)

# float32, absolute and relative: products over other row counts round differently, and differently
# again on another CPU (AVX2 vs AVX512)
TOLERANCE = 1e-5
NUM_LAYERS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = make_family_checkpoint(tmp_path_factory.mktemp(request.param), request.param, sharded=True)
    assert len(list(path.glob("model-*.safetensors"))) > 1  # really sharded
    return path, load_hf_model(path)


def _hidden(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, 64, generator=torch.Generator().manual_seed(seed))


def test_each_block_and_the_whole_stage_equal_the_reference(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    hidden = _hidden(2, 11)
    with torch.no_grad():
        for index in range(NUM_LAYERS):
            ours = load_stage(path, index, index + 1, progress=False)(hidden)
            torch.testing.assert_close(
                ours, hf_blocks_forward(hf, index, index + 1, hidden), atol=TOLERANCE, rtol=TOLERANCE
            )
        whole = load_stage(path, 0, NUM_LAYERS, progress=False)(hidden, position=5)
        reference = hf_blocks_forward(hf, 0, NUM_LAYERS, hidden, position=5)
        torch.testing.assert_close(whole, reference, atol=TOLERANCE, rtol=TOLERANCE)


def test_prefill_decode_and_failover_replay_equal_the_reference(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    hidden = _hidden(1, 12, seed=1)
    with torch.no_grad():
        reference = hf_blocks_forward(hf, 1, NUM_LAYERS, hidden)  # the whole sequence at once
        stage = load_stage(path, 1, NUM_LAYERS, progress=False)
        cache = stage.allocate_cache(1, 16)
        outputs = [stage(hidden[:, :5], cache, 0)]  # prefill
        outputs += [stage(hidden[:, t : t + 1], cache, t) for t in range(5, 8)]  # decode
        # failover: a replacement peer replays the 8 inputs it missed, then decodes on
        replacement = load_stage(path, 1, NUM_LAYERS, progress=False)
        replay_cache = replacement.allocate_cache(1, 16)
        replayed = replacement(hidden[:, :8], replay_cache, 0)
        outputs += [replacement(hidden[:, t : t + 1], replay_cache, t) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(replayed, reference[:, :8], atol=TOLERANCE, rtol=TOLERANCE)


def test_client_head_equals_the_reference(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    ids = torch.tensor([[1, 5, 9, 33, 200, 7]])
    head = load_client_head(path, progress=False)
    stage = load_stage(path, 0, NUM_LAYERS, progress=False)
    with torch.no_grad():
        ours = head.logits(stage(head.embed(ids)))
        reference = hf(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_gemma3_config_fields(checkpoint: tuple[Path, Any]) -> None:
    path, _ = checkpoint
    config = ModelConfig.from_pretrained(path)
    if config.model_type == "gemma3_text":
        assert config.layer_types == ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
        assert (config.sliding_window, config.local_rope_theta, config.attention_scale) == (3, 100.0, 24**-0.5)
        assert config.rope_scaling is not None and config.rope_scaling.factor == 4.0
    elif config.model_type == "mixtral":
        assert (config.num_experts, config.experts_per_token) == (4, 2)
    elif config.model_type == "qwen3_moe":
        assert (config.num_experts, config.moe_intermediate_size, config.moe_renormalize) == (4, 64, False)
        assert [config.is_moe(i) for i in range(NUM_LAYERS)] == [True, False, True, True]
    else:
        assert config.qk_norm and config.head_dim == 32


GEMMA3_1B_LIKE: dict[str, Any] = {  # the shape of a transformers 4.x gemma3_text config.json
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,
}


def test_gemma3_4x_layout_interleaves_five_local_blocks_per_global_one() -> None:
    config = ModelConfig.from_hf_dict(GEMMA3_1B_LIKE)
    assert [config.is_sliding(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
    assert (config.rope_theta, config.local_rope_theta, config.sliding_window) == (1e6, 1e4, 512)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attn_logit_softcapping": 50.0}, "unsupported attn_logit_softcapping"),
        ({"use_bidirectional_attention": True}, "unsupported use_bidirectional_attention"),
        ({"hidden_activation": "gelu"}, "unsupported hidden_activation 'gelu'"),
        ({"model_type": "gemma3"}, "multimodal"),
        ({"layer_types": ["chunked_attention"] * 26}, "unsupported layer_types"),
        ({"model_type": "mixtral", "hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ],
)
def test_unsupported_features_of_the_new_families_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**GEMMA3_1B_LIKE, **change})


def test_batched_steps_and_chunked_forwards_equal_the_stage_in_every_family(checkpoint: tuple[Path, Any]) -> None:
    """A peer batches decode steps of several sessions and cuts long forwards into windows
    (peerd.model.batching): both must follow each family's own block (sandwich norms, experts,
    sliding blocks with their own RoPE), here past Gemma's 3-token window."""
    from peerd.model.batching import StepInput, forward_batch, forward_chunks

    path, _ = checkpoint
    stage = load_stage(path, 0, NUM_LAYERS, progress=False)
    prompts = [_hidden(1, 6, seed=1), _hidden(2, 9, seed=2)]
    batched = [stage.allocate_cache(p.shape[0], 32) for p in prompts]
    alone = [stage.allocate_cache(p.shape[0], 32) for p in prompts]
    with torch.no_grad():
        for p, b, a in zip(prompts, batched, alone, strict=True):
            stage.forward(p, cache=b, position=0)
            stage.forward(p, cache=a, position=0)
        for round_ in range(3):
            steps, expected = [], []
            for i, p in enumerate(prompts):
                x = _hidden(p.shape[0], 1 + (round_ + i) % 2, seed=10 + round_ * 2 + i)
                steps.append(StepInput(x, batched[i], batched[i].length))
                expected.append(stage.forward(x, cache=alone[i], position=alone[i].length))
            for got, want in zip(forward_batch(stage, steps, 0, NUM_LAYERS), expected, strict=True):
                assert isinstance(got, torch.Tensor)
                torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)
        long = _hidden(2, 11, seed=3)
        chunks = forward_chunks(stage, long, None, 0, 0, NUM_LAYERS, chunk_tokens=6)  # windows of 3 tokens
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                torch.testing.assert_close(done.value, stage.forward(long), atol=TOLERANCE, rtol=TOLERANCE)
                break
