"""Cost-fair compute: an honest client's decode keeps its pace while others send the largest forwards.

The flood is the worst a peer accepts: forwards of 4 x 2048 tokens (its max batch tokens), 8 in
flight from each of 3 identities, all against the peer the honest client's route must use. Counting
jobs instead of their cost, each of the honest client's steps waited behind three whole forwards
(hundreds of times its unloaded latency); weighted by tokens x blocks and done in chunks, a step
waits for at most the chunk that is running.
"""

from __future__ import annotations

import time

from peerd.model.local import LocalModel
from tests.integration.test_security import _poll, _start_flooder, _stop_flooder, _time_per_token

FLOOD_SHAPE = (4, 2048, 3)  # batch, tokens, identities
LATENCY_FACTOR = 3.0  # issue 19's target for honest decode latency under this flood


async def test_decode_keeps_its_pace_under_a_max_size_forward_flood_from_three_identities(
    make_swarm, local_model: LocalModel
) -> None:
    swarm = await make_swarm([(0, 3), (3, 6)], max_session_length=2048, max_batch_tokens=8192)
    target = swarm.peers[0]
    served = target.metrics.requests.labels(rpc="forward", outcome="ok")
    good = await swarm.client()
    try:
        await _time_per_token(good, local_model)  # warm-up: streams, RTT probes, info checks
        unloaded = min([await _time_per_token(good, local_model) for _ in range(2)])
        flooder = await _start_flooder(swarm.initial_peers[0], target.peer_id, 8, *FLOOD_SHAPE)
        try:
            # the flood is on: its forwards wait on the compute thread and at least one was served
            await _poll(lambda: target.runtime.queued >= 3, "the flood queued on the compute thread", 60)
            await _poll(lambda: served._value.get() >= 1, "a flood forward served", 120)
            before = served._value.get()
            started = time.monotonic()
            loaded_runs = []
            for _ in range(2):  # the best of two, as for the unloaded pace: one run can meet a noisy moment
                loaded_runs.append(await _time_per_token(good, local_model))
                # the flood kept the compute thread busy the whole time the honest client decoded
                assert target.runtime.queued >= 3
            loaded = min(loaded_runs)
            decode_s = time.monotonic() - started
            flood_served = served._value.get() - before
        finally:
            codes = await _stop_flooder(flooder)
        print(
            f"time per token: unloaded {unloaded * 1e3:.1f} ms, under a 3-identity max-size flood "
            f"{loaded * 1e3:.1f} ms ({loaded / unloaded:.2f}x); {flood_served} flood forwards served "
            f"in those {decode_s:.1f} s; codes {codes}"
        )
        assert loaded <= LATENCY_FACTOR * unloaded, f"{loaded / unloaded:.2f}x slower under the flood"
    finally:
        await good.close()
