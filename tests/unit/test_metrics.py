"""PeerMetrics: one registry per peer, Prometheus naming, helpers, zero-initialised label sets."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peerd.server.metrics import RPCS, TOKEN_PHASES, PeerMetrics
from protocols import ErrorCode


def samples(metrics: PeerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_two_peers_in_one_process_have_independent_series() -> None:
    a, b = PeerMetrics(), PeerMetrics()
    a.tokens.labels(phase="decode").inc(5)
    a.count_error(ErrorCode.CACHE_FULL)
    assert samples(a)[("peerd_tokens_processed_total", (("phase", "decode"),))] == 5
    assert samples(b)[("peerd_tokens_processed_total", (("phase", "decode"),))] == 0
    assert samples(a)[("peerd_errors_total", (("code", "cache_full"),))] == 1
    assert samples(b)[("peerd_errors_total", (("code", "cache_full"),))] == 0


def test_names_follow_prometheus_conventions() -> None:
    families = list(text_string_to_metric_families(generate_latest(PeerMetrics().registry).decode()))
    assert families
    names = {family.name for family in families}
    # the standard process collector's names, so stock dashboards and alerts find them
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "process_start_time_seconds"} <= names
    for family in families:
        assert family.name.startswith(("peerd_", "process_")), family.name
        assert not any(s.name.endswith("_created") for s in family.samples), family.name  # no creation series
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        for unit in ("seconds", "bytes"):
            if unit in family.name and family.type != "info":
                assert family.name.endswith((unit, f"{unit}_total", "per_second")), family.name


def test_known_label_sets_exist_at_zero_so_quiet_peers_still_answer_queries() -> None:
    s = samples(PeerMetrics())
    for rpc in RPCS:
        assert s[("peerd_requests_total", (("outcome", "ok"), ("rpc", rpc)))] == 0
        assert s[("peerd_request_duration_seconds_count", (("rpc", rpc),))] == 0
    for phase in TOKEN_PHASES:
        assert s[("peerd_tokens_processed_total", (("phase", phase),))] == 0
    assert sum(1 for name, _ in s if name == "peerd_errors_total") == len(ErrorCode)
    assert s[("peerd_peer_state", (("state", "offline"),))] == 1


def test_helpers_set_state_blocks_identity_and_swarm_view() -> None:
    m = PeerMetrics()
    m.set_state("online")
    m.set_blocks(4, 10)
    m.set_identity(peer_id="QmX", name="home", model="tiny")
    m.set_swarm_view(
        4,
        [{"state": "online"}, {"state": "online"}, {"state": "offline"}],
        [2, 1, 0, 1],
    )
    m.count_error(999)  # a code this version does not know is still counted
    s = samples(m)
    assert s[("peerd_peer_state", (("state", "online"),))] == 1
    assert s[("peerd_peer_state", (("state", "offline"),))] == 0
    assert (s[("peerd_hosted_block_start", ())], s[("peerd_hosted_block_end", ())]) == (4, 10)
    assert s[("peerd_hosted_blocks", ())] == 6
    assert s[("peerd_peer_info", (("model", "tiny"), ("name", "home"), ("peer_id", "QmX")))] == 1
    assert s[("peerd_swarm_peers", (("state", "online"),))] == 2
    assert s[("peerd_swarm_peers", (("state", "offline"),))] == 1
    assert [s[("peerd_swarm_block_servers", (("block", str(b)),))] for b in range(4)] == [2, 1, 0, 1]
    assert s[("peerd_swarm_blocks_uncovered", ())] == 1
    assert s[("peerd_errors_total", (("code", "unknown"),))] == 1
    assert s[("process_resident_memory_bytes", ())] > 0
    assert s[("process_cpu_seconds_total", ())] > 0
