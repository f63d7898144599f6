"""Batched steps of many sessions and chunked forwards equal their one-at-a-time references."""

from __future__ import annotations

import pytest
import torch

from peerd.model import batching, linear
from peerd.model.batching import StepInput, backward_chunks, forward_batch, forward_chunks
from peerd.model.config import ModelConfig
from peerd.model.stage import Stage
from peerd.server.compute import Step, run_steps

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
TOLERANCE = 1e-5


def _stage() -> Stage:
    return Stage.random(CONFIG, 0, 3, seed=1, std=0.2)


def _drain(gen):  # type: ignore[no-untyped-def]
    costs = []
    while True:
        try:
            costs.append(next(gen))
        except StopIteration as stop:
            return stop.value, costs


def test_a_batch_of_mixed_lengths_and_positions_equals_each_step_alone() -> None:
    torch.manual_seed(0)
    stage = _stage()
    # five sessions: different batch sizes and prompt lengths, so their caches and positions differ
    prompts = [torch.randn(b, n, 32) for b, n in [(1, 5), (2, 1), (1, 17), (3, 2), (1, 9)]]
    batched = [stage.allocate_cache(p.shape[0], 64) for p in prompts]
    alone = [stage.allocate_cache(p.shape[0], 64) for p in prompts]
    for p, c in zip(prompts, batched, strict=True):
        stage.forward(p, cache=c, position=0)
    for p, c in zip(prompts, alone, strict=True):
        stage.forward(p, cache=c, position=0)
    # three rounds: a decode step for all, then a mix of decode steps and small prefills, with
    # session 1 leaving after round 0 and joining again in round 2
    for round_ in range(3):
        members = [i for i in range(5) if not (i == 1 and round_ == 1)]
        steps, expected = [], []
        for i in members:
            n = 1 if round_ != 1 or i % 2 else 3
            x = torch.randn(prompts[i].shape[0], n, 32)
            position = batched[i].length
            steps.append(StepInput(x, batched[i], position))
            expected.append(stage.forward(x, cache=alone[i], position=position))
        with torch.inference_mode():
            results = forward_batch(stage, steps, 0, 3)
        for got, want in zip(results, expected, strict=True):
            assert isinstance(got, torch.Tensor)
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)
    for b, a in zip(batched, alone, strict=True):
        assert b.length == a.length
        torch.testing.assert_close(b.keys[:, :, :, : b.length], a.keys[:, :, :, : a.length], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("sessions", [2, 3])
def test_a_batch_of_two_or_three_rows_runs_padded_and_equals_each_step_alone(
    sessions: int, onednn: bool, monkeypatch
) -> None:
    """With MKL's products on CPU, 2-3 rows run with zero rows up to CPU_MIN_ROWS (faster matrix
    products there); the padding must neither reach the real rows nor leak into the caches. With
    oneDNN's (the default where the build has them) they run as they are."""
    monkeypatch.setattr(linear, "ONEDNN", onednn)
    if onednn and not linear.onednn_on():
        pytest.skip("this torch build has no oneDNN linear kernel")
    torch.manual_seed(0)
    stage = _stage()
    seen_rows: list[int] = []
    norm = stage.layers["0"].input_layernorm
    monkeypatch.setattr(norm, "forward", lambda x, f=norm.forward: (seen_rows.append(x.shape[0]), f(x))[1])
    prompts = [torch.randn(1, 4 + i, 32) for i in range(sessions)]
    batched = [stage.allocate_cache(1, 16) for _ in prompts]
    alone = [stage.allocate_cache(1, 16) for _ in prompts]
    for p, b, a in zip(prompts, batched, alone, strict=True):
        stage.forward(p, cache=b, position=0)
        stage.forward(p, cache=a, position=0)
    seen_rows.clear()
    xs = [torch.randn(1, 1, 32) for _ in prompts]
    with torch.inference_mode():
        results = forward_batch(stage, [StepInput(x, c, c.length) for x, c in zip(xs, batched, strict=True)], 0, 3)
    # the first block's dense parts saw the padded rows (MKL), or the real ones (oneDNN)
    assert seen_rows == [sessions if onednn else batching.CPU_MIN_ROWS]
    for x, got, a, b in zip(xs, results, alone, batched, strict=True):
        want = stage.forward(x, cache=a, position=a.length)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)
        assert b.length == a.length
        torch.testing.assert_close(b.keys[:, :, :, : b.length], a.keys[:, :, :, : a.length], atol=TOLERANCE, rtol=0)


def test_a_bad_step_in_a_batch_fails_alone_and_the_others_run() -> None:
    stage = _stage()
    caches = [stage.allocate_cache(1, 8) for _ in range(3)]
    x = torch.randn(1, 1, 32)
    reference = stage.forward(x, cache=stage.allocate_cache(1, 8), position=0)
    # the middle step leaves a gap (position 5 in an empty cache): refused, the others computed
    steps = [Step(x, caches[0], 0, 0, 3), Step(x, caches[1], 5, 0, 3), Step(x, caches[2], 0, 0, 3)]
    results = run_steps(stage, steps)
    assert isinstance(results[1], ValueError) and "gap" in str(results[1])
    for i in (0, 2):
        got = results[i]
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, reference, atol=TOLERANCE, rtol=TOLERANCE)
        assert caches[i].length == 1
    assert caches[1].length == 0


@pytest.mark.parametrize("cached", [False, True])
def test_chunked_forward_equals_the_whole_forward_and_yields_its_cost(cached: bool) -> None:
    torch.manual_seed(0)
    stage = _stage()
    x = torch.randn(2, 40, 32)
    whole_cache = stage.allocate_cache(2, 64) if cached else None
    chunk_cache = stage.allocate_cache(2, 64) if cached else None
    with torch.inference_mode():
        want = stage.forward(x, cache=whole_cache, start=1, end=3)
    out, costs = _drain(forward_chunks(stage, x, chunk_cache, 0, 1, 3, chunk_tokens=16))
    torch.testing.assert_close(out, want, atol=TOLERANCE, rtol=TOLERANCE)
    # windows of 8 tokens x 2 rows through one block at a time: 5 windows x 2 blocks
    assert costs == [16.0] * 10
    if cached:
        assert chunk_cache is not None and whole_cache is not None
        assert chunk_cache.length == whole_cache.length == 40


def test_chunked_backward_equals_autograd_through_the_whole_batch() -> None:
    torch.manual_seed(0)
    stage = _stage()
    x = torch.randn(3, 10, 32, requires_grad=True)
    g = torch.randn(3, 10, 32)
    (want,) = torch.autograd.grad(stage.forward(x), x, g)
    grad, costs = _drain(backward_chunks(stage, x.detach(), g, 0, 3, chunk_tokens=20))
    # a gradient through 3 blocks sums more float32 roundings than a forward: 1e-4 (MKL's products,
    # which small weights take on an AVX2 CPU, gave 3.5e-5 relative here; oneDNN's under 1e-5)
    torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)
    assert costs == [3.0 * 2 * 10 * 3, 3.0 * 1 * 10 * 3]  # two rows, then the last one
