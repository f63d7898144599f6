"""Prometheus metrics of one peer: one registry per Peer object (never module globals).

Names follow Prometheus conventions: ``peerd_`` prefix, base units as suffixes (``_seconds``,
``_bytes``), ``_total`` on counters (prometheus-client appends it), no ``*_created`` series, and the
standard ``process_*`` series for the process. Label sets that are known in
advance (rpcs, token phases, error codes) are created at zero, so a dashboard query over a quiet
peer returns 0 rather than nothing. docs/operating.md lists every series.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from protocols import ErrorCode

__all__ = ["RPCS", "STEP_PHASES", "TOKEN_PHASES", "PeerMetrics"]

RPCS = ("info", "forward", "backward", "inference")
TOKEN_PHASES = ("prefill", "decode", "forward", "backward")
STEP_PHASES = ("prefill", "decode")  # a decode step is one token per sequence: its latency is per-token latency
PEER_STATES = ("offline", "joining", "online")
REACH_MODES = ("direct", "relayed", "unknown")

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
# inference requests last a whole session (seconds to minutes), so they get longer buckets
_REQUEST_BUCKETS_S = (*_LATENCY_BUCKETS_S, 60, 120, 300, 600)


class _ProcessCollector(Collector):
    """The standard ``process_*`` series (what stock dashboards and alerts expect), read on each scrape.

    prometheus-client's own ProcessCollector reads /proc (Linux only); this one uses psutil, so
    macOS and Windows volunteers get the same series, and lives in the peer's registry. Several
    peers in one process (tests) report the same process, which is the truth.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process(os.getpid())

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        proc = self._process
        with proc.oneshot():
            memory = proc.memory_info()
            times = proc.cpu_times()
            threads = float(proc.num_threads())
            started = proc.create_time()
            fds = float(proc.num_fds()) if hasattr(proc, "num_fds") else None
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", value=memory.rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=memory.vms)
        yield CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", value=times.user + times.system
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", value=started
        )
        yield GaugeMetricFamily("process_threads", "Number of OS threads in the process.", value=threads)
        if fds is not None:
            yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=fds)


class PeerMetrics:
    """All series one peer exports. Handlers update them through the attributes and helpers below;
    values that are cheaper to read than to track (state, DHT size, swarm view) are set at scrape
    time by ``peerd.daemon.routes``."""

    def __init__(self) -> None:
        # no *_created series: they double every counter's series and no dashboard reads them
        # (process-wide and idempotent; `peerd api` does the same)
        _disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- requests --------------------------------------------------------------------------
        self.requests = Counter("peerd_requests", "RPC requests by rpc and outcome", ["rpc", "outcome"], registry=r)
        self.request_latency = Histogram(
            "peerd_request_duration_seconds",
            "RPC latency from stream open to answer (inference: the whole session)",
            ["rpc"],
            buckets=_REQUEST_BUCKETS_S,
            registry=r,
        )
        self.step_latency = Histogram(
            "peerd_inference_step_duration_seconds",
            "Server time of one inference step, read to reply; phase=decode is the per-token latency",
            ["phase"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "peerd_tokens_processed", "Tokens (x batch) through the hosted blocks, by phase", ["phase"], registry=r
        )
        self.errors = Counter(
            "peerd_errors", "Protocol errors answered to clients, by code name (e.g. cache_full)", ["code"], registry=r
        )
        self.bytes_in = Counter(
            "peerd_network_received_bytes", "Protocol frame bytes received by the RPC handlers", registry=r
        )
        self.bytes_out = Counter(
            "peerd_network_sent_bytes", "Protocol frame bytes sent by the RPC handlers", registry=r
        )
        # --- sessions and cache ----------------------------------------------------------------
        self.sessions_active = Gauge("peerd_sessions_active", "Open inference sessions", registry=r)
        self.sessions_opened = Counter("peerd_sessions_opened", "Inference sessions admitted", registry=r)
        self.sessions_limit = Gauge("peerd_sessions_limit", "Most concurrent inference sessions", registry=r)
        self.cache_used = Gauge("peerd_kv_cache_used_bytes", "KV cache bytes reserved by sessions", registry=r)
        self.cache_limit = Gauge("peerd_kv_cache_limit_bytes", "KV cache budget", registry=r)
        # --- what this peer serves -------------------------------------------------------------
        self.blocks_start = Gauge("peerd_hosted_block_start", "First hosted block", registry=r)
        self.blocks_end = Gauge("peerd_hosted_block_end", "One past the last hosted block", registry=r)
        self.blocks_hosted = Gauge("peerd_hosted_blocks", "Number of hosted blocks", registry=r)
        self.weights = Gauge(
            "peerd_hosted_weights_bytes",
            "Bytes of the hosted blocks' weights as stored (quantised ones with their scales)",
            registry=r,
        )
        self.throughput = Gauge(
            "peerd_throughput_tokens_per_second", "Measured per-block throughput", ["phase"], registry=r
        )
        self.moves = Counter("peerd_rebalance_moves", "Times this peer moved to other blocks", registry=r)
        self.state = Gauge(
            "peerd_peer_state", "1 for the state this peer is in, 0 for the others", ["state"], registry=r
        )
        self.reach = Gauge(
            "peerd_reach",
            "1 for how others reach this peer (direct, relayed, unknown), 0 for the others",
            ["reach"],
            registry=r,
        )
        self.relay_bytes = Counter(
            "peerd_relay_bytes", "Bytes this peer relayed for peers behind NAT (both ways)", registry=r
        )
        self.queue_depth = Gauge(
            "peerd_compute_queue_depth", "Jobs waiting for the compute thread (steps, forwards, chunks)", registry=r
        )
        self.relay_streams = Gauge("peerd_relay_streams", "Streams this peer relays now", registry=r)
        self.relay_reservations = Gauge(
            "peerd_relay_reservations", "Peers behind NAT holding a reservation on this peer", registry=r
        )
        self.info = Info("peerd_peer", "Identity of this peer (value is always 1)", registry=r)
        self.start_time = Gauge("peerd_start_time_seconds", "Unix time the daemon started", registry=r)
        self.start_time.set(time.time())
        # --- the swarm as this peer's DHT node sees it -----------------------------------------
        self.dht_peers = Gauge("peerd_dht_known_peers", "Peers in this node's DHT routing table", registry=r)
        self.swarm_peers = Gauge(
            "peerd_swarm_peers", "Peers announcing this model in the DHT, by state", ["state"], registry=r
        )
        self.swarm_blocks = Gauge("peerd_swarm_blocks", "Transformer blocks of the model", registry=r)
        self.swarm_block_servers = Gauge(
            "peerd_swarm_block_servers", "Online peers serving each block (DHT view)", ["block"], registry=r
        )
        self.swarm_blocks_uncovered = Gauge(
            "peerd_swarm_blocks_uncovered", "Blocks no online peer serves (DHT view)", registry=r
        )
        r.register(_ProcessCollector())
        self._initialise_children()

    def _initialise_children(self) -> None:
        for rpc in RPCS:
            self.requests.labels(rpc=rpc, outcome="ok")
            self.request_latency.labels(rpc=rpc)
        # children of the per-step series, looked up once (``labels()`` costs microseconds per call)
        self.tokens_of = {phase: self.tokens.labels(phase=phase) for phase in TOKEN_PHASES}
        self.step_latency_of = {phase: self.step_latency.labels(phase=phase) for phase in STEP_PHASES}
        for code in ErrorCode:
            self.errors.labels(code=code.name.lower())
        for phase in ("decode", "prefill"):
            self.throughput.labels(phase=phase)
        self.set_state("offline")
        for state in PEER_STATES:
            self.swarm_peers.labels(state=state)

    # --- helpers the daemon calls ------------------------------------------------------------------

    def count_error(self, code: int) -> None:
        """One error answered with ``code``, labelled by its name (numbers we do not know: "unknown")."""
        try:
            name = ErrorCode(code).name.lower()
        except ValueError:
            name = "unknown"
        self.errors.labels(code=name).inc()

    def set_state(self, state: str) -> None:
        for s in PEER_STATES:
            self.state.labels(state=s).set(1.0 if s == state else 0.0)

    def set_reach(self, reach: str) -> None:
        for mode in REACH_MODES:
            self.reach.labels(reach=mode).set(1.0 if mode == reach else 0.0)

    def set_identity(self, **labels: str) -> None:
        """Labels of ``peerd_peer_info`` (peer id, name, model, version, device, dtype, quant)."""
        self.info.info({k: str(v) for k, v in labels.items()})

    def set_blocks(self, start: int, end: int) -> None:
        self.blocks_start.set(start)
        self.blocks_end.set(end)
        self.blocks_hosted.set(end - start)

    def set_throughput(self, decode_tokens_per_s: float, prefill_tokens_per_s: float) -> None:
        self.throughput.labels(phase="decode").set(decode_tokens_per_s)
        self.throughput.labels(phase="prefill").set(prefill_tokens_per_s)

    def set_swarm_view(self, num_blocks: int, peers: Sequence[Mapping[str, Any]], block_servers: Sequence[int]) -> None:
        """The swarm as last read from the DHT: peers by state and online servers per block."""
        self.swarm_blocks.set(num_blocks)
        for state in PEER_STATES:
            self.swarm_peers.labels(state=state).set(sum(1 for p in peers if p.get("state") == state))
        for block, servers in enumerate(block_servers):
            self.swarm_block_servers.labels(block=str(block)).set(servers)
        self.swarm_blocks_uncovered.set(sum(1 for s in block_servers if s == 0))
