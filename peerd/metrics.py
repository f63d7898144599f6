"""Prometheus metrics of one peer: one registry per Peer object (never module globals).

Names follow Prometheus conventions: ``peerd_`` prefix, base units as suffixes, ``_total`` counters.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["PeerMetrics"]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class _ProcessCollector(Collector):
    """Resident memory and CPU time of this process, read on each scrape (works for many peers per process)."""

    def collect(self):  # type: ignore[no-untyped-def]
        import psutil

        proc = psutil.Process(os.getpid())
        mem = GaugeMetricFamily("peerd_process_resident_memory_bytes", "Resident set size of the daemon process")
        mem.add_metric([], float(proc.memory_info().rss))
        cpu = GaugeMetricFamily("peerd_process_cpu_seconds", "User+system CPU time of the daemon process")
        times = proc.cpu_times()
        cpu.add_metric([], float(times.user + times.system))
        yield mem
        yield cpu


class PeerMetrics:
    """All series a peer exports; handlers call the small helpers below."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("peerd_requests", "RPC requests by rpc and outcome", ["rpc", "outcome"], registry=r)
        self.request_latency = Histogram(
            "peerd_request_duration_seconds", "RPC latency", ["rpc"], buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.step_latency = Histogram(
            "peerd_inference_step_duration_seconds",
            "Server time of one inference step (read to reply)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter("peerd_tokens_processed", "Tokens through the hosted blocks", ["phase"], registry=r)
        self.errors = Counter("peerd_errors", "Protocol errors sent, by code", ["code"], registry=r)
        self.sessions_active = Gauge("peerd_sessions_active", "Open inference sessions", registry=r)
        self.cache_used = Gauge("peerd_kv_cache_used_bytes", "KV cache bytes reserved by sessions", registry=r)
        self.cache_limit = Gauge("peerd_kv_cache_limit_bytes", "KV cache budget", registry=r)
        self.blocks_start = Gauge("peerd_hosted_block_start", "First hosted block", registry=r)
        self.blocks_end = Gauge("peerd_hosted_block_end", "One past the last hosted block", registry=r)
        self.blocks_hosted = Gauge("peerd_hosted_blocks", "Number of hosted blocks", registry=r)
        self.throughput = Gauge(
            "peerd_throughput_tokens_per_second", "Measured per-block throughput", ["phase"], registry=r
        )
        self.dht_peers = Gauge("peerd_dht_known_peers", "Peers in this node's DHT routing table", registry=r)
        self.bytes_in = Counter("peerd_network_received_bytes", "Frame bytes received", registry=r)
        self.bytes_out = Counter("peerd_network_sent_bytes", "Frame bytes sent", registry=r)
        self.moves = Counter("peerd_rebalance_moves", "Times this peer moved to other blocks", registry=r)
        self.start_time = Gauge("peerd_start_time_seconds", "Unix time the daemon started", registry=r)
        self.start_time.set(time.time())
        r.register(_ProcessCollector())
