"""Serving benchmarks of one peer's compute path: batching across sessions, and decode under a flood.

Both run the real compute runtime and stage in this process, without the network, so they measure
what the issue is about (the peer's scheduler and its batched forward) side by side in one run:

* aggregate decode tokens/s of N concurrent sessions with batching on, and with it off (each step
  a forward of its own, as before), relative to one session; per-step latency p50/p99;
* an honest session's decode step latency while 3 identities keep 8 forwards of the largest size a
  peer accepts (4 x 2048 tokens) each in flight, relative to the same step unloaded.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import torch

from peerd.model.stage import Stage
from peerd.server.compute import Step, forward, run_steps
from peerd.server.runtime import ComputeRuntime

__all__ = ["run_serving_bench", "serving_rows"]


async def _decode(runtime: ComputeRuntime, stage: Stage, owner: str, steps: int, prompt: int, end: int) -> list[float]:
    """One session: a prompt, then ``steps`` decode steps; the latency of each decode step (s)."""
    hidden = stage.config.hidden_size
    cache = await runtime.run(lambda: stage.allocate_cache(1, prompt + steps + 1), owner)

    def runner(batch: list[Any]) -> list[Any]:
        return run_steps(stage, batch)

    key = (stage.start, end)
    x = torch.randn(1, prompt, hidden, dtype=stage.dtype)
    await runtime.run_step(Step(x, cache, 0, stage.start, end), runner, key, owner)
    latencies = []
    for i in range(steps):
        x = torch.randn(1, 1, hidden, dtype=stage.dtype)
        t0 = time.perf_counter()
        await runtime.run_step(Step(x, cache, prompt + i, stage.start, end), runner, key, owner)
        latencies.append(time.perf_counter() - t0)
    return latencies


async def _sessions(stage: Stage, n: int, steps: int, batching: bool, end: int) -> dict[str, float]:
    runtime = ComputeRuntime(name="bench-serving", max_batch_steps=64 if batching else 1)
    try:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_decode(runtime, stage, f"client{i}", steps, 16, end) for i in range(n)))
        wall = time.perf_counter() - t0
    finally:
        runtime.close()
    latencies = sorted(x for run in runs for x in run)
    return {
        "tokens_per_s": n * steps / wall,
        "step_ms_p50": 1e3 * latencies[len(latencies) // 2],
        "step_ms_p99": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


async def _flood(stage: Stage, steps: int, end: int, identities: int = 3, in_flight: int = 8) -> dict[str, float]:
    runtime = ComputeRuntime(name="bench-flood")
    stop = asyncio.Event()
    big = torch.randn(4, 2048, stage.config.hidden_size, dtype=stage.dtype)

    async def flooder(owner: str) -> None:
        while not stop.is_set():
            await runtime.run_chunks(lambda: forward(stage, big, stage.start, end), owner)

    try:
        unloaded = statistics.median(await _decode(runtime, stage, "honest", steps, 16, end))
        tasks = [asyncio.create_task(flooder(f"flood{i}")) for i in range(identities) for _ in range(in_flight)]
        deadline = time.monotonic() + 60
        while runtime.queued < identities and time.monotonic() < deadline:  # noqa: ASYNC110 (a thread's queue)
            await asyncio.sleep(0.01)  # the flood is queued on the compute thread
        loaded = statistics.median(await _decode(runtime, stage, "honest", steps, 16, end))
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        runtime.close()
    return {"unloaded_ms": 1e3 * unloaded, "loaded_ms": 1e3 * loaded, "ratio": loaded / unloaded}


def run_serving_bench(
    stage: Stage, blocks: int = 8, steps: int = 32, sessions: tuple[int, ...] = (1, 4, 16, 64)
) -> dict[str, Any]:
    """Both benchmarks on the first ``blocks`` blocks of ``stage`` (what one peer of a small swarm
    hosts); ratios are to one unbatched session (batching) and to unloaded (flood)."""
    end = min(stage.end, stage.start + blocks)
    out: dict[str, Any] = {"sessions": {}, "blocks": end - stage.start}
    for batching in (False, True):
        mode = "batched" if batching else "unbatched"
        for n in sessions:
            out["sessions"][f"{mode}_{n}"] = asyncio.run(_sessions(stage, n, steps, batching, end))
    one = out["sessions"]["unbatched_1"]["tokens_per_s"]
    for result in out["sessions"].values():
        result["vs_one_session"] = result["tokens_per_s"] / one
    out["flood"] = asyncio.run(_flood(stage, steps, end))
    return out


def serving_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    sessions = results["sessions"]
    for key in ("unbatched", "batched"):
        for n in (4, 16, 64):
            r = sessions.get(f"{key}_{n}")
            if r is not None:
                rows.append(
                    (
                        f"{n} sessions, {key}",
                        f"{r['vs_one_session']:.2f}x",
                        f"{r['tokens_per_s']:.0f} tok/s, step p50 {r['step_ms_p50']:.1f}"
                        f" / p99 {r['step_ms_p99']:.1f} ms",
                    )
                )
    f = results["flood"]
    rows.append(
        (
            "decode under max flood",
            f"{f['ratio']:.2f}x",
            f"{f['unloaded_ms']:.1f} -> {f['loaded_ms']:.1f} ms/step, 3 identities x 8 x (4 x 2048); target <= 3x",
        )
    )
    return rows
