#!/usr/bin/env python3
"""Per-hop decode latency through a real 2-peer swarm, frame v1 against frame v2, side by side.

Each round starts, in its own process, two in-process peers (real p2pd, real DHT, 127.0.0.1) of a
random Llama (hidden 512, 8 blocks, 4 per peer) and one client, opens an inference session on each
peer and times single-token decode steps: wall time at the client, and wall time minus the
``compute_ms`` the peer reports (the hop's overhead: encode, streams, decode, scheduling). Version 1
is the whole tree of the last commit before frame v2 (from git); rounds alternate between the two
trees so that both see the same machine load.

Usage: python tools/bench_hop.py [--rounds 3] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from frame_versions import ROOT, V1_COMMIT, git_tree, run_worker


async def _measure(workdir: Path, steps: int) -> dict[str, Any]:
    import numpy as np
    import torch

    import protocols
    from tests.helpers.swarm import Swarm
    from tests.helpers.tiny_model import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(
        workdir / "ckpt", num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1024
    )
    swarm = Swarm(ckpt, workdir, [])
    walls: list[float] = []
    overheads: list[float] = []
    try:
        peers = [await swarm.add_peer("a", (0, 4)), await swarm.add_peer("b", (4, 8))]
        client = await swarm.client()
        try:
            for peer, (start, end) in zip(peers, ((0, 4), (4, 8)), strict=True):
                stream = await client.peers.open_inference(
                    peer.peer_id, session_id=os.urandom(16), start=start, end=end, max_length=steps + 32, batch_size=1
                )
                try:
                    for position in range(steps + 16):
                        hidden = torch.randn(1, 1, 512)
                        began = time.perf_counter()
                        await stream.step(hidden, position)
                        wall_ms = (time.perf_counter() - began) * 1e3
                        if position >= 16:  # warm-up steps are not counted
                            walls.append(wall_ms)
                            overheads.append(wall_ms - stream.last_compute_ms)
                finally:
                    await stream.close()
        finally:
            await client.close()
    finally:
        for peer in swarm.peers:
            await peer.shutdown()
        await asyncio.gather(*swarm.tasks)
    return {
        "version": list(protocols.PROTOCOL_VERSION),
        "wall_ms_p50": float(np.percentile(walls, 50)),
        "overhead_ms_p50": float(np.percentile(overheads, 50)),
        "overhead_ms_p90": float(np.percentile(overheads, 90)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="timed decode steps per peer and round")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(asyncio.run(_measure(Path(tmp), args.steps))))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"v1": [], "v2": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"v1": git_tree(V1_COMMIT, Path(tmp)), "v2": ROOT}
        for _ in range(args.rounds):
            for version, tree in trees.items():
                runs[version].append(run_worker(__file__, tree, ["--steps", str(args.steps)], timeout_s=600))
                print(version, json.dumps(runs[version][-1]), flush=True)  # progress: a round at a time
    summary: dict[str, Any] = {"rounds": args.rounds, "steps": args.steps, "runs": runs}
    print(f"decode hop through a 2-peer swarm (hidden 512), median over {args.rounds} alternating rounds")
    print(f"{'metric':<18} {'v1':>9} {'v2':>9} {'v2/v1':>7}")
    for metric in ("wall_ms_p50", "overhead_ms_p50", "overhead_ms_p90"):
        old = statistics.median(run[metric] for run in runs["v1"])
        new = statistics.median(run[metric] for run in runs["v2"])
        summary[metric] = {"v1": old, "v2": new, "ratio": new / old}
        print(f"{metric:<18} {old:>9.3f} {new:>9.3f} {new / old:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
