"""Our blocks and stages against transformers' decoder layers, forward and backward, on tiny checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.model import load_stage
from tests.helpers.tiny_model import hf_blocks_forward, load_hf_model, make_tiny_checkpoint, single_torch_thread

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 the wavelengths (6, 20, 63, 199, ...) then fall in all three
    # regions of the rule: kept, blended, and scaled.
    "original_max_position_embeddings": 64,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "mha": dict(num_heads=4, num_kv_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "mqa-qwen2-qkv-bias": dict(num_heads=4, num_kv_heads=1, qkv_bias=True),
    "llama-all-biases": dict(attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(rope_scaling=LLAMA3_SCALING),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), num_layers=4, **VARIANTS[request.param])
    return path, load_hf_model(path)


def random_hidden(batch: int, n: int, hidden_size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, hidden_size, generator=torch.Generator().manual_seed(seed))


def test_each_block_equals_reference(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    hidden = random_hidden(2, 23)
    with torch.no_grad():
        for index in range(4):
            ours = load_stage(path, index, index + 1, progress=False)(hidden)
            reference = hf_blocks_forward(hf, index, index + 1, hidden)
            torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=0)


def test_stage_equals_reference_at_an_offset_position(checkpoint: tuple[Path, Any]) -> None:
    # A stateless forward at positions 100..116 (beyond llama3's original 64, where scaling bites).
    path, hf = checkpoint
    stage = load_stage(path, 1, 4, progress=False)
    hidden = random_hidden(3, 17, seed=1)
    with torch.no_grad():
        ours = stage(hidden, position=100)
        reference = hf_blocks_forward(hf, 1, 4, hidden, position=100)
    torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=0)


def test_sub_range_of_a_stage_equals_that_range(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    stage = load_stage(path, 0, 4, progress=False)
    hidden = random_hidden(1, 9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            stage(hidden, start=1, end=3), hf_blocks_forward(hf, 1, 3, hidden), atol=TOLERANCE, rtol=0
        )


def test_backward_matches_reference(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    hf.requires_grad_(False)
    stage = load_stage(path, 1, 3, progress=False)
    hidden = random_hidden(2, 11, seed=3)
    grad_output = random_hidden(2, 11, seed=4)

    ours_in = hidden.clone().requires_grad_(True)
    (ours_grad,) = torch.autograd.grad(stage(ours_in), ours_in, grad_output)
    ref_in = hidden.clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(hf_blocks_forward(hf, 1, 3, ref_in), ref_in, grad_output)

    assert ours_grad.abs().max() > 0.1  # the comparison is not between two zeros
    torch.testing.assert_close(ours_grad, ref_grad, atol=TOLERANCE, rtol=0)


def test_grad_works_after_inference_mode_built_the_rope_tables(checkpoint: tuple[Path, Any]) -> None:
    # Tables first built inside inference_mode must not be inference tensors, or saving
    # them for backward in a later differentiable call would raise.
    path, _ = checkpoint
    stage = load_stage(path, 0, 1, progress=False)
    with torch.inference_mode():
        stage(random_hidden(1, 5))
    hidden = random_hidden(1, 5).requires_grad_(True)
    (grad,) = torch.autograd.grad(stage(hidden).sum(), hidden)
    assert torch.isfinite(grad).all()
