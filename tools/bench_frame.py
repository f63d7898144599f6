#!/usr/bin/env python3
"""Frame v1 (hand-written msgpack codec, tensors inside) against frame v2 (msgpack header + raw payloads).

Measures, for a decode step ``[1, 1, hidden]`` and a prefill ``[1, 2048, hidden]`` of float32, the time
to encode a message for sending, to decode a received body, and the bytes on the wire. Version 1 is
the ``protocols`` package of the last commit that had it (read from git), run in its own process,
alternating with the working tree's version 2 round by round, so both see the same machine load.

Usage: python tools/bench_frame.py [--hidden 4096] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from frame_versions import ROOT, V1_COMMIT, git_tree, run_worker

SHAPES = {"decode_step": (1, 1), "prefill_2048": (1, 2048)}


def _best_us(fn: Any, min_total_s: float) -> float:
    """Median of per-call times over batches lasting ``min_total_s`` in all, in microseconds."""
    fn()  # warm up
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    per_batch = max(1, int(0.02 / once))
    samples: list[float] = []
    deadline = time.perf_counter() + min_total_s
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        for _ in range(per_batch):
            fn()
        samples.append((time.perf_counter() - start) / per_batch * 1e6)
    return statistics.median(samples)


def worker(hidden: int) -> dict[str, Any]:
    """Measure the ``protocols`` package found first on sys.path (v1 or v2)."""
    import numpy as np

    import protocols
    from protocols import InferenceStep, decode_array, decode_message, encode_array, encode_frame

    send = getattr(protocols, "frame_parts", None)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"version": list(protocols.PROTOCOL_VERSION)}
    for name, (batch, tokens) in SHAPES.items():
        array = rng.standard_normal((batch, tokens, hidden)).astype(np.float32)
        msg = InferenceStep(encode_array(array), position=0, step_id=1)

        def encode(msg: Any = msg) -> Any:
            return send([msg]) if send is not None else encode_frame(msg)

        body = encode_frame(msg)[4:]

        def decode(body: bytes = body) -> Any:
            return decode_array(decode_message(body).hidden)

        budget_s = 0.5 if tokens == 1 else 1.5
        result[name] = {
            "wire_bytes": 4 + len(body),
            "payload_bytes": array.nbytes,
            "encode_us": _best_us(encode, budget_s),
            "decode_us": _best_us(decode, budget_s),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.hidden)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"v1": [], "v2": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"v1": git_tree(V1_COMMIT, Path(tmp), "protocols"), "v2": ROOT}
        for _ in range(args.rounds):
            for version, tree in trees.items():
                runs[version].append(run_worker(__file__, tree, ["--hidden", str(args.hidden)]))
    summary: dict[str, Any] = {"hidden": args.hidden, "rounds": args.rounds}
    print(f"frame v1 vs v2, float32, hidden {args.hidden}, median of {args.rounds} alternating rounds")
    print(f"{'frame':<14} {'metric':<10} {'v1':>12} {'v2':>12} {'v2/v1':>7}")
    for name in SHAPES:
        summary[name] = {}
        for metric in ("wire_bytes", "encode_us", "decode_us"):
            old = statistics.median(run[name][metric] for run in runs["v1"])
            new = statistics.median(run[name][metric] for run in runs["v2"])
            summary[name][metric] = {"v1": old, "v2": new, "ratio": new / old}
            print(f"{name:<14} {metric:<10} {old:>12.1f} {new:>12.1f} {new / old:>7.3f}")
        both = {v: statistics.median(r[name]["encode_us"] + r[name]["decode_us"] for r in runs[v]) for v in runs}
        summary[name]["encode_plus_decode_us"] = {**both, "ratio": both["v2"] / both["v1"]}
        print(f"{name:<14} {'enc+dec':<10} {both['v1']:>12.1f} {both['v2']:>12.1f} {both['v2'] / both['v1']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
