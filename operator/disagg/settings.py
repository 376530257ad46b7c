"""Operator settings: every knob in one frozen object, from flags (and env), passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OperatorSettings:
    """How `disagg run` behaves."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty means all (cluster-wide)."""
    accelerator_catalog: str | None = None
    """A YAML file of accelerator entries merged over the built-in catalogue."""
    resync_seconds: float = 300.0
    """Periodic full reconcile of every service (level-triggered safety net)."""
    status_delay_s: float = 3.0
    """Status-only reconciles (child events, resync) start this long after their first trigger;
    the triggers meanwhile fold into them (spec changes never wait)."""
    listen_host: str = "0.0.0.0"
    """Host of the liveness and metrics endpoints."""
    liveness_port: int = 8080
    metrics_port: int = 9100
    workers: int = 16
    """Threads for the synchronous Kubernetes client calls."""
    peering: str | None = None
    """kopf peering name for active/standby high availability; None = standalone."""
    priority: int = 0
    """Peering priority; replicas need distinct ones (the highest live one acts)."""
    identity: str = ""
    """This process's peering identity."""
    kubeconfig: str | None = None
    prometheus_url: str | None = None
    """Prometheus base URL for autoscaling; autoscaling is off without it."""
    prometheus_token_file: str | None = None
    prometheus_ca_file: str | None = None
    prometheus_timeout_s: float = 5.0
    # The autoscaling defaults are the policy settings bench/autoscale.py measures (PolicySettings, with a
    # 15-s scrape of the engines and rates over the 30 s between a window's first and last sample): the
    # policy's smoothing is tuned to them. A 5-s tick measured worse, not better (Azure code hour on
    # h100-h200: 98.90 % attainment; Azure conversation 1.32x the accelerator-hours), and so did a 5-s
    # scrape (Azure code: 2.36x; docs/capacity-and-simulation.md, "Scrape interval").
    # tests/unit/test_settings.py keeps the flags, the chart and the policy in step.
    autoscale_tick_s: float = 15.0
    scale_down_window_s: float = 1200.0
    """A pool scales down only to the highest count recommended within this window."""
    metrics_staleness_s: float = 90.0
    """Signals older than this count as missing: the autoscaler holds."""
    prometheus_rate_window: str = "45s"
    """rate() window of the operator's PromQL. Prometheus takes the samples inside it, so its rates span
    the window less one scrape interval: 45 s at a 15-s scrape hold three samples 30 s apart (with 30 s
    they would span 15 s: the Azure code hour fell from 99.14 % to 96.6 % in the simulation)."""
    scrape_interval_s: float = 15.0
    """How often Prometheus scrapes the engines (the chart's PodMonitor uses the same value)."""
    metrics_scrapers: str | None = None
    """JSON list of NetworkPolicy peers that may scrape the engines' HTTP port, for services that name
    none (None: disagg.render's default, Prometheus pods in the namespace `monitoring`)."""
    versioned_rollouts: bool = True
    """A change of the engines' revision comes up beside the serving pools and the routers switch when it is
    ready (reconcile/rollout.py); False (`--rollouts in-place`): every change rolls the pools in place, and
    while it does the routers pair workers of both revisions."""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def signal_window_s(self) -> float:
        """The span the rate window's samples cover: what the policy's signals average over."""
        from disagg.scaling.signals import prometheus_duration_seconds

        return prometheus_duration_seconds(self.prometheus_rate_window) - self.scrape_interval_s
