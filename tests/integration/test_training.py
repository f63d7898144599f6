"""Training through a real swarm: gradients equal local autograd, prompt tuning learns, failures are survived.

Every test runs the training step the way `peerd finetune` does: in a worker thread
(``asyncio.to_thread``), with the swarm's peers and the client on this test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Callable

import pytest
import torch

from peerd.cli.finetune import cmd_finetune
from peerd.cli.parser import build_parser
from peerd.client import PeerError, SwarmClient
from peerd.client.adapters import ClientAdapter
from peerd.client.autograd import RemoteBlocks
from peerd.client.pipeline import RemotePipeline
from peerd.client.training import TokenBatches, train_step
from peerd.daemon.peer import Peer
from peerd.model.local import LocalModel
from protocols import ErrorCode

# fp32 throughout. Micro-batching changes the matmul shapes, so sums are rounded in another
# order than in one local pass: gradients agree to float32 rounding, not bit for bit.
GRAD_ATOL = 1e-5
GRAD_RTOL = 1e-4


def batch_ids(rows: int = 6, n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (rows, n), generator=torch.Generator().manual_seed(seed))


def input_and_prompt_grads(
    client: SwarmClient, blocks: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """d(loss)/d(input embeddings) and d(loss)/d(soft prompt) for a next-token loss through ``blocks``."""
    adapter = ClientAdapter(client.head, prompt_tokens=4, seed=1)
    inputs = client.head.embed(ids).detach().requires_grad_(True)  # [rows, n, hidden]
    assert adapter.prompt is not None
    prompt = adapter.prompt.expand(ids.shape[0], -1, -1)  # [rows, 4, hidden]
    out = blocks(torch.cat([prompt, inputs], dim=1))  # [rows, 4 + n, hidden]
    logits = client.head.logits(out[:, 3:-1])  # [rows, n, vocab]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    assert inputs.grad is not None and adapter.prompt.grad is not None
    return inputs.grad, adapter.prompt.grad, float(loss.detach())


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def test_gradients_through_three_peers_equal_local_autograd(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm()  # peers hosting 0:2, 2:4, 4:6
    client = await swarm.client()
    try:
        ids = batch_ids()
        blocks = RemoteBlocks(client, micro_batches=3, rng=random.Random(0))
        grad_x, grad_prompt, loss = await asyncio.to_thread(input_and_prompt_grads, client, blocks, ids)
        ref_x, ref_prompt, ref_loss = input_and_prompt_grads(client, local_model.stage, ids)

        assert loss == pytest.approx(ref_loss, abs=1e-5)
        torch.testing.assert_close(grad_x, ref_x, atol=GRAD_ATOL, rtol=GRAD_RTOL)
        torch.testing.assert_close(grad_prompt, ref_prompt, atol=GRAD_ATOL, rtol=GRAD_RTOL)
        assert grad_prompt.abs().sum() > 0

        trace = blocks.last_trace
        assert trace is not None and trace.retries == 0
        assert [len(stages) for stages in trace.stages] == [3, 3, 3]  # every micro-batch crossed 3 peers
        # pipelining: some micro-batch was on one peer while another micro-batch was on a different one
        calls = trace.calls
        assert any(
            a.micro_batch != b.micro_batch
            and a.peer_id != b.peer_id
            and a.sent_at < b.done_at
            and b.sent_at < a.done_at
            for a in calls
            for b in calls
        )

        # a request no peer will take (over every peer's batch x tokens limit) fails as itself, at once,
        # and bans nobody: another peer would refuse it too
        pipeline = RemotePipeline(client, micro_batches=2)
        with pytest.raises(PeerError) as refused:
            await pipeline.forward(torch.zeros(2, 8200, client.config.hidden_size))
        assert refused.value.code is ErrorCode.REQUEST_TOO_LARGE
        assert client.bans.banned() == set()
    finally:
        await client.close()


async def test_prompt_tuning_through_the_swarm_lowers_the_loss(make_swarm, tmp_path) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        # toy task: a periodic token sequence, learnt by an 8-vector soft prompt alone
        batches = TokenBatches([10, 20, 30, 40, 50] * 200, seq_len=8, batch_size=8, seed=0)
        adapter = ClientAdapter(client.head, prompt_tokens=8, seed=0)
        optimizer = torch.optim.AdamW(list(adapter.trainable_parameters().values()), lr=0.3, weight_decay=0.0)
        blocks = RemoteBlocks(client, micro_batches=2, rng=random.Random(0))
        losses = [await asyncio.to_thread(train_step, adapter, blocks, optimizer, batches.sample()) for _ in range(30)]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        print(f"prompt tuning through 3 peers: loss {first:.3f} -> {last:.3f}")
        assert last < 0.8 * first, losses

        # the trained prompt changes generation through the swarm (the generate hook)
        plain = await client.generate([10, 20, 30], max_new_tokens=6, stop_on_eos=False)
        tuned = await client.generate([10, 20, 30], max_new_tokens=6, stop_on_eos=False, adapter=adapter)
        assert tuned.token_ids != plain.token_ids
    finally:
        await client.close()

    # the CLI body end to end on the same swarm: trains, saves, plots, and generates with the result
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--initial-peers",
        ",".join(swarm.initial_peers),
        "--model",
        str(swarm.ckpt),
        "--model-id",
        "tiny",
    ]
    argv += ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--prompt-tokens", "4", "--head-rank", "2"]
    argv += ["--out", str(out), "--sample-prompt", "Q: hello"]
    args = build_parser().parse_args(argv)
    assert await cmd_finetune(args) == 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "losses.json").read_text())["losses"]) == 4
    loaded = ClientAdapter.load(out / "adapter.safetensors", client.head)
    assert (loaded.prompt_tokens, loaded.head_rank) == (4, 2)


async def kill_while_serving(swarm, victim: Peer, work: asyncio.Future[object]) -> float:  # type: ignore[no-untyped-def]
    """Hold ``victim``'s compute thread until one of our requests waits there, then kill its p2pd.

    The kill is abrupt: no offline announcement, so its DHT record still says online. The victim
    leaves the fixture's list, which would otherwise shut it down gracefully at the end. Returns
    the time of the kill (``time.perf_counter()``).
    """
    assert victim.runtime is not None and victim.p2p is not None and victim.dht is not None
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait()

    victim.runtime.submit(hold, owner="test-gate")  # occupies the victim's one compute thread
    try:
        await wait_for(holding.is_set)
        await wait_for(lambda: victim.runtime is not None and victim.runtime.queued >= 1)  # our request waits
        assert not work.done()
        killed_at = time.perf_counter()
        await victim.p2p.shutdown()
    finally:
        gate.set()
    swarm.peers.remove(victim)
    victim.request_stop()  # ends its re-announce loop
    await asyncio.to_thread(victim.runtime.close)
    # its DHT node cannot say goodbye through a dead p2pd (and would wait forever): give it a moment
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(victim.dht.shutdown(), 1.0)
    return killed_at


async def test_killing_a_peer_mid_step_gives_the_same_gradients(make_swarm) -> None:
    # blocks 3:6 have three replicas: one dies in a forward pass, another in a backward pass
    swarm = await make_swarm(spans=((0, 3), (3, 6), (3, 6), (3, 6)))
    client = await swarm.client()
    try:
        ids = batch_ids(rows=8, n=6)
        blocks = RemoteBlocks(client, micro_batches=8, rng=random.Random(1))
        ref_x, ref_prompt, _ = await asyncio.to_thread(input_and_prompt_grads, client, blocks, ids)

        # 1. killed while it holds forward requests: the whole training step, loss.backward() included
        step = asyncio.ensure_future(asyncio.to_thread(input_and_prompt_grads, client, blocks, ids))
        victim = swarm.peers[1]
        killed_at = await kill_while_serving(swarm, victim, step)
        grad_x, grad_prompt, _ = await step
        trace = blocks.last_trace
        assert trace is not None and trace.retries >= 1
        # a request was on the victim when it died, and it was redone elsewhere
        assert any(not c.ok and c.peer_id == victim.peer_id and c.sent_at < killed_at for c in trace.calls)
        torch.testing.assert_close(grad_x, ref_x, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_prompt, ref_prompt, atol=1e-6, rtol=1e-5)

        # 2. killed while it holds backward requests: retried from the saved stage inputs
        pipeline = RemotePipeline(client, micro_batches=8, rng=random.Random(2))
        hidden = client.head.embed(ids)
        out, trace = await pipeline.forward(hidden)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        ref_grad = await pipeline.backward(trace, grad_out)
        used = {s.span.peer_id for stages in trace.stages for s in stages}
        victim = next(p for p in swarm.peers[1:] if p.peer_id in used)  # a surviving replica of 3:6
        calls_before = len(trace.calls)
        backward = asyncio.ensure_future(pipeline.backward(trace, grad_out))
        killed_at = await kill_while_serving(swarm, victim, backward)
        grad = await backward
        assert any(
            not c.ok and c.phase == "backward" and c.peer_id == victim.peer_id and c.sent_at < killed_at
            for c in trace.calls[calls_before:]
        )
        # redone from the failed stage's saved input: no forward pass was needed for it
        assert all(c.phase == "backward" for c in trace.calls[calls_before:])
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    finally:
        await client.close()


async def test_server_keeps_no_activations_between_requests(make_swarm) -> None:
    swarm = await make_swarm()
    client = await swarm.client()
    try:
        blocks = RemoteBlocks(client, micro_batches=4, rng=random.Random(0))
        per_request: list[list[int]] = []
        for seed in range(3):
            await asyncio.to_thread(input_and_prompt_grads, client, blocks, batch_ids(rows=8, n=12, seed=seed))
            infos = [await client.peers.info(p.peer_id) for p in swarm.peers]
            memory = [info.extra["memory"] for info in infos]
            # nothing stays behind once a request is answered
            assert [m["activation_live_bytes"] for m in memory] == [0, 0, 0]
            per_request.append([m["activation_last_request_bytes"] for m in memory])
            # 4 micro-batches were in flight at once, yet a peer never held more than one request's worth
            for m in memory:
                assert 0 < m["activation_peak_bytes"] == m["activation_last_request_bytes"]
        assert per_request[0] == per_request[1] == per_request[2]  # same shapes, same memory: no growth
        # activations scale with the request (2 rows x 16 tokens x 2 blocks), not with the requests served
        rows, tokens, hidden = 2, 16, client.config.hidden_size
        for nbytes in per_request[0]:
            assert rows * tokens * hidden * 4 * 2 < nbytes < rows * tokens * hidden * 4 * 2 * 40
    finally:
        await client.close()
