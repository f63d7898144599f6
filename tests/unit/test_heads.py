"""The client's head batcher: concurrent generations share one pass over the LM head, each gets its own logits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from peerd.client.heads import HeadBatcher
from peerd.model import linear
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


@pytest.fixture
def heads() -> Iterator[HeadBatcher]:
    batcher = HeadBatcher()
    yield batcher
    batcher.close()


async def _behind_a_held_pass(heads: HeadBatcher, calls: list[tuple[_GatedHead, Tensor]]) -> list[Tensor]:
    """The first call's pass starts and is held by its gate; the others queue behind it; then every
    gate opens. Each call's logits, in order."""
    first = asyncio.ensure_future(heads.logits(*calls[0]))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(heads.logits(head, x)) for head, x in calls[1:]]
    await asyncio.sleep(0.05)
    for head, _ in calls:
        head.gate.set()
    return list(await asyncio.wait_for(asyncio.gather(first, *rest), 10))


async def test_a_lone_request_runs_at_once_and_equals_the_unbatched_head(heads: HeadBatcher) -> None:
    head = make_head(0)
    x = hiddens(1)[0]
    got = await asyncio.wait_for(heads.logits(head, x), 10)
    assert torch.equal(got, head.logits(x)) and heads.batches == 1


async def test_requests_waiting_together_share_one_pass_and_each_gets_its_own_rows(heads: HeadBatcher) -> None:
    head = make_head(0)
    gated, xs = _GatedHead(head), hiddens(9)
    got = await _behind_a_held_pass(heads, [(gated, x) for x in xs])
    assert gated.passes == [xs[0].shape[1], sum(x.shape[1] for x in xs[1:])]  # two passes, not nine
    for x, logits in zip(xs, got, strict=True):
        assert logits.shape == (1, x.shape[1], CONFIG.vocab_size)
        torch.testing.assert_close(logits, head.logits(x), rtol=1e-5, atol=1e-5)


async def test_two_heads_are_never_mixed_in_one_pass(heads: HeadBatcher) -> None:
    a, b = _GatedHead(make_head(0)), _GatedHead(make_head(1))
    xs = hiddens(6)
    calls = [(a if i % 2 or i == 0 else b, x) for i, x in enumerate(xs)]  # a, then a, b, a, b, a
    got = await _behind_a_held_pass(heads, calls)
    for (owner, x), logits in zip(calls, got, strict=True):
        torch.testing.assert_close(logits, owner.head.logits(x), rtol=1e-5, atol=1e-5)
    assert len(a.passes) == 2 and len(b.passes) == 1  # a alone, then a's waiting three, then b's two


async def test_a_cancelled_caller_leaves_the_others_their_results(heads: HeadBatcher) -> None:
    head = make_head(0)
    gated = _GatedHead(head)
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


async def test_a_failing_pass_fails_its_callers_only_and_the_next_pass_works(heads: HeadBatcher) -> None:
    head = make_head(0)
    with pytest.raises(ValueError, match="hidden states must end in"):
        await asyncio.wait_for(heads.logits(head, torch.randn(1, 2, CONFIG.hidden_size + 1)), 10)
    with pytest.raises(ValueError, match=r"\[1, n, hidden\]"):
        await heads.logits(head, torch.randn(2, 2, CONFIG.hidden_size))
    x = hiddens(1)[0]
    assert torch.equal(await asyncio.wait_for(heads.logits(head, x), 10), head.logits(x))


@pytest.fixture
def mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 CPU products through MKL (F.linear), as without oneDNN's kernel."""
    monkeypatch.setattr(linear, "ONEDNN", False)


@pytest.mark.usefixtures("mkl")
async def test_two_or_three_rows_run_padded_to_four_on_cpu_and_keep_their_own_logits(heads: HeadBatcher) -> None:
    head = make_head(0)
    gated = _GatedHead(head)
    gated.gate.set()
    g = torch.Generator().manual_seed(2)
    for n in (2, 3):
        x = torch.randn(1, n, CONFIG.hidden_size, generator=g)  # a verification step: pending token + drafts
        got = await asyncio.wait_for(heads.logits(gated, x), 10)
        assert gated.passes[-1] == 4 and got.shape == (1, n, CONFIG.vocab_size)
        torch.testing.assert_close(got, head.logits(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 1, CONFIG.hidden_size, generator=g)
    assert torch.equal(await asyncio.wait_for(heads.logits(gated, x), 10), head.logits(x))
    assert gated.passes[-1] == 1  # one position: the plain call, unpadded


@pytest.mark.parametrize(
    ("onednn", "passes"),
    [
        (False, [1, 1, 1]),  # MKL: two waiting rows, a padded pass would hold both to its end
        (True, [1, 2]),  # oneDNN: two rows cost less than two passes: shared, as they are
    ],
)
async def test_waiting_positions_share_a_pass_unless_mkl_makes_a_small_one_slower(
    heads: HeadBatcher, monkeypatch: pytest.MonkeyPatch, onednn: bool, passes: list[int]
) -> None:
    monkeypatch.setattr(linear, "ONEDNN", onednn)
    if onednn and not linear.onednn_on():
        pytest.skip("this torch build has no oneDNN linear kernel")
    head = make_head(0)
    gated = _GatedHead(head)
    xs = [torch.randn(1, 1, CONFIG.hidden_size) for _ in range(3)]
    calls = [asyncio.ensure_future(heads.logits(gated, x)) for x in xs]  # 1 runs, 2 positions wait
    await asyncio.sleep(0.05)
    gated.gate.set()
    got = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert gated.passes == passes
    for g, x in zip(got, xs, strict=True):
        torch.testing.assert_close(g, head.logits(x), rtol=1e-5, atol=1e-5)


def test_the_worker_computes_with_the_event_loop_threads_torch_thread_count() -> None:
    """torch's thread count is per thread: the head's worker follows the thread that awaits it, not
    the last count set anywhere in the process (here by another thread, as a peer in-process would)."""
    seen: list[int] = []

    class _Counting:
        def logits(self, hidden: Tensor) -> Tensor:
            seen.append(torch.get_num_threads())
            return hidden

    def loop_thread() -> None:
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1
        other = threading.Thread(target=torch.set_num_threads, args=(2,))  # the process-wide count is 2 now
        other.start()
        other.join()
        batcher = HeadBatcher()
        try:
            asyncio.run(asyncio.wait_for(batcher.logits(_Counting(), torch.zeros(1, 1, 4)), 10))
        finally:
            batcher.close()

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join(timeout=30)
    assert seen == [1]
