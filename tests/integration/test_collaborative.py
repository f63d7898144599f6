"""Collaborative fine-tuning: trainers of one run average over their own P2P nodes, matched over the DHT.

Real clients of a real local swarm (the swarm's peer is the DHT everyone meets on); averaging
rounds of small known vectors where the arithmetic is the point, `peerd finetune --collaborate`
where the whole path is.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peerd.cli.finetune import cmd_finetune
from peerd.cli.parser import build_parser
from peerd.client.adapters import ClientAdapter
from peerd.client.averaging import Averager, AveragingConfig
from protocols import STREAM_AVERAGE, Compression

WINDOW_S = 0.5
# above libp2p's dial backoff (5 s + 1 s after a failed dial to an address): with 4 s, two members
# whose first dials to each other failed could not retry within the round (CI, twice in one run)
TIMEOUT_S = 10.0


def config(run: str = "poems", **overrides: object) -> AveragingConfig:
    return AveragingConfig(run=run, group_window_s=WINDOW_S, round_timeout_s=TIMEOUT_S, **overrides)  # type: ignore[arg-type]


async def averagers(swarm, n: int, run: str = "poems", size: int = 6):  # type: ignore[no-untyped-def]
    clients = [await swarm.client() for _ in range(n)]
    made = [await Averager.create(c.p2p, c.dht, config(run), torch.zeros(size)) for c in clients]
    return clients, made


async def close_all(clients, made) -> None:  # type: ignore[no-untyped-def]
    for averager in made:
        await averager.close()
    for client in clients:
        await client.close()


async def test_two_trainers_end_a_round_identical_and_a_late_joiner_downloads_the_state(make_swarm) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    clients, (a, b, other) = await averagers(swarm, 3)
    other.config = config("another-run")  # same swarm, another run: must never be grouped with a and b
    try:
        (got_a, rep_a), (got_b, rep_b), (got_o, rep_o) = await asyncio.gather(
            a.average(torch.full((6,), 1.0), weight=1),
            b.average(torch.full((6,), 3.0), weight=3),
            other.average(torch.full((6,), 100.0), weight=1),
        )
        assert rep_a.group == rep_b.group == sorted([a.peer_id, b.peer_id])
        assert rep_o.group == [other.peer_id] and torch.equal(got_o, torch.full((6,), 100.0))
        assert rep_a.missing == rep_b.missing == [], (rep_a, rep_b)
        torch.testing.assert_close(got_a, torch.full((6,), 2.5))  # weighted by samples: (1*1 + 3*3) / 4
        assert torch.equal(got_a, got_b) and rep_a.digest == rep_b.digest  # bit for bit
        assert rep_a.bytes_sent > 6 * 4 and rep_a.bytes_received == rep_b.bytes_sent

        # a trainer joining now starts from the run's state, at the next round
        late_client = await swarm.client()
        clients.append(late_client)
        c = await Averager.create(late_client.p2p, late_client.dht, config(), torch.full((6,), -7.0))
        assert c.round == 1 and torch.equal(c.base, got_a)

        # and contributes to that round: three updates, one result everywhere
        results = await asyncio.gather(*(t.average(got_a + i, weight=1) for i, t in enumerate((a, b, c))))
        assert all(r.group == sorted([a.peer_id, b.peer_id, c.peer_id]) for _, r in results)
        torch.testing.assert_close(results[0][0], got_a + 1.0)  # mean of +0, +1, +2
        assert all(torch.equal(v, results[0][0]) for v, _ in results)
        await c.close()
    finally:
        await close_all(clients, [a, b, other])


async def test_a_trainer_dying_mid_round_costs_the_others_one_timeout(make_swarm) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    clients, (a, b, doomed) = await averagers(swarm, 3)
    doomed_client = clients.pop()
    try:

        async def declare_then_die() -> None:
            await doomed._form_group(0)  # in the group: the others will wait for its push...
            await doomed_client.close()  # ...which never comes: its node is gone

        started = time.perf_counter()
        (got_a, rep_a), (got_b, rep_b), _ = await asyncio.gather(
            a.average(torch.full((6,), 1.0), weight=1),
            b.average(torch.full((6,), 2.0), weight=1),
            declare_then_die(),
        )
        elapsed = time.perf_counter() - started
        assert doomed.peer_id in rep_a.group and rep_a.missing == rep_b.missing == [doomed.peer_id]
        assert torch.equal(got_a, got_b) and torch.equal(got_a, torch.full((6,), 1.5))
        # the group's window + one round timeout, plus DHT round trips; never a second timeout
        assert elapsed < rep_a.window_s + TIMEOUT_S + 2.0, (elapsed, rep_a.window_s)

        # the next round goes on without it, and without waiting for it
        started = time.perf_counter()
        (_, rep_a), _ = await asyncio.gather(a.average(got_a, weight=1), b.average(got_b, weight=1))
        assert rep_a.group == sorted([a.peer_id, b.peer_id]) and rep_a.missing == []
        assert time.perf_counter() - started < TIMEOUT_S
    finally:
        await close_all(clients, [a, b])


async def test_peerd_finetune_collaborate_two_trainers_share_one_adapter(make_swarm, tmp_path) -> None:
    swarm = await make_swarm()
    texts = ["the cat sat on the mat. " * 40, "a dog ran in the park. " * 40]  # disjoint shards

    def argv(i: int) -> list[str]:
        data = tmp_path / f"shard{i}.txt"
        data.write_text(texts[i], encoding="utf-8")
        args = ["finetune", "--initial-peers", ",".join(swarm.initial_peers), "--model", str(swarm.ckpt)]
        args += ["--model-id", "tiny", "--data", str(data), "--out", str(tmp_path / f"out{i}")]
        args += ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--prompt-tokens", "4", "--head-rank", "2"]
        args += ["--seed", str(i), "--sample-prompt", "", "--collaborate", "shards", "--listen", "/ip4/127.0.0.1/tcp/0"]
        return [*args, "--group-window", "1.0", "--round-timeout", "20"]

    parser = build_parser()
    codes = await asyncio.gather(*(cmd_finetune(parser.parse_args(argv(i))) for i in range(2)))
    assert codes == [0, 0]
    summaries = [json.loads((tmp_path / f"out{i}" / "losses.json").read_text()) for i in range(2)]
    rounds = [s["rounds"] for s in summaries]
    assert [len(r) for r in rounds] == [3, 3]
    for mine, theirs in zip(*rounds, strict=True):  # every round: both in the group, one agreed adapter
        assert len(mine["group"]) == 2 and len(mine["used"]) == 2
        assert mine["digest"] == theirs["digest"]
    client = await swarm.client()
    try:
        adapters = [ClientAdapter.load(tmp_path / f"out{i}" / "adapter.safetensors", client.head) for i in range(2)]
        for (name, p), q in zip(
            adapters[0].trainable_parameters().items(), adapters[1].trainable_parameters().values(), strict=True
        ):
            assert torch.equal(p, q), name
    finally:
        await client.close()


@pytest.mark.slow  # a second Python process with torch and p2pd: ~1 min on a loaded 2-core box
async def test_a_malicious_trainer_in_another_process_is_left_out_of_every_round(make_swarm) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    window_s = 1.5  # the other process starts its round as soon as it says ready: room for that
    clients = [await swarm.client() for _ in range(2)]
    cfg = AveragingConfig(run="poisoned", group_window_s=window_s, round_timeout_s=TIMEOUT_S)
    a, b = [await Averager.create(c.p2p, c.dht, cfg, torch.zeros(6)) for c in clients]
    args = [",".join(swarm.initial_peers), str(swarm.ckpt), "poisoned", "6", str(window_s), str(TIMEOUT_S)]
    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.bad_trainer",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert bad.stdout is not None and bad.stdin is not None
        line = (await asyncio.wait_for(bad.stdout.readline(), 60)).decode().split()
        assert line[:1] == ["ready"], line
        bad_id = line[1]
        for expected in ("NaN or inf", "update norm"):  # round 0: NaN; round 1: norm 1e6 (with 1e9 samples)
            (got_a, rep_a), (got_b, rep_b) = await asyncio.gather(
                a.average(a.base + 1.0, weight=1), b.average(b.base + 3.0, weight=1)
            )
            assert bad_id in rep_a.group, rep_a
            assert expected in rep_a.excluded[bad_id] and expected in rep_b.excluded[bad_id]
            assert rep_a.used == rep_b.used == sorted([a.peer_id, b.peer_id])
            assert torch.equal(got_a, got_b) and bool(torch.isfinite(got_a).all())
        torch.testing.assert_close(got_a, torch.full((6,), 4.0))  # two rounds of mean(+1, +3)
        bad.stdin.close()
        assert await asyncio.wait_for(bad.wait(), 60) == 0
    finally:
        if bad.returncode is None:
            bad.kill()
            await bad.wait()
        await close_all(clients, [a, b])


async def test_compressed_rounds_send_half_or_a_quarter_and_members_still_agree_bit_for_bit(make_swarm) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    size = 4096
    clients, (a, b) = await averagers(swarm, 2, run="squeezed", size=size)
    ramp = torch.linspace(-1, 1, size)
    sent: dict[Compression, int] = {}
    try:
        for codec in (Compression.NONE, Compression.FLOAT16, Compression.BLOCKWISE8):
            for t in (a, b):
                t.config = replace(t.config, compression=codec)
            base = a.base.clone()
            (got_a, rep_a), (got_b, _) = await asyncio.gather(
                a.average(base + ramp, weight=1), b.average(base + 3 * ramp, weight=1)
            )
            assert torch.equal(got_a, got_b)  # each member decodes its own update as the others do
            error = float((got_a - (base + 2 * ramp)).abs().max())
            assert error <= {Compression.NONE: 0.0, Compression.FLOAT16: 2e-3, Compression.BLOCKWISE8: 3e-2}[codec]
            sent[codec] = rep_a.bytes_sent
        assert sent[Compression.FLOAT16] < 0.55 * sent[Compression.NONE]
        assert sent[Compression.BLOCKWISE8] < 0.3 * sent[Compression.NONE]
    finally:
        await close_all(clients, [a, b])


async def test_a_trainer_left_behind_catches_up_and_keeps_its_update(make_swarm) -> None:
    swarm = await make_swarm(spans=((0, 6),))
    clients, (a, b, slow) = await averagers(swarm, 3, run="catch-up")
    try:
        for _ in range(2):  # the run moves on without the slow trainer: rounds 0 and 1
            await asyncio.gather(a.average(a.base + 1.0, weight=1), b.average(b.base + 1.0, weight=1))
        assert (a.round, slow.round) == (2, 0)
        got, report = await slow.average(slow.base + 5.0, weight=1)  # alone in round 0, which the others left
        assert report.late and slow.round == 2 and torch.equal(slow.base, a.base)
        torch.testing.assert_close(got, a.base + 5.0)  # its own update on top: it counts in the next round
        results = await asyncio.gather(
            a.average(a.base, weight=1), b.average(b.base, weight=1), slow.average(got, weight=1)
        )
        assert all(r.group == sorted([a.peer_id, b.peer_id, slow.peer_id]) for _, r in results)
        assert all(torch.equal(v, results[0][0]) for v, _ in results)
    finally:
        await close_all(clients, [a, b, slow])


async def test_a_push_refused_at_first_is_tried_again_within_the_round(make_swarm) -> None:
    """A member whose push stream is not served yet (or a fresh connection that resets) still gets the update."""
    swarm = await make_swarm(spans=((0, 6),))
    clients, (a, b) = await averagers(swarm, 2, run="retried")
    await b.p2p.remove_binary_stream_handler(STREAM_AVERAGE)  # a's first pushes are refused by b's p2pd

    async def serve_again() -> None:
        await asyncio.sleep(WINDOW_S + 1.0)  # the group has closed, and a has pushed and been refused
        await b.p2p.add_binary_stream_handler(STREAM_AVERAGE, b._serve_push)

    try:
        (got_a, rep_a), (got_b, rep_b), _ = await asyncio.gather(
            a.average(torch.full((6,), 1.0), weight=1), b.average(torch.full((6,), 3.0), weight=3), serve_again()
        )
        assert rep_a.missing == rep_b.missing == [], (rep_a, rep_b)
        torch.testing.assert_close(got_b, torch.full((6,), 2.5))
        assert torch.equal(got_a, got_b)
    finally:
        await close_all(clients, [a, b])
