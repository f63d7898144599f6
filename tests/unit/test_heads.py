"""The client's head batcher: concurrent generations share one pass over the LM head, each gets its own logits."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch import Tensor

from peerd.client.heads import HeadBatcher
from peerd.model.config import ModelConfig
from peerd.model.head import ClientHead

CONFIG = ModelConfig(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)


def make_head(seed: int) -> ClientHead:
    torch.manual_seed(seed)
    head = ClientHead(CONFIG)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return head


class _GatedHead:
    """A head whose passes wait for ``gate``: requests pile up behind the first one, as under load."""

    def __init__(self, head: ClientHead) -> None:
        self.head, self.gate, self.passes = head, threading.Event(), []

    def logits(self, hidden: Tensor) -> Tensor:
        self.gate.wait(timeout=10)
        self.passes.append(hidden.shape[1])
        return self.head.logits(hidden)


def hiddens(n: int, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1 + i % 3, CONFIG.hidden_size, generator=g) for i in range(n)]  # mixed lengths


async def test_a_lone_request_runs_at_once_and_equals_the_unbatched_head() -> None:
    head, heads = make_head(0), HeadBatcher()
    try:
        x = hiddens(1)[0]
        got = await asyncio.wait_for(heads.logits(head, x), 10)
        assert torch.equal(got, head.logits(x)) and heads.batches == 1
    finally:
        heads.close()


async def test_requests_waiting_together_share_one_pass_and_each_gets_its_own_rows() -> None:
    head = make_head(0)
    gated, heads = _GatedHead(head), HeadBatcher()
    try:
        xs = hiddens(9)
        first = asyncio.ensure_future(heads.logits(gated, xs[0]))  # runs alone, held by the gate
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(heads.logits(gated, x)) for x in xs[1:]]  # wait behind it
        await asyncio.sleep(0.05)
        gated.gate.set()
        got = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert gated.passes == [xs[0].shape[1], sum(x.shape[1] for x in xs[1:])]  # two passes, not nine
        for x, logits in zip(xs, got, strict=True):
            assert logits.shape == (1, x.shape[1], CONFIG.vocab_size)
            torch.testing.assert_close(logits, head.logits(x), rtol=1e-5, atol=1e-5)
    finally:
        heads.close()


async def test_two_heads_are_never_mixed_in_one_pass() -> None:
    a, b = _GatedHead(make_head(0)), _GatedHead(make_head(1))
    heads = HeadBatcher()
    try:
        xs = hiddens(6)
        first = asyncio.ensure_future(heads.logits(a, xs[0]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(heads.logits(a if i % 2 else b, x)) for i, x in enumerate(xs[1:], start=1)]
        await asyncio.sleep(0.05)
        a.gate.set()
        b.gate.set()
        got = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        for i, (x, logits) in enumerate(zip(xs, got, strict=True)):
            torch.testing.assert_close(logits, (a if i % 2 or i == 0 else b).head.logits(x), rtol=1e-5, atol=1e-5)
        assert len(a.passes) == 2 and len(b.passes) == 1  # a alone, then a's waiting three, then b's two
    finally:
        heads.close()


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    head = make_head(0)
    gated, heads = _GatedHead(head), HeadBatcher()
    try:
        xs = hiddens(4)
        calls = [asyncio.ensure_future(heads.logits(gated, x)) for x in xs]
        await asyncio.sleep(0.05)
        calls[1].cancel()  # waiting behind the first pass
        calls[0].cancel()  # its pass is already on the worker thread
        gated.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[1], asyncio.CancelledError)
        for x, logits in zip(xs[2:], results[2:], strict=True):
            torch.testing.assert_close(logits, head.logits(x), rtol=1e-5, atol=1e-5)
    finally:
        heads.close()


async def test_a_failing_pass_fails_its_callers_only_and_the_next_pass_works() -> None:
    head, heads = make_head(0), HeadBatcher()
    try:
        with pytest.raises(ValueError, match="hidden states must end in"):
            await asyncio.wait_for(heads.logits(head, torch.randn(1, 2, CONFIG.hidden_size + 1)), 10)
        with pytest.raises(ValueError, match=r"\[1, n, hidden\]"):
            await heads.logits(head, torch.randn(2, 2, CONFIG.hidden_size))
        x = hiddens(1)[0]
        assert torch.equal(await asyncio.wait_for(heads.logits(head, x), 10), head.logits(x))
    finally:
        heads.close()


async def test_two_or_three_rows_run_padded_to_four_on_cpu_and_keep_their_own_logits() -> None:
    head = make_head(0)
    gated, heads = _GatedHead(head), HeadBatcher()
    gated.gate.set()
    try:
        g = torch.Generator().manual_seed(2)
        for n in (2, 3):
            x = torch.randn(1, n, CONFIG.hidden_size, generator=g)  # a verification step: pending token + drafts
            got = await asyncio.wait_for(heads.logits(gated, x), 10)
            assert gated.passes[-1] == 4 and got.shape == (1, n, CONFIG.vocab_size)
            torch.testing.assert_close(got, head.logits(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 1, CONFIG.hidden_size, generator=g)
        assert torch.equal(await asyncio.wait_for(heads.logits(gated, x), 10), head.logits(x))
        assert gated.passes[-1] == 1  # one position: the plain call, unpadded
    finally:
        heads.close()


async def test_on_cpu_fewer_than_four_waiting_positions_run_one_request_at_a_time() -> None:
    head = make_head(0)
    gated, heads = _GatedHead(head), HeadBatcher()
    try:
        xs = [torch.randn(1, 1, CONFIG.hidden_size) for _ in range(4)]
        calls = [asyncio.ensure_future(heads.logits(gated, x)) for x in xs]  # 1 runs, 3 positions wait
        await asyncio.sleep(0.05)
        gated.gate.set()
        got = await asyncio.wait_for(asyncio.gather(*calls), 10)
        assert gated.passes == [1, 1, 1, 1]  # three waiting rows: a padded pass would hold all three to its end
        assert all(torch.equal(g, head.logits(x)) for g, x in zip(got, xs, strict=True))
    finally:
        heads.close()
