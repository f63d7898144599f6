"""Where a decode hop's time goes, and what the same bytes cost on a bare libp2p stream.

Two measurements, interleaved in one run so machine drift hits both alike:

* a traced hop: an inference session on one peer (``PeerClient.open_inference`` and
  ``InferenceStream.step``, the SDK's own stream API), with a :class:`HopTracer` attached to the
  client and to the peer's servicer, so each decode step is split into spans (client encode, write,
  transit, server check, queue wait, compute, hand-back, reply encode, write, transit, decode);
* a raw echo: the same request frame's bytes written to a stream of the same kind (libp2p through
  p2pd, the same two daemons where possible) and read back, with nothing else done.

The peer's half of the trace is only visible when the peer runs in this process (``servicer``).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from peerd.rpc.hoptrace import SPANS, HopTracer
from peerd.rpc.tensors import to_wire
from peerd.rpc.transport import PeerClient
from peerd.server.handlers import BlockServicer
from peerd.server.runtime import INLINE_MAX_COST
from protocols import InferenceStep, encode_frame

__all__ = ["ECHO_HANDLER", "echo_rtts_ms", "hop_breakdown", "serve_echo"]

ECHO_HANDLER = "peerd-bench-echo"  # a benchmark-only stream handler (never registered by `peerd run`)
PROMPT_TOKENS = 16
_TIMEOUT_S = 30.0


async def _echo(_: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo fixed-size messages: a 4-byte size first, then that many bytes back per message."""
    try:
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), _TIMEOUT_S), "big")
        while True:
            data = await asyncio.wait_for(reader.readexactly(size), _TIMEOUT_S)
            writer.write(data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        pass  # the benchmark closed its end
    finally:
        writer.close()


async def serve_echo(p2p: P2P) -> None:
    """Register the echo handler on ``p2p`` (a benchmark's own process or in-process peer)."""
    await p2p.add_binary_stream_handler(ECHO_HANDLER, _echo)


async def echo_rtts_ms(peers: PeerClient, peer_id: str, payload: bytes, rounds: int) -> list[float]:
    """Round trips (ms) of ``payload`` to ``peer_id``'s echo handler over one stream."""
    await peers.dial(peer_id)
    _, reader, writer = await peers.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), ECHO_HANDLER)
    rtts = []
    try:
        async with asyncio.timeout(_TIMEOUT_S + rounds):
            writer.write(len(payload).to_bytes(4, "big"))
            for _ in range(rounds):
                started = time.perf_counter()
                writer.write(payload)
                await writer.drain()
                await reader.readexactly(len(payload))
                rtts.append((time.perf_counter() - started) * 1e3)
    finally:
        writer.close()
    return rtts


def step_frame(hidden_size: int, dtype: torch.dtype = torch.float32) -> bytes:
    """The bytes of one decode step's request frame (what the echo sends)."""
    return encode_frame(InferenceStep(to_wire(torch.zeros(1, 1, hidden_size, dtype=dtype)), PROMPT_TOKENS, 1))


async def _traced_steps(
    peers: PeerClient, peer_id: str, span: tuple[int, int], hidden_size: int, steps: int, dtype: torch.dtype
) -> None:
    """One session on ``peer_id``: a short prefill, then ``steps`` decode steps of random hidden states."""
    stream = await peers.open_inference(
        peer_id, session_id=os.urandom(16), start=span[0], end=span[1], max_length=PROMPT_TOKENS + steps, batch_size=1
    )
    try:
        await stream.step(torch.randn(1, PROMPT_TOKENS, hidden_size, dtype=dtype), 0)
        for i in range(steps):
            await stream.step(torch.randn(1, 1, hidden_size, dtype=dtype), PROMPT_TOKENS + i)
    finally:
        await stream.close()


async def hop_breakdown(
    peers: PeerClient,
    servicer: BlockServicer,
    peer_id: str,
    span: tuple[int, int],
    *,
    steps: int = 16,
    rounds: int = 4,
    modes: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Traced decode hops to an in-process peer and raw echoes to the same peer, interleaved.

    ``peers`` is the client's transport, ``servicer`` the peer's (both in this process), and the
    peer must serve ``ECHO_HANDLER`` (:func:`serve_echo` on its P2P). ``modes`` names settings of
    the peer runtime's ``inline_max_cost`` to compare (default: the runtime's own, as "default");
    each round runs every mode in turn. Per mode: each span's p50 (ms), the hop's wall and
    non-compute p50, the echo p50 (the echoes of its rounds) and their ratio, and every traced hop.
    """
    runtime = servicer.runtime
    modes = modes or {"default": runtime.inline_max_cost}
    hidden_size, dtype = servicer.stage.config.hidden_size, servicer.stage.dtype
    payload = step_frame(hidden_size, dtype)
    hops: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    echoes: dict[str, list[float]] = {mode: [] for mode in modes}
    await _traced_steps(peers, peer_id, span, hidden_size, 2, dtype)  # warm-up: dial, caches, first-call costs
    await echo_rtts_ms(peers, peer_id, payload, 4)
    saved = runtime.inline_max_cost
    try:
        for _ in range(rounds):
            for mode, inline_max_cost in modes.items():
                runtime.inline_max_cost = inline_max_cost
                tracer = HopTracer()
                peers.tracer = servicer.tracer = tracer
                try:
                    await _traced_steps(peers, peer_id, span, hidden_size, steps, dtype)
                finally:
                    peers.tracer = servicer.tracer = None
                hops[mode] += tracer.hops()[1:]  # decode steps only: the first is the prefill
                echoes[mode] += await echo_rtts_ms(peers, peer_id, payload, steps)
    finally:
        runtime.inline_max_cost = saved
    return {mode: _summary(hops[mode], echoes[mode], len(payload)) for mode in modes}


def _summary(hops: list[dict[str, float]], echoes: list[float], frame_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {name: statistics.median(h[name] for h in hops) for name, _, _ in SPANS}
    out |= {
        "wall_ms_p50": statistics.median(h["wall"] for h in hops),
        "overhead_ms_p50": statistics.median(h["wall"] - h["compute"] for h in hops),
        "echo_ms_p50": statistics.median(echoes),
        "frame_bytes": frame_bytes,
        "hops": hops,
    }
    out["overhead_vs_echo"] = out["overhead_ms_p50"] / out["echo_ms_p50"]
    # the typical path without the hops that lost the CPU somewhere: on a shared box a hop longer than
    # a scheduler slice is often preempted in one of its spans, which moves the p50 of the whole
    out["span_p50_sum_ms"] = sum(out[name] for name, _, _ in SPANS if name != "compute")
    return out


def breakdown_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Table rows: each span's p50 per mode side by side, then each mode's overhead against the echo."""
    modes = list(results)
    rows = [(f"  {name}", " / ".join(f"{results[m][name]:.3f}" for m in modes), "ms p50") for name, _, _ in SPANS]
    rows.append(("  hop wall", " / ".join(f"{results[m]['wall_ms_p50']:.3f}" for m in modes), "ms p50"))
    for mode, r in results.items():
        rows.append(
            (
                f"hop overhead / raw echo ({mode})",
                f"{r['overhead_vs_echo']:.2f}x",
                f"{r['overhead_ms_p50']:.3f} vs {r['echo_ms_p50']:.3f} ms p50, {len(r['hops'])} hops, same frame "
                f"({r['frame_bytes']} B) on the same streams; target <= 1.5x",
            )
        )
        rows.append(
            (
                f"  non-compute span p50s, summed ({mode})",
                f"{r['span_p50_sum_ms'] / r['echo_ms_p50']:.2f}x",
                f"{r['span_p50_sum_ms']:.3f} ms vs the echo",
            )
        )
    return rows


async def inprocess_breakdown(
    model_path: Path, model_id: str, span: tuple[int, int], workdir: Path, *, steps: int = 16, rounds: int = 4
) -> dict[str, dict[str, Any]]:
    """:func:`hop_breakdown` against a peer started in this process (one torch thread) for ``span``:
    decode steps on the compute thread ("thread") and inline when it is idle ("inline"), alternated."""
    from peerd.client import SwarmClient
    from peerd.config import PeerConfig
    from peerd.daemon.peer import Peer

    config = PeerConfig(
        model_path=model_path,
        model_id=model_id,
        blocks=span,
        identity_path=workdir / "hops-peer.key",
        public_name="hops",
        host="127.0.0.1",
        torch_threads=1,
        measure_throughput=False,
    )
    peer = Peer(config)
    await peer.startup()
    try:
        assert peer.p2p is not None and peer.servicer is not None  # set by startup()
        await serve_echo(peer.p2p)
        maddrs = [str(m) for m in await peer.visible_maddrs()]
        client = await SwarmClient.connect(maddrs, model_path, model_id=model_id)
        try:
            client.peers.learn_addresses(peer.peer_id, maddrs)
            modes = {"thread": 0.0, "inline": INLINE_MAX_COST}
            servicer = peer.servicer
            return await hop_breakdown(
                client.peers, servicer, peer.peer_id, span, steps=steps, rounds=rounds, modes=modes
            )
        finally:
            await client.close()
    finally:
        await peer.shutdown()
