"""`peerd demo`: a local swarm (a bootstrap node + N peers as separate OS processes) and a chat.

Each peer is a real `peerd run` process on 127.0.0.1, exactly what a volunteer would run; the demo
only supervises them: it shows their progress, waits (bounded) for a full route, streams an answer,
and always stops every process it started, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalSwarm", "cmd_demo", "split_blocks"]


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal spans: 30 blocks over 3 peers -> 0:10, 10:20, 20:30."""
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path

    def ready(self) -> dict[str, object] | None:
        try:
            return dict(json.loads(self.ready_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class LocalSwarm:
    """Starts and stops `peerd` processes on 127.0.0.1 in a scratch folder (used by demo and bench)."""

    def __init__(self, model: str, *, cache_dir: str | None = None, workdir: Path | None = None) -> None:
        self.model = model
        self.cache_dir = cache_dir
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="peerd-swarm-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.procs: list[_Proc] = []
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, args: list[str], *, new_session: bool = False) -> _Proc:
        ready = self.workdir / f"{name}.ready.json"
        log = self.workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "peerd", *args, "--model", self.model, "--ready-file", str(ready)]
        if self.cache_dir:
            cmd += ["--cache-dir", self.cache_dir]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=new_session
            )
        proc = _Proc(name, popen, ready, log)
        self.procs.append(proc)
        return proc

    def start_bootstrap(self, timeout_s: float = 60.0, extra: list[str] | None = None) -> list[str]:
        # a local swarm: loopback only, and a swarm of its own
        args = ["bootstrap", "--new-swarm", "--host", "127.0.0.1", "--identity", str(self.workdir / "bootstrap.key")]
        args += extra or []
        proc = self._spawn("bootstrap", args)
        info = self.wait_ready([proc], timeout_s)[0]
        self.initial_peers = [str(m) for m in info["maddrs"]]  # type: ignore[attr-defined]
        return self.initial_peers

    def start_peer(
        self, name: str, blocks: tuple[int, int], extra: list[str] | None = None, *, new_session: bool = False
    ) -> _Proc:
        """Start `peerd run` for ``blocks``; ``new_session``: in a process group of its own (as a shell runs it)."""
        args = [
            "run",
            "--blocks",
            f"{blocks[0]}:{blocks[1]}",
            "--identity",
            str(self.workdir / f"{name}.key"),
            "--name",
            name,
            "--host",
            "127.0.0.1",
            "--initial-peers",
            ",".join(self.initial_peers),
            *(extra or []),
        ]
        return self._spawn(name, args, new_session=new_session)

    def wait_ready(self, procs: list[_Proc], timeout_s: float, on_ready=None) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
        """Poll until every process wrote its ready file; raise with its log tail if one dies."""
        deadline = time.monotonic() + timeout_s
        pending = {p.name: p for p in procs}
        results: dict[str, dict[str, object]] = {}
        while pending:
            for name, proc in list(pending.items()):
                info = proc.ready()
                if info is not None:
                    results[name] = info
                    del pending[name]
                    if on_ready:
                        on_ready(proc, info)
                elif proc.popen.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                raise TimeoutError(
                    f"{names} not ready after {timeout_s:.0f}s; last log lines:\n"
                    + "\n".join(p.log_tail(5) for p in pending.values())
                )
            time.sleep(0.2)
        return [results[p.name] for p in procs]

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every process we started (graceful: they announce offline), SIGKILL stragglers."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    from peerd.cli.helpers import resolve, run_async
    from peerd.model.config import ModelConfig
    from peerd.model.fetch import fetch_model
    from peerd.model.registry import ModelNotFoundError, canonical_model_id

    try:
        model_id, path = resolve(args.model, args.cache_dir)
    except ModelNotFoundError:
        if canonical_model_id(args.model) is None:
            raise
        fetch_model(args.model, Path(args.cache_dir) if args.cache_dir else None)
        model_id, path = resolve(args.model, args.cache_dir)
    num_blocks = ModelConfig.from_pretrained(path).num_layers
    spans = split_blocks(num_blocks, args.peers)
    threads = max(1, (os.cpu_count() or 2) // args.peers)
    print(
        f"peerd demo: {model_id} ({num_blocks} blocks) over {args.peers} local peers: "
        + ", ".join(f"{a}:{b}" for a, b in spans),
        flush=True,
    )
    with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
        print("[1/4] starting the bootstrap node ...", flush=True)
        swarm.start_bootstrap()
        print(f"      {swarm.initial_peers[0]}", flush=True)
        print(
            f"[2/4] starting {args.peers} peers (each loads only its blocks, then measures itself) ...",
            flush=True,
        )
        started = time.monotonic()
        procs = [
            swarm.start_peer(f"peer{i + 1}", span, ["--torch-threads", str(threads)]) for i, span in enumerate(spans)
        ]

        def on_ready(proc: _Proc, info: dict[str, object]) -> None:
            blocks = info.get("blocks")
            print(
                f"      {proc.name} online: blocks {blocks} after {time.monotonic() - started:.1f}s",
                flush=True,
            )

        swarm.wait_ready(procs, timeout_s=300, on_ready=on_ready)
        return run_async(_chat(args, swarm.initial_peers, model_id, path))


async def _chat(args: argparse.Namespace, initial_peers: list[str], model_id: str, path: Path) -> int:
    from peerd.client import SwarmClient

    print("[3/4] client joining the swarm and waiting for a full route ...", flush=True)
    client = await SwarmClient.connect(initial_peers, path, model_id=model_id)
    try:
        route = await client.wait_for_route(timeout_s=60)
        print("      route: " + " -> ".join(str(s) for s in route), flush=True)
        print(f"[4/4] asking: {args.prompt}\n", flush=True)
        result = await client.chat(
            [{"role": "user", "content": args.prompt}],
            max_new_tokens=args.max_new_tokens,
            on_text=lambda t: print(t, end="", flush=True),
        )
        print("\n", flush=True)
        print(f"route            {' -> '.join(str(s) for s in result.route)}")
        print(f"prompt tokens    {result.prompt_tokens}")
        print(f"new tokens       {len(result.token_ids)}")
        print(f"first token      {result.time_to_first_token_s * 1e3:.0f} ms")
        print(f"decode speed     {result.tokens_per_s:.1f} tokens/s")
    finally:
        await client.close()
    return 0
