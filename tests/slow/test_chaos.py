"""Chaos: 6 real peer processes, 4 concurrent clients, 40 generations, peers killed and restarted.

A seeded killer SIGKILLs a random peer every few seconds (never the last live peer of its blocks)
and restarts it later with the same identity. Every generation must equal the fault-free reference
token for token. The test prints requests, kills and the p50/max failover stall.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from peerd.cli.demo import LocalSwarm
from peerd.client import SwarmClient
from peerd.model.loading import load_local_model
from tests.helpers.tiny_model import make_tiny_checkpoint

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

SEED = 1234
MODEL_ID = "tiny"
GROUPS = {"a": (0, 3), "b": (3, 6)}  # three peers per group
PEER_ARGS = ["--no-measure", "--torch-threads", "1", "--announce-period", "2", "--model-id", MODEL_ID]
REQUESTS, CLIENTS, NEW_TOKENS = 40, 4, 48
# --step-delay is a floor under the clients' work, so the killer strikes while they generate on any
# machine: each request is >= 47 steps through 2 peers of 10 ms each, so the 4 clients are busy for
# >= 40 * 47 * 2 * 0.01 / 4 = 9.4 s, against the killer's first strike after at most 2.5 s.
PEER_ARGS += ["--step-delay", "0.01"]


@pytest.mark.timeout(900)
async def test_chaos_every_request_matches_the_fault_free_reference(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", num_layers=6)
    reference = load_local_model(ckpt, progress=False)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(3, 9))] for _ in range(REQUESTS)]
    expected = [reference.generate_greedy(p, NEW_TOKENS, eos_token_ids=[]) for p in prompts]

    swarm = LocalSwarm(str(ckpt), workdir=tmp_path)
    try:
        swarm.start_bootstrap(extra=["--model-id", MODEL_ID])
        names = [f"{g}{i}" for g in GROUPS for i in range(3)]
        procs = {n: swarm.start_peer(n, GROUPS[n[0]], PEER_ARGS) for n in names}
        swarm.wait_ready(list(procs.values()), timeout_s=180)
        alive = set(names)
        kills: list[str] = []
        done = asyncio.Event()

        async def killer() -> None:
            restarting: dict[str, float] = {}
            while not done.is_set():
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                now = time.monotonic()
                for name, at in list(restarting.items()):  # bring peers back after a while
                    if now >= at:
                        procs[name].ready_file.unlink(missing_ok=True)
                        procs[name] = swarm.start_peer(name, GROUPS[name[0]], PEER_ARGS)
                        del restarting[name]
                killable = [
                    n for n in sorted(alive)
                    if procs[n].ready() is not None and sum(1 for m in alive if m[0] == n[0]) >= 2
                ]  # fmt: skip
                if not killable:
                    continue
                victim = rng.choice(killable)
                pid = int(procs[victim].ready()["pid"])  # type: ignore[index, arg-type]
                os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(procs[victim].popen.wait, 10)
                alive.discard(victim)
                kills.append(victim)
                logger.warning("chaos: killed %s (pid %d)", victim, pid)
                restarting[victim] = now + rng.uniform(3.0, 8.0)

        async def track_restarts() -> None:
            # a restarted peer counts as alive (for the "never the last peer" rule) once it serves
            while not done.is_set():
                for name in names:
                    if name not in alive and procs[name].ready() is not None and procs[name].popen.poll() is None:
                        alive.add(name)
                await asyncio.sleep(0.2)

        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(REQUESTS):
            queue.put_nowait(i)
        results: dict[int, list[int]] = {}
        stalls: list[float] = []

        async def client_worker() -> None:
            client = await SwarmClient.connect(
                swarm.initial_peers, ckpt, model_id=MODEL_ID, failover_timeout_s=60.0, request_timeout_s=10.0
            )
            try:
                await client.wait_for_route(timeout_s=30)
                while not queue.empty():
                    i = queue.get_nowait()
                    result = await client.generate(prompts[i], max_new_tokens=NEW_TOKENS, stop_on_eos=False)
                    results[i] = result.token_ids
                    stalls.extend(result.stalls_s)
            finally:
                await client.close()

        chaos = [asyncio.create_task(killer()), asyncio.create_task(track_restarts())]
        try:
            await asyncio.gather(*(client_worker() for _ in range(CLIENTS)))
        finally:
            done.set()
            await asyncio.gather(*chaos)
    finally:
        swarm.stop()

    mismatched = [i for i in range(REQUESTS) if results.get(i) != expected[i]]
    p50 = statistics.median(stalls) if stalls else 0.0
    print(
        f"\nchaos (seed {SEED}): {len(results)} requests, {len(kills)} kills ({', '.join(kills)}), "
        f"{len(stalls)} failovers, stall p50 {p50 * 1e3:.0f} ms, max {max(stalls, default=0) * 1e3:.0f} ms"
    )
    assert len(results) == REQUESTS
    assert not mismatched, f"requests {mismatched} differ from the fault-free reference"
    assert kills, "the killer never struck"
