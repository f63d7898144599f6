"""Request-level metrics of ``peerd api``, named and bucketed as vLLM's so its dashboards read them.

One registry per server object (tests run several in one process). Counters are exposed without
the ``*_created`` series (see ``peerd.server.metrics``), and the standard ``process_*`` collector
describes the process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import disable_created_metrics as _disable_created_metrics

__all__ = ["ApiMetrics"]

# seconds; fine at the low end, where a healthy swarm lives, and up to the minute a stalled one takes
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ApiMetrics:
    """Counters, gauges and histograms of one ``peerd api`` server, labelled by model."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        _disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide and idempotent: peerd never exposes *_created series
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)  # the standard process_* series
        r = self.registry
        self.requests = Counter(
            "peerd_api_requests", "Finished API requests by outcome", ["model", "endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("peerd_api_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("peerd_api_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.waiting = Gauge("peerd_api_requests_waiting", "Requests before their first token", ["model"], registry=r)
        self.running = Gauge("peerd_api_requests_running", "Requests generating tokens", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "peerd_api_time_to_first_token_seconds", "Request start to first token", ["model"],
            buckets=TTFT_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "peerd_api_inter_token_latency_seconds", "Time between consecutive tokens", ["model"],
            buckets=ITL_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "peerd_api_e2e_request_latency_seconds", "Request start to last token", ["model"],
            buckets=E2E_BUCKETS_S, registry=r,
        )  # fmt: skip
