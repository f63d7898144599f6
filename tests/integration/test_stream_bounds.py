"""Idle streams and half-sent frames (docs/security.md, "Streams, frames and connections"): an attacker
in its own process (tests/integration/stream_hog.py) holds all the streams, or all the half-received
frame bytes, it can get, and an honest client generating through the same peer is still served.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from peerd.model.local import LocalModel
from protocols import DEFAULT_MAX_FRAME_BYTES

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
NEW_TOKENS = 16
MAX_STREAMS = 128  # below the attack (3 ids x 400 streams), so the total cap and idle eviction are exercised
PER_PEER = 64
FD_BOUND = 2 * MAX_STREAMS + 64  # open streams, plus those being refused or evicted right now
MIB = 1 << 20


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _poll(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s:.0f}s"
        await asyncio.sleep(0.05)


def _watch_arrivals(gate: Any, owner: str) -> list[tuple[bool, bool]]:
    """(every slot taken when it arrived, admitted) for each new stream of ``owner`` from now on."""
    arrivals: list[tuple[bool, bool]] = []
    admit = gate.admit

    def watched(who: str, writer: Any) -> Any:
        full = gate.open >= gate.max_streams
        ticket = admit(who, writer)
        if who == owner:
            arrivals.append((full, ticket is not None))
        return ticket

    gate.admit = watched
    return arrivals


async def _hog(swarm: Any, *args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.stream_hog", swarm.initial_peers[0], swarm.peers[0].peer_id, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 180)
    assert line.strip() == b"ready", line
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> dict[str, int]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    out = await asyncio.wait_for(proc.stdout.read(), 60)
    await proc.wait()
    counts: dict[str, int] = json.loads(out.decode().strip().splitlines()[-1])
    return counts


async def test_1200_idle_streams_stay_under_the_caps_and_an_honest_client_is_served(
    make_swarm, local_model: LocalModel
) -> None:
    swarm = await make_swarm([(0, 6)], max_streams=MAX_STREAMS, max_streams_per_peer=PER_PEER)
    gate = swarm.peers[0].gate
    good = await swarm.client()
    expected = local_model.generate_greedy(PROMPT, NEW_TOKENS, eos_token_ids=[])
    assert (await good.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_on_eos=False)).token_ids == expected
    fds_before = _open_fds()
    proc = await _hog(swarm, "idle", "3", "400")
    try:
        await _poll(lambda: gate.open == MAX_STREAMS, "the attacker filled every stream slot")
        # one descriptor per open stream here (p2pd holds the connections): bounded by the cap, not by
        # the 1,200 streams of the attack. The attacker reopens every stream the peer closes, so streams
        # being refused or evicted hold theirs a moment longer; on a busy machine that moment is long,
        # so this waits for a sample at the bound (a leak would hold ~1,200 and never get there)
        await _poll(lambda: _open_fds() - fds_before <= FD_BOUND, f"open descriptors within {FD_BOUND}", 30)
        fds_full = _open_fds()
        assert max(len(mine) for mine in gate.tickets.values()) <= PER_PEER
        honest = _watch_arrivals(gate, str(good.p2p.peer_id))
        # a slot can be free for a moment (a stream the peer timed out, not yet reopened by the attacker):
        # generate until at least one of the honest client's streams arrived with every slot taken
        for _ in range(3):
            result = await good.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
            assert result.token_ids == expected
            if any(full for full, _ in honest):
                break
        assert honest and all(admitted for _, admitted in honest), honest
        # the honest client's streams that arrived at a full peer got in by closing an idle one
        assert any(full for full, _ in honest), f"no honest stream arrived at a full peer: {honest}"
    finally:
        counts = await _stop(proc)
    print(f"\nidle streams: attacker {counts}; peer: peak {gate.peak_open} open, {gate.refusals} refused, "
          f"{gate.evictions} evicted; fds {fds_before} -> {fds_full}")  # fmt: skip
    assert counts["opened"] >= 1200
    assert gate.peak_open <= MAX_STREAMS
    assert gate.refusals + gate.evictions >= MAX_STREAMS  # the surplus was turned away, again and again
    await _poll(lambda: gate.open == 0, "every stream closed after the attack")
    await good.close()


async def test_half_sent_large_frames_are_bounded_per_client(make_swarm, local_model: LocalModel) -> None:
    swarm = await make_swarm([(0, 6)])
    frames = swarm.peers[0].gate.frames
    good = await swarm.client()
    expected = local_model.generate_greedy(PROMPT, NEW_TOKENS, eos_token_ids=[])
    assert (await good.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_on_eos=False)).token_ids == expected
    rss_before = _rss_bytes()
    # 8 frames of the largest size, each sent half-way: 256 MiB would sit in the peer without the bound
    proc = await _hog(swarm, "frames", "8", str(DEFAULT_MAX_FRAME_BYTES))
    try:
        rss_held = _rss_bytes()
        assert frames.total <= frames.per_peer_bytes  # two whole frames' worth per client
        result = await good.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
        assert result.token_ids == expected  # decode steps are small frames: never refused
    finally:
        counts = await _stop(proc)
    growth_mib = (rss_held - rss_before) / MIB
    print(f"\nhalf-sent frames: attacker {counts}; peer held {frames.peak_total / MIB:.0f} MiB declared, "
          f"refused {frames.refusals}; RSS +{growth_mib:.0f} MiB")  # fmt: skip
    # all but two were refused from their header (the attacker sees its stream reset: p2pd resets a
    # stream closed while the attacker's bytes are still in flight, so the error frame may not arrive)
    assert frames.refusals >= 6 and counts.get("held", 0) <= 2
    assert frames.peak_total <= 2 * DEFAULT_MAX_FRAME_BYTES
    # the two admitted frames hold half their 64 MiB each; the bound the peer enforces is 128 MiB
    assert growth_mib <= 2 * DEFAULT_MAX_FRAME_BYTES / MIB
    await _poll(lambda: frames.total == 0, "the half frames released after the attacker left")
    await good.close()
