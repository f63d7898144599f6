"""A swarm client for tests/slow/test_nat_swarm.py, run as a process inside a NATed namespace.

The test cannot run the client in its own process: the client must sit behind an emulated home
router, so it lives in that router's LAN namespace (``ip netns exec``). It talks to the test
through JSON lines on stdout, one object per line with an ``event`` key:

* ``route``: the full route ``wait_for_route`` found (after every ``--expect`` peer is online);
* ``token``: ``i`` (1-based) and ``token`` for every generated token;
* ``paused``: after token ``--pause-after`` it prints the session's live route, then blocks the
  generation on one line from stdin, so the test can kill a peer of that route at a known point;
* ``result``: ``tokens``, ``stalls_s``, the final ``route``, ``connections`` (per route peer,
  the remote addresses of the client's open libp2p connections) and ``paths`` (per peer, how the
  client's last stream went: "direct" or "relay <relay id>", peerd's relay);
* ``forwards`` (with ``--forwards N``, instead of generating): per forward hop, the peer that
  served it and the seconds it took, the client's observed throughput per peer, ``paths``, the
  largest absolute difference of any output from the local stage's (float32), and per known peer
  its published ``uplinks`` (bytes/s) and the ``codecs`` the client's compression picks for it;
* ``error``: ``type`` and ``message`` when anything failed (exit status 1).

A span is described as ``{peer_id, name, start, end, reach, addrs}`` (``reach`` and ``addrs`` from
the peer's DHT record; None or [] where the record has no such field). Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def describe(route: Any) -> list[dict[str, Any]]:
    spans = []
    for span in route:
        record = span.record
        reach = getattr(record, "reach", None)
        spans.append(
            {
                "peer_id": span.peer_id,
                "name": record.public_name,
                "start": span.start,
                "end": span.end,
                "reach": getattr(reach, "value", reach),  # an enum or a plain string
                "addrs": [str(a) for a in getattr(record, "addrs", ()) or ()],
            }
        )
    return spans


async def connections(client: Any, peer_ids: list[str]) -> dict[str, list[str]]:
    """Remote addresses of the client's open connections to each of ``peer_ids``."""
    found: dict[str, list[str]] = {pid: [] for pid in peer_ids}
    for info in await asyncio.wait_for(client.p2p.list_peers(), 10.0):
        pid = info.peer_id.to_base58()
        if pid in found:
            found[pid].extend(str(a) for a in info.addrs)
    return found


async def wait_for_peers(client: Any, peer_ids: set[str], timeout_s: float) -> None:
    """Until every id in ``peer_ids`` has an online record (failover needs the replica known)."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = peer_ids - set(await client.servers(refresh=True))
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"peers {sorted(missing)} not online after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)


async def forward_batches(client: Any, args: argparse.Namespace) -> None:
    """``--forwards`` stateless forward passes of a [batch, seq] batch; which peer served each hop."""
    import torch

    served: list[dict[str, Any]] = []
    forward = client.peers.forward

    async def recording_forward(peer_id: str, hidden: Any, start: int, end: int, *a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        out = await forward(peer_id, hidden, start, end, *a, **kw)
        served.append({"peer_id": peer_id, "start": start, "end": end, "s": time.perf_counter() - started})
        return out

    client.peers.forward = recording_forward
    from peerd.model.loading import load_stage

    hidden = torch.randn(args.batch, args.seq, client.config.hidden_size, generator=torch.Generator().manual_seed(0))
    end = client.config.num_layers if args.end is None else args.end
    with torch.no_grad():
        expected = load_stage(args.ckpt, args.start, end, dtype=torch.float32).forward(hidden)
    max_diff = 0.0
    for _ in range(args.forwards):
        out = await client.forward_hidden(hidden, args.start, args.end)
        max_diff = max(max_diff, float((out - expected).abs().max()))
    from peerd.client.compression import hop_compression

    records = client.router.known_records()
    emit(
        "forwards",
        served=served,
        observed_tps=dict(client.router.observed_tps),
        paths=dict(client.peers.paths),
        max_abs_diff=max_diff,
        uplinks={pid: r.uplink_bytes_per_s for pid, r in records.items()},
        codecs={pid: hop_compression(client.compression, r).value for pid, r in records.items()},
    )


async def run(args: argparse.Namespace) -> None:
    from peerd.client import SwarmClient
    from peerd.client.compression import parse_compression

    client = await SwarmClient.connect(
        args.initial_peers,
        Path(args.ckpt),
        model_id=args.model_id,
        allowed_peers=args.allow or None,
        compression=parse_compression(args.compression),
    )
    try:
        if args.forwards:  # a part of the model only: no full route needed
            await wait_for_peers(client, set(args.expect), args.route_timeout)
            await forward_batches(client, args)
            return
        route = await client.wait_for_route(timeout_s=args.route_timeout)
        if args.expect:
            await wait_for_peers(client, set(args.expect), args.route_timeout)
            route = await client.wait_for_route(timeout_s=args.route_timeout)
        emit("route", route=describe(route))

        # Keep a handle on the session generate() opens, to report its live route at the pause.
        sessions: list[Any] = []
        open_session = client.inference_session

        def recording_session(*a: Any, **kw: Any) -> Any:
            session = open_session(*a, **kw)
            sessions.append(session)
            return session

        client.inference_session = recording_session  # type: ignore[method-assign]
        count = 0

        def on_token(token: int) -> None:
            nonlocal count
            count += 1
            emit("token", i=count, token=token)
            if count == args.pause_after:
                emit("paused", i=count, route=describe(sessions[-1].route))
                if not sys.stdin.readline():  # blocks the event loop on purpose: nothing moves
                    raise RuntimeError("stdin closed while paused")

        prompt = [int(t) for t in args.prompt.split(",")]
        result = await client.generate(prompt, max_new_tokens=args.tokens, stop_on_eos=False, on_token=on_token)
        emit(
            "result",
            tokens=list(result.token_ids),
            stalls_s=list(result.stalls_s),
            tokens_per_s=result.tokens_per_s,
            route=describe(result.route),
            connections=await connections(client, [s.peer_id for s in result.route]),
            paths=dict(client.peers.paths),
        )
    finally:
        await asyncio.wait_for(client.close(), 30.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--model-id", default="tiny")
    parser.add_argument("--prompt", required=True, help="comma-separated token ids")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--pause-after", type=int, default=0, help="pause after this token (0: never)")
    parser.add_argument("--allow", nargs="*", default=[], help="route only through these peer ids")
    parser.add_argument("--expect", nargs="*", default=[], help="peer ids that must be online before generating")
    parser.add_argument("--route-timeout", type=float, default=60.0)
    parser.add_argument("--forwards", type=int, default=0, help="run this many forward batches instead of generating")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--compression", default="none", help="wire compression of hidden states (none, blockwise8, auto)"
    )
    parser.add_argument("--start", type=int, default=0, help="--forwards: first block")
    parser.add_argument("--end", type=int, default=None, help="--forwards: one past the last block")
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except Exception as exc:
        traceback.print_exc()
        emit("error", type=type(exc).__name__, message=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
