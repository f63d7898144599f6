"""Hop tracing and the throughput benchmarks' output, on the in-process swarm.

A traced decode hop must split into spans that follow each other in time and add up to the
client's own wall time of the step; the peer's reported compute must be the spans it covers; and
the benchmarks must produce the fields `make bench` writes to its JSON.
"""

from __future__ import annotations

import asyncio
import os
import time

import torch

from peerd.cli.bench_hops import hop_breakdown, serve_echo
from peerd.cli.bench_load import ONE_SESSION_STEPS_FACTOR, LoadWorkers, run_load_levels, swarm_hops_vs_echo
from peerd.rpc.hoptrace import SPANS, HopTracer
from tests.helpers.swarm import MODEL_ID


async def test_traced_hop_spans_are_ordered_and_add_up_to_the_step(make_swarm) -> None:
    swarm = await make_swarm([(0, 6)])
    peer = swarm.peers[0]
    client = await swarm.client()
    hidden = client.config.hidden_size
    try:
        tracer = HopTracer()
        client.peers.tracer = peer.servicer.tracer = tracer
        stream = await client.peers.open_inference(
            peer.peer_id, session_id=os.urandom(16), start=0, end=6, max_length=16, batch_size=1
        )
        walls_ms, reported_ms = [], []
        try:
            for position in range(6):
                tokens = 4 if position == 0 else 1  # a short prefill, then decode steps
                x = torch.randn(1, tokens, hidden)
                started = time.perf_counter()
                await stream.step(x, 0 if position == 0 else 3 + position)
                walls_ms.append((time.perf_counter() - started) * 1e3)
                reported_ms.append(stream.last_compute_ms)
        finally:
            await stream.close()
        hops = tracer.hops()
        assert len(hops) == 6
        for hop, wall_ms, reported in zip(hops, walls_ms, reported_ms, strict=True):
            spans = [hop[name] for name, _, _ in SPANS]
            assert all(s >= 0 for s in spans), hop  # checkpoints in causal order
            assert abs(sum(spans) - hop["wall"]) < 1e-6  # they telescope to the traced wall time
            assert 0 < hop["wall"] <= wall_ms  # inside what the caller measured around the step
            assert hop["compute"] > 0
            # what the peer reports as compute is the queue + compute + hand-back spans
            assert abs(hop["queue_wait"] + hop["compute"] + hop["back_to_loop"] - reported) < 1e-3
    finally:
        client.peers.tracer = peer.servicer.tracer = None
        await client.close()


async def test_hop_breakdown_reports_every_span_beside_the_echo(make_swarm) -> None:
    swarm = await make_swarm([(0, 6)])
    peer = swarm.peers[0]
    await serve_echo(peer.p2p)
    client = await swarm.client()
    try:
        modes = {"thread": 0.0, "inline": 8.0}
        result = await hop_breakdown(client.peers, peer.servicer, peer.peer_id, (0, 6), steps=3, rounds=2, modes=modes)
    finally:
        await client.close()
    assert set(result) == set(modes)
    for r in result.values():
        assert {name for name, _, _ in SPANS} <= set(r)
        assert len(r["hops"]) == 6  # 3 decode steps x 2 rounds (the prefills are left out)
        assert r["echo_ms_p50"] > 0 and r["overhead_vs_echo"] > 0
        assert r["overhead_ms_p50"] < r["wall_ms_p50"]
        assert 0 < r["span_p50_sum_ms"] < r["wall_ms_p50"]
    assert peer.runtime.inline_max_cost == 8.0  # the runtime's own setting is restored


async def test_load_bench_levels_from_worker_processes(make_swarm, tiny_ckpt, tmp_path) -> None:
    swarm = await make_swarm([(0, 3), (3, 6)])
    workers = await asyncio.to_thread(LoadWorkers, 2, list(swarm.initial_peers), tiny_ckpt, MODEL_ID, tmp_path)
    try:
        load = await asyncio.to_thread(run_load_levels, workers, (1, 4), 3)
        hops = await asyncio.to_thread(swarm_hops_vs_echo, workers, 3, 1)
    finally:
        await asyncio.to_thread(workers.close)
    assert set(load["levels"]) == {"one_process_1", "one_process_4", "processes_4"}
    for level in load["levels"].values():
        assert level["tokens_per_s"] > 0 and level["vs_one_session"] > 0
        assert level["step_ms_p50"] <= level["step_ms_p99"]
    assert load["levels"]["processes_4"]["processes"] == 2
    # the lone session, every ratio's denominator, steps longer than the others (a steadier baseline)
    assert load["steps_one_session"] == 3 * ONE_SESSION_STEPS_FACTOR
    assert load["levels"]["one_process_1"]["steps"] == 3 * ONE_SESSION_STEPS_FACTOR
    assert load["levels"]["one_process_4"]["steps"] == load["levels"]["processes_4"]["steps"] == 4 * 3
    assert hops["hops"] == 3 * 2 and hops["overhead_vs_echo"] > 0  # 3 decode steps through 2 spans
