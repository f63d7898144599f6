"""A real Prometheus scrapes a swarm of real `peerd run` processes configured from deploy/prometheus.yml;
after some generations its API shows the peerd series with the right values, and every PromQL
expression of the Grafana dashboard evaluates against it and returns data."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.client import SwarmClient
from peerd.rpc.errors import PeerError
from peerd.rpc.transport import PeerClient
from protocols import ErrorCode
from tests.helpers.observability import ROOT, Prometheus, RunningPeer, http_swarm, prometheus_config_for, wait_until
from tests.helpers.tiny_model import make_tiny_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus (.ci/run installs it)"),
]

SPANS = [(0, 2), (2, 4), (4, 6)]
GENERATIONS = [([1, 5, 9, 23, 42, 7], 6), ([3, 1, 4, 1, 5], 9), ([17, 2, 200, 31], 4)]  # (prompt, new tokens)
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "peerd-swarm.json"
# What Grafana substitutes before a query reaches Prometheus ($instance: the "All" regex).
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$__interval": "15s",
    "$instance": ".*",
    "$swarm": ".*",
    "$model": ".*",
}


@pytest.fixture(scope="module")
def scraped_swarm(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, list[str], list[RunningPeer], Prometheus]]:
    tmp = tmp_path_factory.mktemp("prom")
    ckpt = make_tiny_checkpoint(tmp / "tiny", num_layers=6)
    with http_swarm(ckpt, SPANS, tmp / "swarm") as (swarm, peers):
        targets = [f"127.0.0.1:{p.http_port}" for p in peers]
        prometheus = Prometheus(prometheus_config_for(targets), tmp / "prometheus")
        try:
            yield ckpt, swarm.initial_peers, peers, prometheus
        finally:
            prometheus.stop()


def instance(peer: RunningPeer) -> str:
    return f"127.0.0.1:{peer.http_port}"


async def test_prometheus_sees_the_tokens_the_swarm_generated(scraped_swarm) -> None:
    ckpt, initial_peers, peers, prom = scraped_swarm
    wait_until(
        lambda: len([t for t in prom.api("targets")["activeTargets"] if t["health"] == "up"]) == len(peers),
        60,
        "every peer target up",
    )
    client = await SwarmClient.connect(initial_peers, ckpt, model_id="tiny")
    try:
        await client.wait_for_route(timeout_s=60)
        generated = 0
        for prompt, n in GENERATIONS:
            result = await client.generate(prompt, max_new_tokens=n, stop_on_eos=False)
            assert len(result.token_ids) == n
            generated += len(result.token_ids)
        with pytest.raises(PeerError) as refused:  # one protocol error, counted by code on peer2
            await PeerClient(client.p2p, "not-this-model", timeout_s=10).info(peers[1].peer_id)
        assert refused.value.code is ErrorCode.WRONG_MODEL
    finally:
        await client.close()

    # Each generation feeds its prompt once (prefill) and every generated token but the last back
    # (decode), through every peer: tokens counted by each peer = tokens the client generated.
    prompt_tokens = sum(len(p) for p, _ in GENERATIONS)
    decode_tokens = generated - len(GENERATIONS)
    expected = {instance(p): float(decode_tokens) for p in peers}
    wait_until(
        lambda: (
            prom.by_instance('peerd_tokens_processed_total{phase="decode"}') == expected
            and prom.by_instance("peerd_sessions_active") == dict.fromkeys(expected, 0.0)
        ),
        60,
        "Prometheus scraped the finished generations",
    )
    assert prom.by_instance('peerd_tokens_processed_total{phase="prefill"}') == dict.fromkeys(expected, prompt_tokens)
    assert (
        prom.by_instance('sum by (instance) (peerd_inference_step_duration_seconds_count{phase="decode"})') == expected
    )
    assert prom.by_instance('peerd_requests_total{rpc="inference", outcome="ok"}') == dict.fromkeys(expected, 3.0)
    assert prom.by_instance('peerd_errors_total{code="wrong_model"}') == {
        instance(p): 1.0 if p is peers[1] else 0.0 for p in peers
    }
    assert prom.by_instance('peerd_requests_total{rpc="info", outcome="wrong_model"}') == {instance(peers[1]): 1.0}
    assert prom.by_instance("peerd_hosted_block_start") == {instance(p): float(p.blocks[0]) for p in peers}
    assert prom.by_instance("peerd_hosted_blocks") == dict.fromkeys(expected, 2.0)
    assert prom.by_instance("peerd_kv_cache_used_bytes") == dict.fromkeys(expected, 0.0)
    assert prom.by_instance('up{job="peerd"}') == dict.fromkeys(expected, 1.0)
    assert prom.by_instance('peerd_peer_state{state="online"}') == dict.fromkeys(expected, 1.0)
    assert prom.by_instance("peerd_swarm_blocks_uncovered") == dict.fromkeys(expected, 0.0)
    assert prom.by_instance('peerd_swarm_peers{state="online"}') == dict.fromkeys(expected, 3.0)
    names = {r["metric"]["name"]: r["metric"]["instance"] for r in prom.query("peerd_peer_info")}
    assert names == {p.name: instance(p) for p in peers}
    info_labels = [r["metric"] for r in prom.query("peerd_peer_info")]
    assert {(m["swarm"], m["deployment"], m["model"]) for m in info_labels} == {("public", "compose", "tiny")}
    for value in prom.by_instance("peerd_kv_cache_limit_bytes").values():
        assert value > 0
    for value in prom.by_instance("process_resident_memory_bytes").values():
        assert 50e6 < value < 8e9
    for value in prom.by_instance("peerd_network_received_bytes_total").values():
        assert value > 4 * 64 * (prompt_tokens + decode_tokens)  # float32 hidden states of width 64
    (p50,) = prom.query(
        'histogram_quantile(0.5, sum(rate(peerd_inference_step_duration_seconds_bucket{phase="decode"}[1m])) by (le))'
    )
    assert 0 < float(p50["value"][1]) < 5


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [q for p in dashboard["panels"] for q in (p, *p.get("panels", []))]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert not re.search(r"\$\w", expr), f"unsubstituted variable in {expr}"
    return expr


async def test_every_dashboard_query_evaluates_and_returns_data(scraped_swarm) -> None:
    _, _, peers, prom = scraped_swarm
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    # the test above generated a minute ago at most; make sure rate() windows have two samples
    wait_until(lambda: prom.query('count_over_time(up{job="peerd"}[1m]) >= 5'), 60, "a few scrapes")
    empty = []
    for title, expr in exprs:
        result = prom.query(substitute(expr))  # AssertionError with Prometheus' message if it is not valid PromQL
        if not result:
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # the dashboard's peer variable (label_values(peerd_peer_info, instance)) lists every peer
    values = prom.api("label/instance/values", **{"match[]": "peerd_peer_info"})
    assert sorted(values) == sorted(instance(p) for p in peers)
