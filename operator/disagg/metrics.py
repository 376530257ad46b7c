"""The operator's own Prometheus metrics, on one registry per process (no global default registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class OperatorMetrics:
    """Counters and histograms the operator exports on /metrics."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter("disagg_reconciles_total", "Reconciles by result", ["result"], registry=r)
        self.reconcile_seconds = Histogram(
            "disagg_reconcile_duration_seconds", "Duration of one reconcile", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.spec_change_seconds = Histogram(
            "disagg_spec_change_seconds",
            "From a new generation's watch event reaching the operator to the reconcile that takes it "
            "starting (stage=started) and to its children applied (stage=applied)", ["stage"], registry=r,
            # finer around the 1-s event-to-apply target
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8, 16),
        )
        self.api_requests = Counter("disagg_api_requests_total", "API requests by HTTP method", ["method"],
                                    registry=r)
        self.api_errors = Counter("disagg_api_errors_total", "Failed API requests by HTTP status", ["status"],
                                  registry=r)
        self.scaling_decisions = Counter(
            "disagg_scaling_decisions_total", "Autoscaling decisions that changed a pool", ["role", "direction"],
            registry=r,
        )
        self.autoscaler_ticks = Counter(
            "disagg_autoscaler_ticks_total", "Autoscaling ticks, by whether they queried Prometheus", ["queried"],
            registry=r,
        )
        self.prometheus_query_seconds = Histogram(
            "disagg_prometheus_query_duration_seconds", "Latency of one PromQL query", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.kv_transfer_ready = Gauge(
            "disagg_kv_transfer_ready",
            "1 while a service's decode workers receive their prompts' KV from prefill, 0 while they recompute "
            "prompts or KV transfers fail (from the engines' counters; absent without traffic)",
            ["namespace", "service"], registry=r,
        )
        self.prometheus_query_failures = Counter(
            "disagg_prometheus_query_failures_total", "PromQL queries that failed", registry=r
        )

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)
