"""Whole-model checks against transformers: chained stages plus head, and greedy generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.model import LocalModel, load_client_head, load_local_model, load_stage
from tests.helpers.tiny_model import load_hf_model, make_tiny_checkpoint, single_torch_thread

# Logits here reach ~30 (tied std-1 embeddings), so besides 1e-5 absolute, allow 1e-5
# relative: float32 summation order alone moves values of that size by ~1e-6 to 1e-5.
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with single_torch_thread():
        yield


@pytest.fixture(scope="module", params=["single", "sharded", "qwen2-tied"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    options: dict[str, Any] = {
        "single": {},
        "sharded": {"sharded": True},
        "qwen2-tied": {"qkv_bias": True, "tie_word_embeddings": True},
    }[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), num_layers=6, seed=3, **options)
    return path, load_hf_model(path)


@torch.inference_mode()
def test_chained_stages_and_head_equal_reference_logits(checkpoint: tuple[Path, Any]) -> None:
    path, hf = checkpoint
    head = load_client_head(path, progress=False)
    stages = [load_stage(path, a, b, progress=False) for a, b in [(0, 2), (2, 5), (5, 6)]]
    input_ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))

    hidden = head.embed(input_ids)
    for stage in stages:
        hidden = stage(hidden)
    logits = head.logits(hidden)

    torch.testing.assert_close(logits, hf(input_ids).logits, atol=ATOL, rtol=RTOL)


@torch.inference_mode()
def test_chained_stages_with_caches_equal_reference_logits(checkpoint: tuple[Path, Any]) -> None:
    # A swarm session in miniature: each hop keeps its own cache; prefill, then steps.
    path, hf = checkpoint
    head = load_client_head(path, progress=False)
    stages = [load_stage(path, a, b, progress=False) for a, b in [(0, 3), (3, 6)]]
    caches = [stage.allocate_cache(1, 16) for stage in stages]
    input_ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))

    step_logits = []
    for begin, stop in [(0, 10), *((t, t + 1) for t in range(10, 16))]:
        hidden = head.embed(input_ids[:, begin:stop])
        for stage, cache in zip(stages, caches):
            hidden = stage(hidden, cache, begin)
        step_logits.append(head.logits(hidden))

    torch.testing.assert_close(torch.cat(step_logits, dim=1), hf(input_ids).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("eos", ["none", "config"])
def test_generate_greedy_equals_reference_generate(checkpoint: tuple[Path, Any], eos: str) -> None:
    from transformers import GenerationConfig

    path, hf = checkpoint
    model = load_local_model(path, progress=False)
    prompt = [1, 72, 101, 108, 108, 111]
    # Without eos both run the full length, so the comparison covers every step.
    eos_ids = [] if eos == "none" else list(model.config.eos_token_ids)
    ours = model.generate_greedy(prompt, max_new_tokens=24, eos_token_ids=eos_ids)
    generation = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, max_new_tokens=24, eos_token_id=eos_ids or None, pad_token_id=0, bos_token_id=1
    )
    with torch.inference_mode():
        reference = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            generation_config=generation,
        )
    assert ours == reference[0, len(prompt) :].tolist()
    if eos == "none":
        assert len(ours) == 24


def test_generate_greedy_stops_after_eos(checkpoint: tuple[Path, Any]) -> None:
    path, _ = checkpoint
    model = load_local_model(path, progress=False)
    free_run = model.generate_greedy([1, 5, 6], max_new_tokens=8, eos_token_ids=[])
    assert len(free_run) == 8
    stop_at = free_run[3]
    first = free_run.index(stop_at)
    assert model.generate_greedy([1, 5, 6], max_new_tokens=8, eos_token_ids=[stop_at]) == free_run[: first + 1]
    assert model.generate_greedy([1, 5, 6], max_new_tokens=0) == []


def test_local_model_needs_every_block(checkpoint: tuple[Path, Any]) -> None:
    path, _ = checkpoint
    with pytest.raises(ValueError, match="needs all 6 blocks"):
        LocalModel(load_client_head(path, progress=False), load_stage(path, 0, 5, progress=False))
