"""A discrete-event swarm simulator that runs the real placement and routing functions.

``peerd simulate`` builds a swarm of N simulated peers (heterogeneous speed, memory, uplink and
location), lets them join, place themselves, rebalance and leave (some crash) while clients open
generation sessions and forward batches, and measures throughput against a central optimiser's
bound, failures, stalls, block moves and DHT traffic. Placement decisions come from
``peerd.daemon.placement`` and routes from ``peerd.client.routing``: imported, never copied, so
the simulator measures the code the daemon and the SDK run. Nothing here touches the network,
torch or hivemind; a run is deterministic for a seed. See docs/scale.md.
"""

from __future__ import annotations

from peerd.sim.config import SCENARIOS, SimConfig
from peerd.sim.engine import SimResult, Simulation

__all__ = ["SCENARIOS", "SimConfig", "SimResult", "Simulation"]
