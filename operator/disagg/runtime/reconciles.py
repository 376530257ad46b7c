"""What starts a reconcile, and what the queue's workers do with it: a service's watch event or a pool's
change goes to the queue; a worker reconciles the newest version of the service known, under the
service's lock, and counts the outcome in the operator's metrics."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from disagg.metrics import OperatorMetrics
from disagg.reconcile.run import CONFLICT_RETRY_S, Outcome, Reconciler, reconcile_service
from disagg.runtime.queue import ReconcileQueue, ServiceLocks
from disagg.scaling.loop import Index, pool_counts, resource_version
from disagg.wellknown import SERVICE_LABEL

log = logging.getLogger("disagg")

ServiceKey = tuple[str, str]


def key_of(body: Mapping[str, Any]) -> ServiceKey:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def reference(namespace: str, name: str) -> dict[str, Any]:
    """The body of a trigger that carries no version of the service (the index has the newest)."""
    return {"metadata": {"namespace": namespace, "name": name}}


class Reconciles:
    """Turns events into queued reconciles of whole services, and runs them.

    Spec changes jump the queue; a status-only trigger (a pool's change, a resync, a conflict's retry)
    waits for the queue's status delay. The time from a new generation's watch event to the reconcile
    that applies it goes to the metrics."""

    def __init__(
        self, reconciler: Reconciler, index: Index, locks: ServiceLocks, metrics: OperatorMetrics,
        synced: threading.Event, *, workers: int, spec_workers: int, status_delay_s: float,
    ) -> None:
        self.reconciler = reconciler
        self.index = index
        self.locks = locks
        self.metrics = metrics
        self.synced = synced
        """Set once the children's cache has listed every scope: diffing against a cache still listing
        would re-apply what exists."""
        self.queue = ReconcileQueue(workers, self.run, spec_workers=spec_workers, status_delay_s=status_delay_s)
        self.spec_seen: dict[ServiceKey, tuple[int, float]] = {}
        """(generation, when its watch event arrived) of services whose new spec is not applied yet."""
        self._retries: set[ServiceKey] = set()
        self._retries_guard = threading.Lock()
        self.retry_after_s = CONFLICT_RETRY_S

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()

    def submit(self, body: Mapping[str, Any], trigger: str, priority: int = ReconcileQueue.STATUS) -> None:
        self.queue.submit(body, trigger, priority)

    def service_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of an InferenceService: the index takes it, and a reconcile is queued unless it
        is the echo of the operator's own status write."""
        key = key_of(body)
        meta = body.get("metadata") or {}
        if event_type == "DELETED":
            self.index.services.pop(key, None)
            self.spec_seen.pop(key, None)
            self.reconciler.forget(meta.get("uid"))
            return
        known = self.index.services.get(key)
        if known is not None and resource_version(known) == resource_version(body):
            return  # the echo of this operator's own status write: the index has it already
        spec_changed = known is None or (known.get("metadata") or {}).get("generation") != meta.get("generation")
        self.index.remember(dict(body))
        if spec_changed:
            self.spec_seen.setdefault(key, (int(meta.get("generation") or 0), time.monotonic()))
        priority = ReconcileQueue.SPEC if spec_changed else ReconcileQueue.STATUS
        self.submit(copy.deepcopy(dict(body)), "event", priority)

    def pool_event(self, event: str, pool: dict[str, Any]) -> None:
        """A pool's Deployment or LeaderWorkerSet changed: the autoscaler's counts follow, and status
        follows the pools (a pool changing readiness re-reconciles its service)."""
        meta = pool.get("metadata") or {}
        key = key_of(pool)
        if event == "DELETED":
            self.index.deployments.pop(key, None)
        else:
            self.index.deployments[key] = pool_counts(pool)
        if event == "LISTED":
            return  # the first listing: the services' own listing reconciles them already
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if service:
            self.submit(reference(key[0], service), "child")

    def resync(self, namespace: str, name: str) -> None:
        """A status reconcile of a service, whatever changed or not."""
        self.submit(reference(namespace, name), "child")

    def retry_later(self, namespace: str, name: str) -> None:
        """One more reconcile of a service whose children conflict, in a while (one pending at a time)."""
        with self._retries_guard:
            if (namespace, name) in self._retries:
                return
            self._retries.add((namespace, name))

        def fire() -> None:
            with self._retries_guard:
                self._retries.discard((namespace, name))
            self.submit(reference(namespace, name), "child")

        timer = threading.Timer(self.retry_after_s, fire)
        timer.daemon = True
        timer.start()

    def run(self, body: Mapping[str, Any], trigger: str) -> None:
        """One reconcile (on a queue worker): of the newest version of the service known."""
        obj = copy.deepcopy(dict(body))
        namespace, name = key_of(obj)
        started = time.monotonic()
        pending = self.spec_seen.get((namespace, name))
        self.synced.wait()
        with self.locks(namespace, name):
            # Act on the newest version known: an event's body goes stale while it waits for the lock
            # (another reconcile may have written status meanwhile); a child event carries none.
            fresh = self.index.services.get((namespace, name))
            if trigger == "child" and fresh is None:
                return
            if fresh is not None and resource_version(fresh) > resource_version(obj):
                obj = copy.deepcopy(fresh)
            try:
                outcome = reconcile_service(self.reconciler, obj)  # reports its own failures in status
                if outcome.status_object:
                    self.index.remember(outcome.status_object)
            finally:
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        self._account(obj, trigger, outcome, started, pending)

    def _account(
        self, obj: dict[str, Any], trigger: str, outcome: Outcome, started: float, pending: tuple[int, float] | None,
    ) -> None:
        """Metrics and the log line of one reconcile; a conflict's retry."""
        namespace, name = key_of(obj)
        if outcome.failed is not None:
            if outcome.failed_status is not None:
                self.metrics.reconciles.labels(result="api_error").inc()
                self.metrics.api_errors.labels(status=str(outcome.failed_status)).inc()
            else:
                self.metrics.reconciles.labels(result="error").inc()
            return
        generation = int((obj.get("metadata") or {}).get("generation") or 0)
        if pending is not None and generation >= pending[0] and self.spec_seen.get((namespace, name)) == pending:
            del self.spec_seen[(namespace, name)]
            self.metrics.spec_change_seconds.labels(stage="started").observe(started - pending[1])
            self.metrics.spec_change_seconds.labels(stage="applied").observe(time.monotonic() - pending[1])
        if outcome.conflicts:
            self.retry_later(namespace, name)
        result = "invalid" if outcome.invalid else ("changed" if outcome.applied or outcome.deleted else "unchanged")
        self.metrics.reconciles.labels(result=result).inc()
        if outcome.applied or outcome.deleted or outcome.status_written:
            applied = ", ".join(f"{kind}/{child}" for _, kind, child in outcome.applied)
            log.info("reconciled %s/%s (%s): applied %d%s, deleted %d, status %s", namespace, name, trigger,
                     len(outcome.applied), f" ({applied})" if 0 < len(outcome.applied) < 4 else "",
                     len(outcome.deleted), "written" if outcome.status_written else "same")

