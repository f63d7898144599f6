"""Concurrent sessions through a real swarm, from one client process and from several.

Each client is a worker process (``python -m peerd.cli.bench_load``) with its own ``SwarmClient``
(its own p2pd), driven over stdin/stdout by JSON lines, so that the benchmark process itself adds no
load. A level of N sessions runs in two phases: every worker opens its sessions and sends their
prompts (``open``), and only when all have answered do they all start decoding (``go``), so the
decode phase of every session overlaps. Sessions send random hidden states through
``InferenceSession.step`` (the SDK's session API; no sampling, so the client's LM head is not what
is measured). Aggregate tokens/s is all decode steps over the span from the first step's start to
the last one's end, on one clock (``time.monotonic`` is system-wide).

Workers also serve a raw echo (``bench_hops.serve_echo``) and can time one through-the-swarm session
beside echoes to another worker: the per-hop overhead of the real 3-process swarm against the bare
libp2p round trip of the same frame between two other processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ONE_SESSION_STEPS_FACTOR", "LoadWorkers", "load_rows", "run_load_levels"]

PROMPT_TOKENS = 16


async def _open(client: Any, n: int, steps: int) -> list[Any]:
    """``n`` sessions, each with its prompt sent (sessions ready to decode)."""
    hidden = client.config.hidden_size
    sessions = [client.inference_session(max_length=PROMPT_TOKENS + steps) for _ in range(n)]

    opening = asyncio.Semaphore(4)  # planning reads the DHT: a burst of 64 reads times out on a busy box

    async def start(session: Any) -> None:
        async with opening:
            await session.open()
        await session.step(torch.randn(1, PROMPT_TOKENS, hidden))

    await asyncio.gather(*(start(s) for s in sessions))
    return sessions


async def _decode(client: Any, sessions: list[Any], steps: int) -> dict[str, Any]:
    hidden = client.config.hidden_size

    async def run(session: Any) -> list[tuple[float, float]]:
        times = []
        for _ in range(steps):
            started = time.monotonic()
            await session.step(torch.randn(1, 1, hidden))
            times.append((started, time.monotonic()))
        return times

    runs = await asyncio.gather(*(run(s) for s in sessions))
    for session in sessions:
        await session.close()
    return {"steps": [t for r in runs for t in r]}


async def _hops_and_echo(client: Any, target: str, maddrs: list[str], steps: int) -> dict[str, Any]:
    """One session's hop overhead (wall - reported compute, decode steps) and echoes to ``target``."""
    from peerd.cli.bench_hops import echo_rtts_ms, step_frame

    [session] = await _open(client, 1, steps)
    for _ in range(steps):
        await session.step(torch.randn(1, 1, client.config.hidden_size))
    overheads = [
        h - c
        for hs, cs in zip(session.hop_ms[1:], session.hop_compute_ms[1:], strict=True)
        for h, c in zip(hs, cs, strict=True)
    ]
    await session.close()
    client.peers.learn_addresses(target, maddrs)
    echoes = await echo_rtts_ms(client.peers, target, step_frame(client.config.hidden_size), steps)
    return {"overheads_ms": overheads, "echo_ms": echoes}


async def _worker(initial_peers: list[str], model_path: Path, model_id: str) -> None:
    """Serve commands from stdin until it closes: open N / go / hops, one JSON answer line each."""
    from peerd.cli.bench_hops import serve_echo
    from peerd.client import SwarmClient

    client = await SwarmClient.connect(initial_peers, model_path, model_id=model_id, dht_timeout_s=30.0)
    try:
        await client.wait_for_route(timeout_s=180)  # a loaded 2-core box: peers' records come late
        await serve_echo(client.p2p)
        maddrs = [str(m) for m in await client.p2p.get_visible_maddrs()]
        _answer({"peer_id": client.p2p.peer_id.to_base58(), "maddrs": maddrs})
        sessions: list[Any] = []
        while line := await asyncio.to_thread(sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["do"] == "open":
                sessions = await _open(client, cmd["sessions"], cmd["steps"])
                _answer({"opened": len(sessions)})
            elif cmd["do"] == "go":
                _answer(await _decode(client, sessions, cmd["steps"]))
            elif cmd["do"] == "hops":
                _answer(await _hops_and_echo(client, cmd["target"], cmd["maddrs"], cmd["steps"]))
    finally:
        await client.close()


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class LoadWorkers:
    """Client worker processes of a benchmark; ``close()`` ends them (stdin closed, then waited for)."""

    def __init__(self, count: int, initial_peers: list[str], model_path: Path, model_id: str, log_dir: Path) -> None:
        cmd = [sys.executable, "-m", "peerd.cli.bench_load", "--model-path", str(model_path)]
        cmd += ["--model-id", model_id, "--initial-peers", *initial_peers]
        self.procs = []
        for i in range(count):
            with (log_dir / f"load-worker{i}.log").open("wb") as log:
                self.procs.append(
                    subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
                )
        self.info = [self._read(p) for p in self.procs]

    @staticmethod
    def _read(proc: subprocess.Popen[str], timeout_s: float = 600.0) -> dict[str, Any]:
        assert proc.stdout is not None  # opened with a pipe
        # one answer line per command, so nothing is left in the pipe's buffer between answers
        if not select.select([proc.stdout], [], [], timeout_s)[0]:
            proc.kill()
            raise TimeoutError(f"benchmark client worker {proc.pid} gave no answer in {timeout_s:.0f}s; see its log")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark client worker {proc.pid} exited (code {proc.wait()}); see its log")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, cmds: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send one command to each of the first ``len(cmds)`` workers; their answers, in order."""
        for proc, cmd in zip(self.procs, cmds, strict=False):
            assert proc.stdin is not None  # opened with a pipe
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()
        return [self._read(p) for p in self.procs[: len(cmds)]]

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _level(workers: LoadWorkers, sessions: int, processes: int, steps: int) -> dict[str, Any]:
    """``sessions`` spread over the first ``processes`` workers: tokens/s and step latency."""
    shares = [sessions // processes + (i < sessions % processes) for i in range(processes)]
    shares = [s for s in shares if s]
    workers.ask([{"do": "open", "sessions": s, "steps": steps} for s in shares])
    answers = workers.ask([{"do": "go", "steps": steps} for _ in shares])
    times = [t for a in answers for t in a["steps"]]
    wall = max(end for _, end in times) - min(start for start, _ in times)
    latency = np.asarray([end - start for start, end in times]) * 1e3
    return {
        "sessions": sessions,
        "processes": len(shares),
        "steps": len(times),  # decode steps timed, all sessions together
        "tokens_per_s": len(times) / wall,
        "step_ms_p50": float(np.percentile(latency, 50)),
        "step_ms_p99": float(np.percentile(latency, 99)),
    }


# The lone session, which every level's ratio divides by, steps this many times longer than the
# others: 8 steps of one session are ~0.3 s, and on this shared box its tokens/s moved by a fifth
# between two runs minutes apart whose lone steps ran the same code (25.5 and 32.3 tok/s), and every
# ratio with it.
ONE_SESSION_STEPS_FACTOR = 4


def run_load_levels(workers: LoadWorkers, levels: tuple[int, ...] = (1, 4, 16, 64), steps: int = 12) -> dict[str, Any]:
    """Every level from one process and from all workers, alternating; ratios to one session."""
    out: dict[str, Any] = {
        "steps_per_session": steps,
        "steps_one_session": steps * ONE_SESSION_STEPS_FACTOR,
        "levels": {},
    }
    for n in levels:
        for processes, mode in ((1, "one_process"), (len(workers.procs), "processes")):
            if n == 1 and mode == "processes":
                continue  # one session is one process either way
            result = _level(workers, n, processes, steps * ONE_SESSION_STEPS_FACTOR if n == 1 else steps)
            out["levels"][f"{mode}_{n}"] = result
            print(
                f"      {n:3d} sessions, {result['processes']} client process(es): "
                f"{result['tokens_per_s']:6.1f} tok/s, step p50 {result['step_ms_p50']:.0f} / "
                f"p99 {result['step_ms_p99']:.0f} ms",
                flush=True,
            )
    one = out["levels"]["one_process_1"]["tokens_per_s"]
    for result in out["levels"].values():
        result["vs_one_session"] = result["tokens_per_s"] / one
    return out


def swarm_hops_vs_echo(workers: LoadWorkers, steps: int = 16, rounds: int = 3) -> dict[str, Any]:
    """Worker 0's hop overhead through the swarm beside its echoes to worker 1, ``rounds`` times."""
    target = workers.info[1]
    cmd = {"do": "hops", "target": target["peer_id"], "maddrs": target["maddrs"], "steps": steps}
    overheads, echoes = [], []
    for _ in range(rounds):
        [answer] = workers.ask([cmd])
        overheads += answer["overheads_ms"]
        echoes += answer["echo_ms"]
    overhead, echo = float(np.median(overheads)), float(np.median(echoes))
    return {
        "overhead_ms_p50": overhead,
        "echo_ms_p50": echo,
        "overhead_vs_echo": overhead / echo,
        "hops": len(overheads),
    }


def load_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for _key, r in results["levels"].items():
        if r["sessions"] == 1:
            continue
        target = "; target >= 6x" if r["sessions"] == 16 else ""
        rows.append(
            (
                f"swarm, {r['sessions']} sessions / {r['processes']} proc",
                f"{r['vs_one_session']:.2f}x",
                f"{r['tokens_per_s']:.1f} tok/s, step p50 {r['step_ms_p50']:.0f} / p99 {r['step_ms_p99']:.0f} ms"
                + target,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peerd.cli.bench_load", description="a benchmark client worker")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    asyncio.run(_worker(args.initial_peers, Path(args.model_path), args.model_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
