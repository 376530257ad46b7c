"""The autoscaler's loop as the operator runs it: its Prometheus source, its policy settings, whether
this replica of a peering group is the active one, and the thread that ticks it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.kube.client import Kube
from disagg.kube.events import EventRecorder
from disagg.kube.peering import PeeringCheck
from disagg.metrics import OperatorMetrics
from disagg.reconcile.victims import VictimMarker
from disagg.scaling.loop import Autoscaler, AutoscalerThread, Index
from disagg.scaling.policy import PolicySettings
from disagg.scaling.prometheus import PrometheusSource
from disagg.scaling.signals import QuerySet
from disagg.settings import OperatorSettings


def prometheus_source(settings: OperatorSettings, metrics: OperatorMetrics) -> PrometheusSource | None:
    """Where the signals come from (None without --prometheus-url: the autoscaler then holds)."""
    if not settings.prometheus_url:
        return None

    def observe(seconds: float, succeeded: bool) -> None:
        metrics.prometheus_query_seconds.observe(seconds)
        if not succeeded:
            metrics.prometheus_query_failures.inc()

    return PrometheusSource(
        url=settings.prometheus_url,
        token_file=settings.prometheus_token_file,
        ca_file=settings.prometheus_ca_file,
        timeout_s=settings.prometheus_timeout_s,
        queries=QuerySet(window=settings.prometheus_rate_window),
        on_query=observe,
    )


def policy_settings(settings: OperatorSettings) -> PolicySettings:
    return PolicySettings(
        tick_s=settings.autoscale_tick_s,
        scale_down_window_s=settings.scale_down_window_s,
        staleness_s=settings.metrics_staleness_s,
        # latency right after the pool size changed mixes two sizes for one rate window
        signal_window_s=settings.signal_window_s,
    )


def activity_check(settings: OperatorSettings, kube: Kube) -> Callable[[], bool]:
    """Whether this replica acts: always when standalone, else while no live peer outranks it."""
    if settings.peering is None:
        return lambda: True
    return PeeringCheck(
        kube=kube,
        name=settings.peering,
        identity=settings.identity,
        priority=settings.priority,
        namespace=settings.namespaces[0] if settings.namespaces else None,
    ).is_active


class AutoscalerLoop:
    """One `Autoscaler` for every service of the operator, ticked every `--autoscale-tick` seconds."""

    def __init__(
        self, settings: OperatorSettings, *, kube: Kube, catalog: AcceleratorCatalog, index: Index,
        lock_for: Callable[[str, str], threading.Lock], record_event: EventRecorder, ready: Callable[[], bool],
        is_active: Callable[[], bool], metrics: OperatorMetrics,
    ) -> None:
        self.source = prometheus_source(settings, metrics)
        self.autoscaler = Autoscaler(
            kube=kube,
            catalog=catalog,
            source=self.source,
            settings=policy_settings(settings),
            record_event=record_event,
            index=index,
            scrape_interval_s=settings.scrape_interval_s,
            lock_for=lock_for,
            ready=ready,
            is_active=is_active,
            victims=VictimMarker(kube, self.source.query) if self.source is not None else None,
            on_scale=lambda role, direction: metrics.scaling_decisions.labels(role=role, direction=direction).inc(),
            on_kv_path=lambda namespace, name, ok: metrics.kv_transfer_ready.labels(namespace, name).set(int(ok)),
        )
        self.thread = AutoscalerThread(
            self.autoscaler, settings.autoscale_tick_s,
            on_tick=lambda queried: metrics.autoscaler_ticks.labels(queried=str(queried).lower()).inc(),
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()
