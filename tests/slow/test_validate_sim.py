"""The simulator against a real swarm, short: tools/validate_sim.py with 6 peers for one minute.

Six `peerd run` processes (tiny model, 8 blocks, automatic placement) in network namespaces with
`tc tbf` uplinks and delay shims, two clients generating, a seeded crash (SIGKILL, link down), a
graceful leave (SIGTERM) and a join; then the simulator on the same scenario. Checks real
behaviour: every generation either equals the local model's output or was reported as failed,
the DHT's placement covers every block after the kills, and the simulator agrees on that
coverage. Needs root, iproute2 and nftables; skipped otherwise. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.netinet import list_namespaces, missing_requirements
from tests.helpers.tiny_model import make_tiny_checkpoint
from tools.validate_sim import Scenario, draw, run_real
from tools.validate_sim_report import compare, reference_outputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(missing_requirements() is not None, reason=f"netinet: {missing_requirements()}"),
]


def test_real_swarm_and_simulator_agree_on_coverage_under_kills_and_joins(tmp_path: Path) -> None:
    sc = draw(Scenario(peers=6, joins=1, crashes=1, leaves=1, num_blocks=8, duration_s=60.0, rebalance_period_s=30.0))
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", num_layers=sc.num_blocks)
    try:
        real = run_real(sc, tmp_path, ckpt, prefix="v18t")
    finally:
        assert not list_namespaces("v18t-"), "namespaces left behind"
    result = compare(sc, real, reference_outputs(ckpt, real["events"], sc.tokens))
    got, sim = result["real"], result["sim"]
    print({k: got[k] for k in ("requests", "completed", "failed", "tokens_per_s", "failovers", "coverage_final")})
    print({k: sim[k] for k in ("requests", "completed", "failed", "tokens_per_s", "failovers", "coverage_final")})

    assert [e["kind"] for e in got["schedule"]] == [kind for _, kind, _ in sc.events]
    requests = [e for e in real["events"] if e["event"] == "request"]
    assert requests and got["completed"] > 0
    for e in requests:  # every generation is either right or reported (never a silent wrong answer)
        assert ("tokens" in e) != ("error" in e)
    assert got["wrong_output"] == 0
    assert got["failed"] <= got["requests"] // 4, got["errors"]
    # after the crash, the leave and the join, what the DHT shows covers every block, as in the simulator
    assert got["snapshots"] >= 5
    assert min(got["coverage_final"]) >= 1, got["coverage_timeline"]
    assert min(sim["coverage_final"]) >= 1 and min(sim["coverage_first"]) >= 1
    assert (min(got["coverage_final"]) >= 1) == (min(sim["coverage_final"]) >= 1)
