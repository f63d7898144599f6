"""`make bench-spot-checks`: what default spot checks cost, side by side with checks off.

Starts real `peerd run` processes serving the default model on 127.0.0.1 in one of two layouts:
``demo`` (3 peers with disjoint spans, as `make demo`: nobody else serves a span's blocks, so a
check finds no second opinion) and ``replicated`` (2 peers serving every block: every peer's first
answer in a session is recomputed on the other). One client then generates greedily with the
default rate (first answer of each peer per session, then 2% of steps) and with checks off
(``spot_check_rate=0``), alternating runs so that machine drift hits both alike. We report medians
of tokens/s, their ratio, the number of checks and the share of a generation's time spent in
checks (timed within each run: on a busy machine the ratio of two runs is mostly noise), print them
and write them as JSON.

    python tools/bench_spot_checks.py [--layout demo replicated] [--tokens N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peerd.cli.demo import LocalSwarm, split_blocks  # noqa: E402
from peerd.client import SwarmClient  # noqa: E402
from peerd.config import DEFAULT_SPOT_CHECK_RATE  # noqa: E402
from peerd.model.config import ModelConfig  # noqa: E402
from peerd.model.registry import resolve_model  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."
LAYOUTS = {"demo": 3, "replicated": 2}


def _spans(layout: str, num_blocks: int) -> list[tuple[int, int]]:
    if layout == "demo":
        return split_blocks(num_blocks, LAYOUTS[layout])
    return [(0, num_blocks)] * LAYOUTS[layout]


async def _generate(swarm: LocalSwarm, model: str, rate: float, tokens: int) -> tuple[float, int, float]:
    """tokens/s of one greedy generation (a fresh client, as the CLI makes), the checks it ran, and
    the share of its time spent in them (timed in the same run: robust to a busy machine's drift)."""
    client = await SwarmClient.connect(swarm.initial_peers, model, spot_check_rate=rate)
    try:
        await client.wait_for_route(timeout_s=60)
        ids = client.chat_ids([{"role": "user", "content": PROMPT}])
        checks, in_checks_s = 0, 0.0
        verify = client.checker.verify

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal checks, in_checks_s
            checks += 1
            started = time.perf_counter()
            try:
                return await verify(*args, **kwargs)
            finally:
                in_checks_s += time.perf_counter() - started

        client.checker.verify = counted  # type: ignore[method-assign]
        started = time.perf_counter()
        result = await client.generate(ids, max_new_tokens=tokens, stop_on_eos=False)
        elapsed = time.perf_counter() - started
        return len(result.token_ids) / elapsed, checks, in_checks_s / elapsed
    finally:
        await client.close()


async def _bench_layout(layout: str, model: str, tokens: int, rounds: int) -> dict[str, Any]:
    num_blocks = ModelConfig.from_pretrained(resolve_model(model, None)).num_layers
    with LocalSwarm(model) as swarm:
        swarm.start_bootstrap()
        procs = [
            swarm.start_peer(f"peer{i}", span, ["--torch-threads", "1"])  # measured claims, as `make demo`
            for i, span in enumerate(_spans(layout, num_blocks))
        ]
        swarm.wait_ready(procs, timeout_s=300)
        await _generate(swarm, model, 0.0, 4)  # warm-up: first connections, caches
        runs: dict[str, list[float]] = {"default": [], "off": []}
        checks: dict[str, list[int]] = {"default": [], "off": []}
        share: list[float] = []
        for _ in range(rounds):
            for name, rate in (("default", DEFAULT_SPOT_CHECK_RATE), ("off", 0.0)):
                tps, n, in_checks = await _generate(swarm, model, rate, tokens)
                runs[name].append(tps)
                checks[name].append(n)
                if name == "default":
                    share.append(in_checks)
    default, off = statistics.median(runs["default"]), statistics.median(runs["off"])
    return {
        "layout": layout,
        "peers": LAYOUTS[layout],
        "tokens": tokens,
        "rounds": rounds,
        "tokens_per_s_default": default,
        "tokens_per_s_off": off,
        "ratio_default_to_off": default / off,
        "checks_per_generation_default": statistics.median(checks["default"]),
        "time_share_in_checks_default": statistics.median(share),
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layout", nargs="+", choices=sorted(LAYOUTS), default=["demo", "replicated"])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench_spot_checks.json")
    args = parser.parse_args()
    results = [asyncio.run(_bench_layout(layout, args.model, args.tokens, args.rounds)) for layout in args.layout]
    head = f"{'LAYOUT':<12} {'PEERS':>5} {'DEFAULT TOK/S':>14} {'OFF TOK/S':>10} {'RATIO':>6} {'CHECKS/GEN':>10}"
    print(f"{head} {'TIME IN CHECKS':>14}")
    for r in results:
        print(
            f"{r['layout']:<12} {r['peers']:>5} {r['tokens_per_s_default']:>14.2f} {r['tokens_per_s_off']:>10.2f} "
            f"{r['ratio_default_to_off']:>6.2f} {r['checks_per_generation_default']:>10} "
            f"{r['time_share_in_checks_default']:>13.1%}"
        )
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
