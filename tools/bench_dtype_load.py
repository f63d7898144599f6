"""Concurrent decode sessions through make bench's swarm with the peers in float32 and in bfloat16,
alternated: does bf16 compute (AVX512-BF16 on this CPU) change what batching across sessions gains?

    python tools/bench_dtype_load.py [--pairs 2] [--out bench-results/dtype-load.json]

Each round starts a bootstrap node and 3 single-threaded `peerd run` peers of SmolLM2-135M with the
given `--dtype`, then runs bench_load's levels (1, 4 and 16 sessions, from one client worker
process and from four) and stops the swarm. Only ratios within one round mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _round(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    from peerd.cli.bench_load import LoadWorkers, run_load_levels
    from peerd.cli.demo import LocalSwarm, split_blocks
    from peerd.cli.helpers import resolve
    from peerd.model.config import ModelConfig

    model_id, path = resolve(args.model, None)
    spans = split_blocks(ModelConfig.from_pretrained(path).num_layers, 3)
    with LocalSwarm(args.model) as swarm:
        swarm.start_bootstrap()
        extra = ["--torch-threads", "1", "--max-sessions", "256", "--max-sessions-per-peer", "128", "--dtype", dtype]
        procs = [swarm.start_peer(f"peer{i + 1}", span, extra) for i, span in enumerate(spans)]
        swarm.wait_ready(procs, timeout_s=300)
        workers = LoadWorkers(4, swarm.initial_peers, path, model_id, swarm.workdir)
        try:
            return run_load_levels(workers, (1, 4, 16), steps=args.steps)
        finally:
            workers.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/bench_dtype_load.py", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=2, help="float32/bfloat16 rounds (order swapped each pair)")
    parser.add_argument("--steps", type=int, default=12, help="decode steps per session (default 12)")
    parser.add_argument("--out", default="bench-results/dtype-load.json")
    args = parser.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        for dtype in ("float32", "bfloat16") if pair % 2 == 0 else ("bfloat16", "float32"):
            print(f"pair {pair + 1}: peers in {dtype} ...", flush=True)
            levels = _round(dtype, args)
            rounds.append({"dtype": dtype, "levels": levels})
            print(json.dumps({"dtype": dtype, "levels": levels})[:2000], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rounds, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
