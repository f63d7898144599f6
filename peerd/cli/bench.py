"""`make bench`: side-by-side measurements on this machine, printed as ratios and written to JSON.

These machines are shared and noisy, so nothing here trusts one absolute time: the swarm and the
local baseline run interleaved in the same process, several rounds each, and we report medians
and their ratio. Run with ``python -m peerd.cli.bench [--model ID] [--tokens N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["main"]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def local_decode(model: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy decode with the whole model in this process; returns (tokens, decode tokens/s)."""
    head, stage = model.head, model.stage
    with torch.inference_mode():
        cache = stage.allocate_cache(1, len(prompt) + new_tokens)
        hidden = stage.forward(head.embed(torch.tensor([prompt])), cache=cache, position=0)
        token = int(head.logits(hidden[:, -1:])[0, -1].argmax())
        tokens = [token]
        started = time.perf_counter()
        for i in range(new_tokens - 1):
            hidden = stage.forward(head.embed(torch.tensor([[token]])), cache=cache, position=len(prompt) + i)
            token = int(head.logits(hidden)[0, -1].argmax())
            tokens.append(token)
        elapsed = time.perf_counter() - started
    return tokens, (new_tokens - 1) / elapsed


def codec_ratio(size_mib: int = 16, rounds: int = 5) -> dict[str, float]:
    """Tensor codec encode+decode throughput versus a plain memory copy of the same bytes.

    Encoding leaves the payload in place (``frame_parts`` hands the tensor's buffer to the writer)
    and decoding takes views, so the one copy measured is the body made contiguous, which a
    receiver's read does anyway: frame v2 should come close to 1 here. (Until 2026-11-30
    ``encode_message`` copied the payload twice, joining the frame and then slicing its prefix off,
    which read 0.155 here against 0.87 before frame v2; the send and receive paths never did.)"""
    from protocols import ForwardRequest, decode_message, encode_array, encode_message

    array = np.random.default_rng(0).standard_normal(size_mib * 1024 * 1024 // 4).astype(np.float32)
    nbytes = array.nbytes
    codec_s, copy_s = [], []
    for _ in range(rounds + 1):  # the first round warms up (first-touch page faults), untimed
        t0 = time.perf_counter()
        body = encode_message(ForwardRequest(encode_array(array.reshape(1, -1, 1024)), 0, 1))
        decoded = decode_message(body)
        assert isinstance(decoded, ForwardRequest)
        codec_s.append(time.perf_counter() - t0)
        del decoded, body  # as the copy below: freed before the next round allocates
        t0 = time.perf_counter()
        copy = bytearray(memoryview(array.data).cast("B"))
        copy_s.append(time.perf_counter() - t0)
        del copy
    codec_s, copy_s = codec_s[1:], copy_s[1:]
    codec = nbytes / statistics.median(codec_s) / 1e9
    memcpy = nbytes / statistics.median(copy_s) / 1e9
    return {"codec_gb_per_s": codec, "memcpy_gb_per_s": memcpy, "codec_vs_memcpy": codec / memcpy}


async def swarm_decode(initial_peers: list[str], path: Path, model_id: str, prompt: list[int], new_tokens: int):  # type: ignore[no-untyped-def]
    from peerd.client import SwarmClient

    client = await SwarmClient.connect(initial_peers, path, model_id=model_id)
    try:
        await client.wait_for_route(timeout_s=60)
        return await client.generate(prompt, max_new_tokens=new_tokens, stop_on_eos=False)
    finally:
        await client.close()


class _KillAt:
    """``on_token`` callback that SIGKILLs the named peer process after ``at_token`` tokens."""

    def __init__(self, swarm: Any, name: str, at_token: int) -> None:
        self.swarm, self.name, self.at_token, self.seen = swarm, name, at_token, 0

    def on_token(self, _: int) -> None:
        self.seen += 1
        if self.seen == self.at_token:
            proc = next(p for p in reversed(self.swarm.procs) if p.name == self.name)
            os.kill(int(proc.ready()["pid"]), signal.SIGKILL)


async def _time_to_serve(swarm: Any, name: str, span: tuple[int, int], client: Any, hidden: int) -> float:
    """Seconds from spawning `peerd run` until the new peer answers a forward request."""
    started = time.monotonic()
    proc = swarm.start_peer(name, span, ["--torch-threads", "1"])
    info = await asyncio.to_thread(swarm.wait_ready, [proc], 300)
    x = torch.zeros(1, 1, hidden)
    while True:
        try:
            await client.peers.forward(str(info[0]["peer_id"]), x, span[0], span[1])
            return time.monotonic() - started
        except Exception:
            await asyncio.sleep(0.05)


async def failover_rounds(  # type: ignore[no-untyped-def]
    swarm, span: tuple[int, int], path: Path, model_id: str, prompt: list[int], expected: list[int], rounds: int
) -> dict[str, Any]:
    """Add a replica of ``span``, then per round: kill whichever replica the route uses at token 10,
    record the stall, check the output, and restart the killed peer (timing until it serves)."""
    from peerd.client import BanList, SwarmClient

    client = await SwarmClient.connect(swarm.initial_peers, path, model_id=model_id, failover_timeout_s=120.0)
    stalls, serve_s, identical = [], [], True
    try:
        hidden = client.config.hidden_size
        serve_s.append(await _time_to_serve(swarm, "replica", span, client, hidden))
        for r in range(rounds):
            await client.wait_for_route(timeout_s=60)
            client.router.bans = BanList()  # restarted peers are healthy again
            route = await client.router.plan_inference(0, client.num_blocks, len(prompt) + len(expected))
            killer = _KillAt(swarm, route[0].record.public_name, at_token=10)
            result = await client.generate(
                prompt, max_new_tokens=len(expected), stop_on_eos=False, on_token=killer.on_token
            )
            identical &= result.token_ids == expected
            stalls += [s * 1e3 for s in result.stalls_s]
            stall_ms = result.stalls_s[0] * 1e3 if result.stalls_s else float("nan")
            print(
                f"      round {r + 1}: killed {killer.name}, stall {stall_ms:.0f} ms, "
                f"same tokens: {result.token_ids == expected}",
                flush=True,
            )
            killed = [killer.name]
            next(p for p in reversed(swarm.procs) if p.name == killed[0]).ready_file.unlink()
            serve_s.append(await _time_to_serve(swarm, killed[0], span, client, hidden))
    finally:
        await client.close()
    return {
        "failover_stalls_ms": stalls,
        "failover_stall_ms_p50": _percentile(stalls, 50),
        "failover_outputs_identical": identical,
        "time_to_serve_s": serve_s,
        "time_to_serve_s_p50": _percentile(serve_s, 50),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peerd.cli.bench", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation (default 48)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of local and swarm (default 3)")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--out", default="bench-results/bench.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="throughput and hop figures only: no serving, training or failover parts; loads of 1/4/16 sessions",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve, run_async
    from peerd.model.chat import ChatTemplate, chat_prompt_ids, load_tokenizer
    from peerd.model.config import ModelConfig
    from peerd.model.loading import load_local_model

    # one intra-op thread everywhere: each peer process gets one, and so does the local baseline,
    # so the comparison is of the same compute with and without the network in between
    torch.set_num_threads(1)
    model_id, path = resolve(args.model, args.cache_dir)
    config = ModelConfig.from_pretrained(path)
    story = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt = chat_prompt_ids(load_tokenizer(path), ChatTemplate.from_folder(path), story)
    print(
        f"peerd bench: {model_id}, {config.num_layers} blocks, {args.peers} local peers, "
        f"{args.tokens} new tokens, {args.rounds} rounds, 1 torch thread per process",
        flush=True,
    )

    print("[1/4] tensor codec vs memcpy ...", flush=True)
    codec = codec_ratio()
    print("[2/4] loading the local baseline ...", flush=True)
    local_model = load_local_model(path, progress=False)
    local_decode(local_model, prompt, 4)  # warm-up
    results: dict[str, Any] = {"model": model_id, "tokens": args.tokens, "rounds": args.rounds, "codec": codec}
    print("[+] float32 products: oneDNN vs MKL, a peer's decode step and backward, the LM head ...", flush=True)
    from peerd.cli.bench_kernels import run_kernels_bench

    results["kernels"] = run_kernels_bench(local_model)
    if not args.quick:
        print("[+] one peer's serving: batched vs unbatched sessions, decode under a max-size flood ...", flush=True)
        from peerd.cli.bench_serving import run_serving_bench

        results["serving"] = run_serving_bench(local_model.stage)
    results["hop_breakdown"] = _hop_breakdown(path, model_id)
    with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
        print(
            "[3/4] starting a bootstrap node and peers "
            + ", ".join(f"{a}:{b}" for a, b in split_blocks(config.num_layers, args.peers))
            + " ...",
            flush=True,
        )
        results["swarm_start_s"] = _start_swarm(swarm, split_blocks(config.num_layers, args.peers))
        print(f"      ready after {results['swarm_start_s']:.1f}s", flush=True)
        print("[4/4] interleaved rounds: local, swarm, local, swarm, ...", flush=True)
        rounds = _interleaved_rounds(local_model, swarm.initial_peers, path, model_id, prompt, args)
        tokens_local = rounds["tokens_local"]
        text = load_tokenizer(path).decode(tokens_local, skip_special_tokens=True)
        results |= _concurrent_load(swarm, path, model_id, quick=args.quick)
        print("[+] 16 concurrent generations from one client: LM head batched vs one pass per request ...")
        from peerd.cli.bench_heads import run_heads_bench

        results["client_heads"] = run_async(run_heads_bench(swarm.initial_peers, path, model_id, prompt))
        if not args.quick:
            print("[+] training: forward+backward, micro-batches pipelined vs stage by stage ...", flush=True)
            from peerd.cli.bench_train import run_training_bench

            results["training"] = run_training_bench(
                swarm.initial_peers, path, model_id, batch_size=4, seq_len=64, rounds=2
            )
            print("[5/5] failover: kill the peer serving block 0 mid-generation (a replica takes over) ...", flush=True)
            spans = split_blocks(config.num_layers, args.peers)
            failover = run_async(
                failover_rounds(swarm, spans[0], path, model_id, prompt, tokens_local[: args.tokens], rounds=3)
            )
            results.update(failover)

    local_tps, swarm_tps, overheads = rounds["local_tps"], rounds["swarm_tps"], rounds["overheads"]
    local_med, swarm_med = statistics.median(local_tps), statistics.median(swarm_tps)
    results.update(
        local_tokens_per_s=local_med,
        swarm_tokens_per_s=swarm_med,
        swarm_vs_local=swarm_med / local_med,
        hop_overhead_ms_p50=_percentile(overheads, 50),
        hop_overhead_ms_p99=_percentile(overheads, 99),
        hops_measured=len(overheads),
        outputs_identical=rounds["identical"],
        local_rounds=local_tps,
        swarm_rounds=swarm_tps,
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        sample_text=text,
    )
    _report(results, codec, len(overheads), args.out)
    return 0


def _start_swarm(swarm: Any, spans: list[tuple[int, int]]) -> float:
    """Start a bootstrap node and one single-threaded peer per span; seconds until all serve.

    Peers take up to 64 sessions of one client (the load benchmark's one-process case)."""
    t0 = time.monotonic()
    swarm.start_bootstrap()
    extra = ["--torch-threads", "1", "--max-sessions", "256", "--max-sessions-per-peer", "128"]
    procs = [swarm.start_peer(f"peer{i + 1}", span, extra) for i, span in enumerate(spans)]
    swarm.wait_ready(procs, timeout_s=300)
    return time.monotonic() - t0


def _hop_breakdown(path: Path, model_id: str) -> dict[str, Any]:
    from peerd.cli.bench_hops import inprocess_breakdown
    from peerd.cli.helpers import run_async

    print("[+] where a decode hop's time goes: an in-process peer of 4 blocks, traced, beside a raw echo ...")
    with tempfile.TemporaryDirectory(prefix="peerd-hops-") as workdir:
        result: dict[str, Any] = run_async(inprocess_breakdown(path, model_id, (0, 4), Path(workdir)))
    return result


def _concurrent_load(swarm: Any, path: Path, model_id: str, *, quick: bool) -> dict[str, Any]:
    """Concurrent sessions from 1 and 4 client worker processes, and the swarm's hop overhead
    beside a raw echo between two of them (see bench_load)."""
    from peerd.cli.bench_load import LoadWorkers, run_load_levels, swarm_hops_vs_echo

    print("[+] concurrent sessions: starting 4 client worker processes ...", flush=True)
    workers = LoadWorkers(4, swarm.initial_peers, path, model_id, swarm.workdir)
    try:
        print("      one session's hop overhead through the swarm, beside echoes between two workers", flush=True)
        hops = swarm_hops_vs_echo(workers)
        levels = (1, 4, 16) if quick else (1, 4, 16, 64)
        return {"swarm_hops_vs_echo": hops, "load": run_load_levels(workers, levels, steps=8 if quick else 12)}
    finally:
        workers.close()


def _interleaved_rounds(
    local_model: Any, initial_peers: list[str], path: Path, model_id: str, prompt: list[int], args: argparse.Namespace
) -> dict[str, Any]:
    """Local and swarm generation alternated ``args.rounds`` times, so machine drift hits both alike."""
    from peerd.cli.helpers import run_async

    local_tps: list[float] = []
    swarm_tps: list[float] = []
    overheads: list[float] = []
    identical = True
    tokens_local: list[int] = []
    for r in range(args.rounds):
        tokens_local, tps = local_decode(local_model, prompt, args.tokens)
        local_tps.append(tps)
        res = run_async(swarm_decode(initial_peers, path, model_id, prompt, args.tokens))
        swarm_tps.append(res.tokens_per_s)
        identical &= res.token_ids == tokens_local
        for hops, computes in zip(res.hop_ms[1:], res.hop_compute_ms[1:], strict=True):  # decode steps only
            overheads += [h - c for h, c in zip(hops, computes, strict=True)]
        print(
            f"      round {r + 1}: local {tps:6.1f} tok/s   swarm {res.tokens_per_s:6.1f} tok/s   "
            f"same tokens: {res.token_ids == tokens_local}",
            flush=True,
        )
    return {
        "local_tps": local_tps,
        "swarm_tps": swarm_tps,
        "overheads": overheads,
        "identical": identical,
        "tokens_local": tokens_local,
    }


def _report(results: dict[str, Any], codec: dict[str, float], hops: int, out_path: str) -> None:
    """Print the summary table and write ``results`` as JSON to ``out_path``."""
    rows = _rows(results, codec, hops)
    print()
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name.ljust(width)}  {value:>14}   {note}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out}")


def _rows(results: dict[str, Any], codec: dict[str, float], hops: int) -> list[tuple[str, str, str]]:
    from peerd.cli.bench_heads import heads_rows
    from peerd.cli.bench_hops import breakdown_rows
    from peerd.cli.bench_kernels import kernels_rows
    from peerd.cli.bench_load import load_rows
    from peerd.cli.bench_serving import serving_rows
    from peerd.cli.bench_train import training_rows

    swarm_med, local_med = results["swarm_tokens_per_s"], results["local_tokens_per_s"]
    echo = results["swarm_hops_vs_echo"]
    rows = [
        ("swarm generation", f"{swarm_med:.1f} tok/s", "median of rounds"),
        ("local generation", f"{local_med:.1f} tok/s", "same model, same process"),
        ("swarm / local", f"{results['swarm_vs_local']:.3f}", "3 peers; target >= 0.95"),
        ("per-hop overhead p50", f"{results['hop_overhead_ms_p50']:.2f} ms", "decode step wall - server compute"),
        ("per-hop overhead p99", f"{results['hop_overhead_ms_p99']:.2f} ms", f"{hops} hops"),
        (
            "swarm hop overhead / echo",
            f"{echo['overhead_vs_echo']:.2f}x",
            f"{echo['overhead_ms_p50']:.2f} vs {echo['echo_ms_p50']:.2f} ms p50: a worker's hops through the "
            "3 peer processes, its echoes to another worker process; target <= 1.5x",
        ),
        (
            "codec / memcpy",
            f"{codec['codec_vs_memcpy']:.3f}",
            f"{codec['codec_gb_per_s']:.2f} vs {codec['memcpy_gb_per_s']:.2f} GB/s (16 MiB fp32)",
        ),
        ("outputs identical", str(results["outputs_identical"]), "swarm tokens == local tokens"),
    ]
    rows += load_rows(results["load"])
    rows += kernels_rows(results["kernels"])
    rows += heads_rows(results["client_heads"])
    rows += [("decode hop, in-process peer", "thread / inline", ""), *breakdown_rows(results["hop_breakdown"])]
    if "failover_stalls_ms" in results:
        stalls, same = results["failover_stalls_ms"], results["failover_outputs_identical"]
        rows.append(
            ("failover stall p50", f"{results['failover_stall_ms_p50']:.0f} ms", f"{len(stalls)} kills; same: {same}")
        )
        serve_s = results["time_to_serve_s_p50"]
        rows.append(("new peer serves after", f"{serve_s:.1f} s", "p50 from `peerd run` to its first forward answered"))
    if "training" in results:
        rows += training_rows(results["training"])
    if "serving" in results:
        rows += serving_rows(results["serving"])
    return rows


if __name__ == "__main__":
    sys.exit(main())
