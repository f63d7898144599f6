"""Pieces of swarm training that need no network: bubble accounting, the thread guard, the server's meter."""

from __future__ import annotations

import asyncio
import types

import pytest
import torch

from peerd.client.autograd import RemoteBlocks
from peerd.client.pipeline import StageCall, bubble_fraction
from peerd.model.config import ModelConfig
from peerd.model.stage import Stage
from peerd.server.memory import ActivationMeter

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def call(peer: str, start: float, end: float, micro_batch: int = 0) -> StageCall:
    return StageCall(micro_batch, "forward", peer, 0, 1, start, end, True)


def test_bubble_fraction_counts_idle_peer_time() -> None:
    # two peers over 4 s: a busy 0-2 (two overlapping requests count once), b busy 1-4
    calls = [call("a", 0, 1.5), call("a", 1, 2), call("b", 1, 4)]
    assert bubble_fraction(calls, wall_s=4) == pytest.approx(1 - (2 + 3) / 8)
    # a peer we planned on but never used is idle the whole time
    assert bubble_fraction(calls, wall_s=4, peers=["a", "b", "c"]) == pytest.approx(1 - 5 / 12)
    assert bubble_fraction([], wall_s=1) == 0.0


def test_bubble_of_gpipe_schedule_matches_the_textbook_formula() -> None:
    # S stages, M micro-batches, unit time per stage: GPipe's bubble is (S - 1) / (M + S - 1)
    stages, micro = 3, 4
    calls = [call(f"s{s}", m + s, m + s + 1, m) for m in range(micro) for s in range(stages)]
    wall = micro + stages - 1
    assert bubble_fraction(calls, wall_s=wall) == pytest.approx((stages - 1) / (micro + stages - 1))


async def test_remote_blocks_refuse_to_block_the_event_loop_thread() -> None:
    client = types.SimpleNamespace(num_blocks=3, max_retries=1)  # the guard fires before any network use
    blocks = RemoteBlocks(client, micro_batches=2)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="worker thread"):
        blocks(torch.zeros(2, 3, 8))
    assert blocks.loop is asyncio.get_running_loop()


def backward_request(stage: Stage, meter: ActivationMeter, hidden: torch.Tensor) -> torch.Tensor:
    """What the server's backward handler does, under the meter."""
    with torch.enable_grad(), meter.track():
        x = hidden.clone().requires_grad_(True)
        y = stage(x)
        (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return grad


def test_activation_meter_counts_saved_activations_and_sees_them_freed() -> None:
    stage = Stage.random(CONFIG, 0, 3)
    meter = ActivationMeter(stage.parameters())
    hidden = torch.randn(2, 5, CONFIG.hidden_size)
    grad = backward_request(stage, meter, hidden)
    first = meter.last_request_bytes
    # the hooks change nothing about the result
    with torch.enable_grad():
        x = hidden.clone().requires_grad_(True)
        y = stage(x)
        (plain,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(grad, plain, atol=0, rtol=0)
    # several [2, 5, 32] float32 activations per block, far less than the weights (excluded)
    one_activation = 2 * 5 * CONFIG.hidden_size * 4
    weights = sum(p.numel() * 4 for p in stage.parameters())
    assert 3 * one_activation < first < weights
    assert meter.live_bytes == 0  # autograd let go of everything
    backward_request(stage, meter, hidden)
    assert meter.last_request_bytes == first and meter.peak_bytes == first and meter.requests == 2
    # twice the tokens, about twice the activation memory
    backward_request(stage, meter, torch.randn(2, 10, CONFIG.hidden_size))
    assert 1.5 * first < meter.last_request_bytes < 2.5 * first  # (the RoPE table, counted too, is fixed)
    assert meter.snapshot()["activation_live_bytes"] == 0


def test_activation_meter_sees_a_graph_kept_alive() -> None:
    stage = Stage.random(CONFIG, 0, 3)
    meter = ActivationMeter(stage.parameters())
    with torch.enable_grad(), meter.track():
        x = torch.randn(2, 5, CONFIG.hidden_size, requires_grad=True)
        kept = stage(x)  # forward only: the graph and its activations stay alive with `kept`
    assert meter.live_bytes == meter.last_request_bytes > 0
    del kept
    assert meter.live_bytes == 0
