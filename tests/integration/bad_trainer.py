"""A malicious trainer in its own process (as it would be on its own machine): poisons averaging rounds.

    python -m tests.integration.bad_trainer INITIAL_PEERS CKPT RUN SIZE WINDOW_S TIMEOUT_S

Joins run RUN with an adapter of SIZE zeros and takes part in two rounds through the ordinary
averaging code, pushing first an update full of NaN, then one of norm ~1e6. Prints "ready
<peer id>" once it serves the run's streams, then waits for its stdin to close before leaving.
"""

from __future__ import annotations

import asyncio
import sys

import torch

from peerd.client import SwarmClient
from peerd.client.averaging import Averager, AveragingConfig

POISON = (torch.tensor(float("nan")), torch.tensor(1e6))


async def main(initial_peers: str, ckpt: str, run: str, size: int, window_s: float, timeout_s: float) -> None:
    client = await SwarmClient.connect(initial_peers.split(","), ckpt, model_id="tiny")
    config = AveragingConfig(run=run, group_window_s=window_s, round_timeout_s=timeout_s)
    averager = await Averager.create(client.p2p, client.dht, config, torch.zeros(size))
    print(f"ready {averager.peer_id}", flush=True)
    for poison in POISON:
        await averager.average(averager.base + poison * torch.ones(size), weight=1e9)  # and claims many samples
    await asyncio.to_thread(sys.stdin.read)
    await averager.close()
    await client.close()


if __name__ == "__main__":
    peers, ckpt, run, size, window_s, timeout_s = sys.argv[1:7]
    asyncio.run(main(peers, ckpt, run, int(size), float(window_s), float(timeout_s)))
