"""`make bench-quality`: what quantized peers cost in quality, measured through a real local swarm.

A bootstrap node and one peer per quantization (``--quant none``, ``int8``, ``nf4``, ``int4``, computing
in float32, and ``int8`` and ``int4`` computing in bfloat16: rows ``int8-bf16``, ``int4-bf16``), each
hosting every block, serve the model; a client routes through one of them at a time (``allowed_peers``)
and computes the logits of a fixed text shipped with the package (``peerd/data/quality_text.txt``). For
each quantization it reports the perplexity of that text, its change against the local float32
model, the largest and mean absolute logit difference from it, and the bytes one block's weights
take as the peer measured them after loading (its ``info``). With ``--speed-rounds R`` (default 3)
it also times greedy decoding through all blocks in this process for each quantization, rounds
interleaved, one torch thread (the median, in tokens/s). Targets (the issue's, on
SmolLM2): int8 within 2% of float32 perplexity, 4-bit (nf4 and int4) within 8%. Run with
``python -m peerd.cli.bench_quality [--model ID] [--tokens N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from peerd.model.quant import BITS_PER_WEIGHT

__all__ = ["TARGET_PPL_INCREASE", "main", "perplexity", "quality_text"]

QUANTS = ("none", "int8", "nf4", "int4")
TARGET_PPL_INCREASE = {"none": 0.0, "int8": 0.02, "nf4": 0.08, "int4": 0.08}  # relative to local float32
# (row, --quant, --dtype): every quantization with float32 compute, and int8 and int4 computing in
# bfloat16 as well (on the CPU those run torch's packed int8 and int4 kernels: model/quant.py, int4.py)
VARIANTS = (*((q, q, "float32") for q in QUANTS), ("int8-bf16", "int8", "bfloat16"), ("int4-bf16", "int4", "bfloat16"))


def quality_text() -> str:
    """The fixed English text the quality numbers are measured on (plain prose, written for peerd)."""
    return resources.files("peerd").joinpath("data/quality_text.txt").read_text(encoding="utf-8")


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross entropy) of ``ids [1, n]`` under ``logits [1, n, vocab]``."""
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return float(loss.exp())


def _row(
    name: str, quant: str, dtype: str, logits: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor, ppl32: float
) -> dict[str, Any]:
    diff = (logits.float() - reference.float()).abs()
    ppl = perplexity(logits, ids)
    return {
        "quant": name,
        "dtype": dtype,
        "bits_per_weight": 32.0 if quant == "none" else BITS_PER_WEIGHT[quant],
        "perplexity": ppl,
        "perplexity_increase": ppl / ppl32 - 1.0,
        "target_increase": TARGET_PPL_INCREASE[quant],
        "meets_target": ppl / ppl32 - 1.0 <= TARGET_PPL_INCREASE[quant] + 1e-3,
        "logit_diff_max": float(diff.max()),
        "logit_diff_mean": float(diff.mean()),
    }


async def _swarm_logits(initial_peers: list[str], path: Path, model_id: str, peers: dict[str, str], ids: torch.Tensor):  # type: ignore[no-untyped-def]
    """{row: (logits through that row's peer, its blocks' weight bytes as it measured them)}."""
    from peerd.client import SwarmClient

    client = await SwarmClient.connect(initial_peers, path, model_id=model_id)
    out: dict[str, tuple[torch.Tensor, int]] = {}
    try:
        quants = {name: quant for name, quant, _ in VARIANTS}
        for name, peer_id in peers.items():
            quant = quants[name]
            client.allowed_peers = {peer_id}  # through this quantization's peer only
            await client.wait_for_route(timeout_s=120)
            record = (await client.servers(refresh=True)).get(peer_id)
            deadline = time.monotonic() + 120
            while record is None:  # a DHT read on a loaded machine can miss the peer once: read again
                if time.monotonic() > deadline:
                    raise RuntimeError(f"peer {peer_id} ({quant}) is not in the DHT after 120 s")
                await asyncio.sleep(1.0)
                record = (await client.servers(refresh=True)).get(peer_id)
            assert record.quant == quant, f"peer {peer_id} announces {record.quant!r}, started with {quant!r}"
            weight_bytes = int((await client.peers.info(peer_id)).extra["weight_bytes"])
            out[name] = (await client.forward(ids), weight_bytes)
    finally:
        await client.close()
    return out


def decode_speeds(path: Path, rounds: int, steps: int = 32) -> list[float]:
    """Median decode tokens/s through all blocks for each of VARIANTS, rounds interleaved (one thread)."""
    from peerd.model.config import ModelConfig
    from peerd.model.loading import load_stage

    torch.set_num_threads(1)
    num_layers = ModelConfig.from_pretrained(path).num_layers
    stages = [
        load_stage(path, 0, num_layers, progress=False, quant=quant, dtype=getattr(torch, dtype))
        for _, quant, dtype in VARIANTS
    ]
    x = torch.randn(1, 17, stages[0].config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.1
    times: list[list[float]] = [[] for _ in VARIANTS]
    with torch.inference_mode():
        for _ in range(rounds):
            for i, stage in enumerate(stages):
                cache = stage.allocate_cache(1, 16 + steps)
                stage(x[:, :16].to(stage.dtype), cache, 0)
                step = x[:, 16:].to(stage.dtype)
                started = time.perf_counter()
                for t in range(steps):
                    stage(step, cache, 16 + t)
                times[i].append(steps / (time.perf_counter() - started))
    return [statistics.median(t) for t in times]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m peerd.cli.bench_quality", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--tokens", type=int, default=512, help="at most this many tokens of the text (default 512)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="interleaved decode-speed rounds (0: skip)")
    parser.add_argument("--out", default="bench-results/quality.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    from peerd.cli.demo import LocalSwarm
    from peerd.cli.helpers import resolve, run_async
    from peerd.model.chat import load_tokenizer
    from peerd.model.config import ModelConfig
    from peerd.model.loading import load_local_model

    model_id, path = resolve(args.model, args.cache_dir)
    config = ModelConfig.from_pretrained(path)
    ids = torch.tensor([load_tokenizer(path).encode(quality_text()).ids[: args.tokens]])
    print(f"peerd bench-quality: {model_id}, {ids.shape[1]} tokens of the shipped text", flush=True)
    with torch.inference_mode():
        reference = load_local_model(path, progress=False).forward(ids)
    ppl32 = perplexity(reference, ids)
    with LocalSwarm(args.model, cache_dir=args.cache_dir) as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_peer(name, (0, config.num_layers), ["--quant", quant, "--dtype", dtype, "--torch-threads", "1"])
            for name, quant, dtype in VARIANTS
        ]
        ready = swarm.wait_ready(procs, timeout_s=600)
        peers = {v[0]: str(info["peer_id"]) for v, info in zip(VARIANTS, ready, strict=True)}
        served = run_async(_swarm_logits(swarm.initial_peers, path, model_id, peers, ids))
    rows = [_row(name, quant, dtype, served[name][0], reference, ids, ppl32) for name, quant, dtype in VARIANTS]
    for row in rows:
        row["block_weight_bytes"] = served[row["quant"]][1] // config.num_layers
    if args.speed_rounds > 0:
        for row, tps in zip(rows, decode_speeds(path, args.speed_rounds), strict=True):
            row["decode_tokens_per_s"] = tps
    print(f"local float32 perplexity {ppl32:.3f}")
    header = f"{'quant':9} {'bits/w':>6} {'MiB/block':>9} {'perplexity':>10} {'vs f32':>8} {'target':>7}"
    print(header + f" {'max |dlogit|':>12} {'mean |dlogit|':>13} {'decode tok/s':>12}")
    for r in rows:
        mark = "ok" if r["meets_target"] else "MISSED"
        print(
            f"{r['quant']:9} {r['bits_per_weight']:6.2f} {r['block_weight_bytes'] / 2**20:9.2f} "
            f"{r['perplexity']:10.3f} {r['perplexity_increase']:+8.2%} {r['target_increase']:7.0%} "
            f"{r['logit_diff_max']:12.3f} {r['logit_diff_mean']:13.4f} "
            f"{r.get('decode_tokens_per_s', float('nan')):12.1f}  {mark}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_id, "tokens": int(ids.shape[1]), "float32_perplexity": ppl32, "rows": rows}
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
