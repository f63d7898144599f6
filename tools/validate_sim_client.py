"""A generating client for tools/validate_sim.py, run inside a client namespace (``ip netns exec``).

It keeps ``--sessions`` greedy generations in flight for ``--duration`` seconds (a closed loop: a new
seeded prompt as soon as one ends) and prints JSON lines on stdout, times as ``time.time()``:

* ``ready``: a full route was found (the loop starts);
* ``request``: one generation: ``prompt``, ``tokens`` (the output ids, for the reference check),
  ``t0``/``t1``, ``token_t`` (the arrival time of every token), ``stalls_s`` (the SDK's failover
  stalls), ``route`` ([peer id, start, end] per hop of the final route) or ``error`` (type: message) when it failed;
* ``placement`` (every ``--monitor-period`` s, when > 0): the DHT's online records, ``peers`` as
  ``[name, start, end]``.

Logs go to stderr. The orchestrator compares tokens with the local model, so nothing here needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


async def generation_loop(client: Any, args: argparse.Namespace, lane: int, stop_at: float) -> None:
    rng = random.Random(args.seed * 1000 + lane)
    while time.time() < stop_at:
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(3, 9))]
        token_t: list[float] = []
        t0 = time.time()
        try:
            result = await asyncio.wait_for(
                client.generate(
                    prompt,
                    max_new_tokens=args.tokens,
                    stop_on_eos=False,
                    on_token=lambda _, ts=token_t: ts.append(time.time()),
                ),
                args.request_timeout,
            )
        except Exception as exc:  # reported, never hidden: the orchestrator counts it as failed
            emit(
                "request",
                lane=lane,
                prompt=prompt,
                t0=t0,
                t1=time.time(),
                token_t=token_t,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        emit(
            "request",
            lane=lane,
            prompt=prompt,
            tokens=list(result.token_ids),
            t0=t0,
            t1=time.time(),
            token_t=token_t,
            stalls_s=list(result.stalls_s),
            route=[[s.peer_id, s.start, s.end] for s in result.route],
        )


async def monitor(client: Any, period: float, stop_at: float) -> None:
    while time.time() < stop_at:
        try:
            records = await client.servers(refresh=True)
            peers = [[r.public_name, r.start, r.end] for r in records.values()]
            emit("placement", peers=sorted(peers))
        except Exception as exc:  # a DHT read that timed out: the next one counts
            print(f"monitor: {type(exc).__name__}: {exc}", file=sys.stderr)
        await asyncio.sleep(period)


async def run(args: argparse.Namespace) -> None:
    from peerd.client import Speculation, SwarmClient

    client = await SwarmClient.connect(args.initial_peers, Path(args.ckpt), model_id=args.model_id)
    try:
        client.speculation = Speculation(max_draft_tokens=0)  # one token per step, as the simulator has
        await client.wait_for_route(timeout_s=args.route_timeout)
        emit("ready")
        stop_at = time.time() + args.duration
        tasks = [generation_loop(client, args, lane, stop_at) for lane in range(args.sessions)]
        if args.monitor_period > 0:
            tasks.append(monitor(client, args.monitor_period, stop_at))
        await asyncio.gather(*tasks)
    finally:
        await asyncio.wait_for(client.close(), 30.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--model-id", default="tiny")
    parser.add_argument("--sessions", type=int, default=2, help="generations kept in flight")
    parser.add_argument("--duration", type=float, required=True, help="seconds to keep starting generations")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--monitor-period", type=float, default=0.0)
    parser.add_argument("--route-timeout", type=float, default=180.0)
    parser.add_argument("--request-timeout", type=float, default=240.0)
    args = parser.parse_args()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
