"""The composition root: one `Operator` built from the settings, holding every part of the runtime.

kopf's layer (`disagg.runtime.handlers`) keeps it in its memo and calls `start`, `stop` and
`service_event`; nothing here imports kopf, so the whole wiring runs in tests without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from disagg.api.v1alpha1 import NetworkPolicyPeer
from disagg.catalog.accelerators import AcceleratorCatalog, load_catalog
from disagg.kube.client import CHILD_KINDS, Kube
from disagg.kube.connect import connect
from disagg.kube.events import EventPoster
from disagg.metrics import OperatorMetrics
from disagg.reconcile.run import Reconciler
from disagg.render import parse_scrapers
from disagg.render.context import DEFAULT_METRICS_SCRAPERS
from disagg.runtime.autoscaling import AutoscalerLoop, activity_check
from disagg.runtime.informers import ChildCache, ChildInformers
from disagg.runtime.pods import OperatorPods
from disagg.runtime.queue import ServiceLocks
from disagg.runtime.reconciles import Reconciles
from disagg.runtime.resync import Resync
from disagg.scaling.loop import Index
from disagg.settings import OperatorSettings

log = logging.getLogger("disagg")

Connect = Callable[[int, Callable[[str], None] | None], Kube]
"""(connections to keep open, called with each request's method or None) -> a client of the cluster."""


def spec_workers(settings: OperatorSettings) -> int:
    """Reconcile threads kept for spec changes, besides `settings.workers`."""
    return max(1, settings.workers // 4)


def apply_threads(settings: OperatorSettings) -> int:
    """Threads applying the children of the services being reconciled, concurrently."""
    return 2 * settings.workers


def scopes_of(settings: OperatorSettings) -> list[str | None]:
    """The namespaces watched, or [None] for all of them."""
    return list(settings.namespaces) or [None]


def scrapers_of(settings: OperatorSettings) -> tuple[NetworkPolicyPeer, ...]:
    """Who may scrape the engines of services that name no one."""
    if settings.metrics_scrapers is None:
        return DEFAULT_METRICS_SCRAPERS
    return parse_scrapers(settings.metrics_scrapers)


def cluster_of(settings: OperatorSettings) -> Connect:
    """API clients of the pod's ServiceAccount, or of the settings' kubeconfig."""

    def connect_to(connections: int, on_request: Callable[[str], None] | None) -> Kube:
        return connect(settings.kubeconfig, connections, on_request=on_request)

    return connect_to


@dataclass
class Operator:
    """Every part of a running operator, wired; threads run between `start` and `stop`."""

    settings: OperatorSettings
    catalog: AcceleratorCatalog
    events: EventPoster
    reconciles: Reconciles
    informers: ChildInformers
    autoscaling: AutoscalerLoop
    resync: Resync
    applier: ThreadPoolExecutor
    pods: OperatorPods

    @classmethod
    def build(cls, settings: OperatorSettings, metrics: OperatorMetrics, connect_to: Connect | None = None) -> Operator:
        """The operator of `settings`; `connect_to` makes its API clients (default: the settings' cluster)."""
        connect_to = connect_to or cluster_of(settings)
        catalog = load_catalog(settings.accelerator_catalog)
        # one connection per thread, so reconciles and their applies never queue for a socket
        kube = connect_to(settings.workers + spec_workers(settings) + apply_threads(settings) + 4,
                          lambda method: metrics.api_requests.labels(method=method).inc())
        scopes = scopes_of(settings)
        # one watch per child kind, the LeaderWorkerSets and the pods, per scope
        watch_kube = connect_to(len(scopes) * (len(CHILD_KINDS) + 2) + 2, None)
        events = EventPoster(kube, settings.identity or "disagg")
        index, locks = Index(), ServiceLocks()
        cache = ChildCache(len(scopes) * len(CHILD_KINDS))
        informers = ChildInformers(watch_kube, scopes, cache)
        applier = ThreadPoolExecutor(apply_threads(settings), thread_name_prefix="disagg-apply")  # threads start lazily
        reconciler = Reconciler(
            kube=kube, catalog=catalog, record_event=events.record, applier=applier,
            metrics_scrapers=scrapers_of(settings), live_children=cache.children,
            versioned_rollouts=settings.versioned_rollouts,
            lws_available=informers.lws_available, lws_reason=informers.lws_reason, lws_listed=informers.lws_listed,
        )
        reconciles = Reconciles(reconciler, index, locks, metrics, cache.synced, workers=settings.workers,
                                spec_workers=spec_workers(settings), status_delay_s=settings.status_delay_s)
        cache.on_deployment = reconciles.pool_event
        is_active = activity_check(settings, kube)
        autoscaling = AutoscalerLoop(settings, kube=kube, catalog=catalog, index=index, lock_for=locks,
                                     record_event=events.record, ready=cache.synced.is_set, is_active=is_active,
                                     metrics=metrics)
        resync = Resync(settings.resync_seconds, index.services.keys, reconciles.resync, is_active)
        pods = OperatorPods(watch_kube, scopes, events.record, is_active)
        return cls(settings, catalog, events, reconciles, informers, autoscaling, resync, applier, pods)

    def start(self) -> None:
        self.events.start()
        self.reconciles.start()
        self.autoscaling.start()
        self.resync.start()
        self.informers.start()
        self.pods.start()
        log.info("disagg operator started: %d accelerator types, %d workers, autoscaling %s",
                 len(self.catalog.names()), self.settings.workers,
                 f"from {self.settings.prometheus_url}" if self.autoscaling.source
                 else "without metrics (no --prometheus-url)")

    def stop(self) -> None:
        self.pods.stop()
        self.informers.stop()
        self.resync.stop()
        self.autoscaling.stop()
        self.reconciles.stop()
        self.applier.shutdown(wait=False, cancel_futures=True)
        self.events.stop()

    def service_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """An InferenceService's watch event (ADDED, MODIFIED, DELETED, or None for a listed one)."""
        self.reconciles.service_event(event_type, body)
