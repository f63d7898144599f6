"""The KV cache: prefill plus one-token steps, chunks, rewinds and batches equal a full forward."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from peerd.model import KVCache, ModelConfig, Stage, cache_bytes_per_token
from tests.helpers.tiny_model import single_torch_thread

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=96,
    num_layers=5,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
)
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@pytest.fixture(scope="module")
def stage() -> Stage:
    # std 0.1 makes attention far from uniform, so a wrong key or position shows.
    return Stage.random(CONFIG, 1, 4, std=0.1, seed=7)


def hidden_states(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)


@torch.inference_mode()
def test_prefill_then_single_steps_equal_full_forward(stage: Stage) -> None:
    hidden = hidden_states(1, 12)
    full = stage(hidden)
    cache = stage.allocate_cache(1, 16)
    outputs = [stage(hidden[:, :5], cache, 0)]
    outputs += [stage(hidden[:, t : t + 1], cache, t) for t in range(5, 12)]
    close(torch.cat(outputs, dim=1), full)


@pytest.mark.parametrize("split", [1, 4, 11])
@torch.inference_mode()
def test_prefill_in_two_chunks_equals_full_forward(stage: Stage, split: int) -> None:
    hidden = hidden_states(2, 12, seed=1)
    cache = stage.allocate_cache(2, 12)
    first = stage(hidden[:, :split], cache, 0)
    second = stage(hidden[:, split:], cache, split)
    close(torch.cat([first, second], dim=1), stage(hidden))


@torch.inference_mode()
def test_batch_rows_are_independent(stage: Stage) -> None:
    hidden = hidden_states(3, 7, seed=2)
    cache = stage.allocate_cache(3, 8)
    stage(hidden[:, :6], cache, 0)
    batched = stage(hidden[:, 6:], cache, 6)
    for row in range(3):
        alone = stage.allocate_cache(1, 8)
        stage(hidden[row : row + 1, :6], alone, 0)
        close(batched[row : row + 1], stage(hidden[row : row + 1, 6:], alone, 6))


@torch.inference_mode()
def test_rewind_overwrites_the_cache(stage: Stage) -> None:
    # Write 10 tokens, rewind to position 6 and continue with different tokens: the
    # result must be that of the new sequence, as if the old tail was never there.
    old, new = hidden_states(1, 10, seed=3), hidden_states(1, 10, seed=4)
    sequence = torch.cat([old[:, :6], new[:, 6:]], dim=1)
    cache = stage.allocate_cache(1, 10)
    stage(old, cache, 0)
    assert cache.length == 10
    tail = stage(sequence[:, 6:8], cache, 6)
    assert cache.length == 8
    step = stage(sequence[:, 8:9], cache, 8)
    close(torch.cat([tail, step], dim=1), stage(sequence)[:, 6:9])


@torch.inference_mode()
def test_sub_range_with_cache_uses_that_range_and_its_cache_slots(stage: Stage) -> None:
    hidden = hidden_states(1, 6, seed=5)
    cache = stage.allocate_cache(1, 6)
    first = stage(hidden[:, :4], cache, 0, start=2, end=4)
    rest = stage(hidden[:, 4:], cache, 4, start=2, end=4)
    close(torch.cat([first, rest], dim=1), stage(hidden, start=2, end=4))
    assert cache.keys[0].abs().sum() == 0  # block 1 (slot 0) was not run, so not written
    assert cache.keys[1:, :, :, :6].abs().sum() > 0


def test_cached_forward_builds_no_graph(stage: Stage) -> None:
    hidden = hidden_states(1, 3).requires_grad_(True)
    cache = stage.allocate_cache(1, 4)
    out = stage(hidden, cache, 0)
    assert not out.requires_grad and not cache.keys.requires_grad


def test_cache_shape_and_size(stage: Stage) -> None:
    cache = stage.allocate_cache(2, 10)
    assert isinstance(cache, KVCache)
    assert tuple(cache.keys.shape) == (3, 2, CONFIG.num_kv_heads, 10, CONFIG.head_dim)
    assert (cache.num_blocks, cache.batch_size, cache.max_length) == (3, 2, 10)
    assert cache.size_bytes == 2 * 10 * cache_bytes_per_token(CONFIG, 3, torch.float32)
    assert cache_bytes_per_token(CONFIG, 3, torch.bfloat16) == 2 * 3 * 2 * 8 * 2


def test_invalid_calls_raise_clear_errors(stage: Stage) -> None:
    cache = stage.allocate_cache(1, 8)
    with pytest.raises(ValueError, match="do not fit a cache of max_length 8"):
        stage(hidden_states(1, 3), cache, 6)
    with pytest.raises(ValueError, match=r"hidden states must be \[batch, n_tokens, 48\]"):
        stage(torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match=r"not a non-empty part of hosted \[1, 4\)"):
        stage(hidden_states(1, 3), start=0, end=2)
    with pytest.raises(ValueError, match=r"not a non-empty part of hosted \[1, 4\)"):
        stage(hidden_states(1, 3), start=3, end=5)
    with pytest.raises(ValueError, match=r"stage expects torch\.float32"):
        stage(hidden_states(1, 3).double())
    with pytest.raises(ValueError, match="position must be >= 0"):
        stage(hidden_states(1, 3), position=-1)
    with pytest.raises(ValueError, match="position 2 would leave a gap: the cache holds 0 tokens"):
        stage(hidden_states(1, 1), cache, 2)
    with pytest.raises(ValueError, match="cache has shape"):
        stage(hidden_states(2, 3), cache, 0)
    with pytest.raises(ValueError, match="must be a non-empty part"):
        Stage(CONFIG, 3, 3)


def test_sliding_window_limits_sequence_length() -> None:
    windowed = ModelConfig(**{**CONFIG.__dict__, "model_type": "mistral", "sliding_window": 8})
    stage = Stage.random(windowed, 0, 1)
    with pytest.raises(ValueError, match="sliding window of 8"):
        stage.allocate_cache(1, 9)
    with pytest.raises(ValueError, match="sliding window of 8"):
        stage(hidden_states(1, 9))
    stage(hidden_states(1, 8))  # within the window it is plain attention


def test_cache_from_inference_mode_is_usable_outside_it(stage: Stage) -> None:
    with torch.inference_mode():
        cache = stage.allocate_cache(1, 4)
        stage(hidden_states(1, 2), cache, 0)
    stage(hidden_states(1, 1), cache, 2)  # in-place writes to an inference tensor would raise here
    assert cache.length == 3


def test_attention_accepts_any_output_layout_of_sdpa(stage: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA's SDPA kernels return [batch, heads, n, dim] in a heads-inner memory layout;
    # a .view() on it failed on the GPU only. Reproduce that layout on CPU.
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def heads_inner_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = real_sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides

    hidden = hidden_states(2, 6, seed=8)
    expected = stage(hidden)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", heads_inner_sdpa)
    close(stage(hidden), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.inference_mode()
def test_cuda_cached_decode_equals_cpu(stage: Stage) -> None:
    gpu = Stage.random(CONFIG, 1, 4, std=0.1, seed=7, device="cuda")
    hidden = hidden_states(2, 9, seed=9)
    cache = gpu.allocate_cache(2, 9)
    outputs = [gpu(hidden[:, :5].cuda(), cache, 0)]
    outputs += [gpu(hidden[:, t : t + 1].cuda(), cache, t) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(outputs, dim=1).cpu(), stage(hidden), atol=1e-4, rtol=0)
