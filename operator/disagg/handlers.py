"""Thin kopf adapters: turn watch events and timers into calls of the one reconcile function.

InferenceServices are handled with raw watch events (`on.event`) and a resync thread instead of
kopf's create/update handlers: reconcile is level-triggered, so it needs no diff base, and kopf then
keeps no state annotations on the objects - a steady operator writes nothing at all. The children are
watched by the operator's own list-and-watch threads (`ChildCache`), not by kopf.
"""

from __future__ import annotations

import contextvars
import copy
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from disagg import GROUP, PLURAL, VERSION
from disagg.catalog.accelerators import load_catalog
from disagg.kube.client import (
    AUTOSCALER_FIELD_MANAGER,
    CHILD_KINDS,
    FIELD_MANAGER,
    LEADER_WORKER_SET,
    Kind,
    Kube,
)
from disagg.kube.discovery import OptionalKind
from disagg.kube.peering import PeeringCheck
from disagg.kube.watch import KindWatch
from disagg.metrics import OperatorMetrics
from disagg.reconcile import POOL_KINDS, ChildKey, child_key, pack, unpack
from disagg.reconcile.run import CONFLICT_RETRY_S, Reconciler, reconcile_service
from disagg.reconcile.victims import VictimMarker
from disagg.render import parse_scrapers
from disagg.render.context import DEFAULT_METRICS_SCRAPERS, MANAGED_BY, SERVICE_LABEL
from disagg.scaling.loop import Autoscaler, AutoscalerThread, Index, pool_counts, resource_version
from disagg.scaling.policy import PolicySettings
from disagg.scaling.prometheus import PrometheusSource
from disagg.scaling.signals import QuerySet
from disagg.settings import OperatorSettings

log = logging.getLogger("disagg")


class ServiceLocks:
    """One lock per InferenceService: an event, a timer and a child event never reconcile it at once."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def __call__(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())


class ReconcileQueue:
    """Worker threads taking reconciles by priority: a spec change (`SPEC`) before status-only work
    (`STATUS`: child events, resyncs), so a user's edit is applied within moments even while thousands
    of Deployments roll out. A service is never reconciled twice at once and waits in the queue once:
    triggers that arrive while it waits or runs fold into that one entry or into one re-run at their
    best priority (a burst of child events costs two reconciles, not fifty); the reconcile reads the
    newest version of the service from the index when it runs. `spec_workers` more threads take spec
    changes only: with every other worker in a slow status reconcile (an API server busy with a mass
    rollout), an edit would otherwise wait for one of them to finish. Status-only work enters the
    queue `status_delay_s` after its first trigger: a rollout's many Deployment events fold into a
    reconcile or two, and the threads an edit needs are not busy with the same status over and over."""

    SPEC, STATUS = 0, 1

    def __init__(self, workers: int, run: Callable[[Mapping[str, Any], str], None], spec_workers: int = 0,
                 status_delay_s: float = 0.0) -> None:
        self._run = run
        self._status_delay_s = status_delay_s
        self._delayed: list[tuple[float, int, tuple[str, str], Mapping[str, Any], str]] = []
        """Status-only entries (a heap by due time), already counted as waiting in `_queued`."""
        self._due = threading.Condition()
        self._queue: queue.PriorityQueue[tuple[int, int, tuple[str, str], Mapping[str, Any], str]] = (
            queue.PriorityQueue())
        self._spec_queue: queue.PriorityQueue[tuple[int, int, tuple[str, str], Mapping[str, Any], str]] = (
            queue.PriorityQueue())
        """Spec changes again (also in `_queue`): whichever worker takes an entry first runs it."""
        self._queued: dict[tuple[str, str], int] = {}
        """Services waiting in the queue, at the priority of their entry."""
        self._rerun: dict[tuple[str, str], tuple[int, Mapping[str, Any], str]] = {}
        """Services being reconciled: None, or the trigger to run again when done."""
        self._running: set[tuple[str, str]] = set()
        self._guard = threading.Lock()
        self._order = itertools.count()
        self._stopped = False
        self._spec_workers = spec_workers
        self._threads = [threading.Thread(target=self._work, args=(self._queue,), name=f"disagg-reconcile-{i}",
                                          daemon=True) for i in range(workers)]
        self._threads += [threading.Thread(target=self._work, args=(self._spec_queue,), daemon=True,
                                           name=f"disagg-reconcile-spec-{i}") for i in range(spec_workers)]
        for thread in self._threads:
            thread.start()
        if status_delay_s > 0:
            threading.Thread(target=self._release_delayed, name="disagg-reconcile-delay", daemon=True).start()

    def submit(self, body: Mapping[str, Any], trigger: str, priority: int) -> None:
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._guard:
            if self._stopped:
                return
            if key in self._running:
                pending = self._rerun.get(key)
                if pending is None or priority <= pending[0]:
                    self._rerun[key] = (priority, body, trigger)
                return
            if self._queued.get(key, priority + 1) <= priority:
                return
            self._queued[key] = priority
        entry = (priority, next(self._order), key, body, trigger)
        if priority == self.STATUS and self._status_delay_s > 0:
            with self._due:
                heapq.heappush(self._delayed, (time.monotonic() + self._status_delay_s, *entry[1:]))
                self._due.notify()
            return
        self._queue.put(entry)
        if priority == self.SPEC and self._spec_workers:
            self._spec_queue.put(entry)

    def waiting(self) -> int:
        return self._queue.qsize() + len(self._delayed)

    def _release_delayed(self) -> None:
        """Moves status-only entries into the queue when due (a spec change that came meanwhile has
        taken their place in `_queued`: the workers then skip them)."""
        while True:
            with self._due:
                while not self._stopped and (not self._delayed or self._delayed[0][0] > time.monotonic()):
                    self._due.wait(self._delayed[0][0] - time.monotonic() if self._delayed else None)
                if self._stopped:
                    return
                _, order, key, body, trigger = heapq.heappop(self._delayed)
            self._queue.put((self.STATUS, order, key, body, trigger))

    def stop(self) -> None:
        with self._guard:
            self._stopped = True
        with self._due:
            self._due.notify()
        for _ in self._threads:
            self._queue.put((-1, next(self._order), ("", ""), {}, "stop"))
            self._spec_queue.put((-1, next(self._order), ("", ""), {}, "stop"))

    def _work(self, source: queue.PriorityQueue[tuple[int, int, tuple[str, str], Mapping[str, Any], str]]) -> None:
        while True:
            priority, _, key, body, trigger = source.get()
            if trigger == "stop":
                return
            with self._guard:
                if self._queued.get(key) != priority:
                    continue  # superseded by an entry of a better priority, which ran or runs
                del self._queued[key]
                self._running.add(key)
            try:
                self._run(body, trigger)
            except Exception:  # a worker outlives any one service's failure
                log.exception("reconcile of %s/%s failed", *key)
            finally:
                with self._guard:
                    self._running.discard(key)
                    again = self._rerun.pop(key, None)
            if again is not None:
                self.submit(again[1], again[2], again[0])


def spec_workers(settings: OperatorSettings) -> int:
    """Reconcile threads kept for spec changes, besides `settings.workers`."""
    return max(1, settings.workers // 4)


def apply_threads(settings: OperatorSettings) -> int:
    """Threads applying the children of the services being reconciled, concurrently."""
    return 2 * settings.workers


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf computes a diff base (a deep copy of the body) on every watch event, for create/update
    handlers; this operator has none (raw events only), and those copies were ~15 % of its
    CPU while 1,000 services were created."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class NoProgress(kopf.ProgressStorage):
    """No handler of this operator keeps progress (see NoDiffBase): nothing to read, write or strip."""

    def fetch(self, *, key: Any, body: kopf.Body) -> Any:
        return None

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


def make_api_client(settings: OperatorSettings, connections: int | None = None) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=settings.kubeconfig, client_configuration=configuration
        )
    # one connection per thread, so reconciles and their applies never queue for a socket
    configuration.connection_pool_maxsize = connections or (
        settings.workers + spec_workers(settings) + apply_threads(settings) + 4)
    return k8s.ApiClient(configuration)


def _event_recorder(obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    target = cast(kopf.Body, obj)  # kopf only reads apiVersion, kind and metadata from it
    if event_type == "Warning":
        kopf.warn(target, reason=reason, message=message)
    else:
        kopf.info(target, reason=reason, message=message)


def _claims_replicas(entry: Mapping[str, Any]) -> bool:
    return "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})


def slim_child(body: Mapping[str, Any], kind: Kind) -> dict[str, Any]:
    """What reconcile needs of a child, and no more (1,000 services hold ~13,000 of these)."""
    meta = body.get("metadata", {})
    slim_meta = {key: copy.deepcopy(meta[key]) for key in (
        "name", "namespace", "uid", "generation", "resourceVersion", "labels", "annotations",
        "ownerReferences", "deletionTimestamp") if key in meta}
    # only who owns replicas matters (see reconcile_service): the autoscaler's entry, and of the other
    # managers just their claim on spec.replicas; and whether the operator holds fields from a create
    slim_meta["managedFields"] = [
        copy.deepcopy(entry) if entry.get("manager") == AUTOSCALER_FIELD_MANAGER
        else {key: value for key, value in (
            ("manager", entry.get("manager")), ("operation", entry.get("operation")),
            ("fieldsV1", {"f:spec": {"f:replicas": {}}} if _claims_replicas(entry) else None)) if value is not None}
        for entry in meta.get("managedFields", []) or []
        if entry.get("manager") == AUTOSCALER_FIELD_MANAGER or _claims_replicas(entry)
        or (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (FIELD_MANAGER, "Update", None)
    ]
    slim: dict[str, Any] = {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": slim_meta}
    for key in ("spec", "rules", "roleRef", "subjects"):
        if key in body:
            slim[key] = copy.deepcopy(body[key])
    if kind.kind in POOL_KINDS and "status" in body:
        slim["status"] = copy.deepcopy(body["status"])
    return slim


class ChildCache:
    """Every service's children, slim and packed, as the operator's own list-and-watch threads
    (`disagg.kube.watch.KindWatch`, one per kind and namespace) last saw them; reconcile diffs against
    it and reads nothing from the API server. `synced` is set once every scope has been listed."""

    def __init__(self, scopes: int, on_deployment: Callable[[str, dict[str, Any]], None]) -> None:
        self._guard = threading.Lock()
        self._by_service: dict[tuple[str, str], dict[ChildKey, bytes]] = {}
        self._where: dict[tuple[str, str, str], tuple[tuple[str, str], ChildKey]] = {}
        """(plural, namespace, name) -> (the service's key, the child's key)."""
        self._scopes = scopes
        self._listed_scopes: set[tuple[str, str | None]] = set()
        self._listing: dict[tuple[str, str | None], set[tuple[str, str, str]]] = {}
        """Scopes whose listing is under way: what its pages had so far."""
        self.synced = threading.Event()
        self.on_deployment = on_deployment
        """Called with (LISTED | RELISTED | ADDED | MODIFIED | DELETED, the Deployment) after the cache
        has it."""

    def _drop(self, where: tuple[str, str, str]) -> None:
        found = self._where.pop(where, None)
        if found is not None:
            service, key = found
            children = self._by_service.get(service)
            if children is not None:
                children.pop(key, None)
                if not children:
                    del self._by_service[service]

    def _put(self, kind: Kind, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        where = (kind.plural, meta.get("namespace", ""), meta.get("name", ""))
        self._drop(where)
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if not service:
            return
        owner = (meta.get("namespace", ""), service)
        child = slim_child(obj, kind)
        key = child_key(child)
        # packed: 13,000 children as dicts took ~100 MiB at 1,000 services, packed ~15 MiB
        self._by_service.setdefault(owner, {})[key] = pack(child)
        self._where[where] = (owner, key)

    def listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        """One page of a scope's listing (kept page by page: a listing of thousands is never held
        whole); after the last, what the listing did not have is gone."""
        scope = (kind.plural, namespace)
        with self._guard:
            seen = self._listing.setdefault(scope, set())
            for obj in items:
                meta = obj.get("metadata", {})
                seen.add((kind.plural, meta.get("namespace", ""), meta.get("name", "")))
                self._put(kind, obj)
            first = scope not in self._listed_scopes
            if last:
                del self._listing[scope]
                stale = [w for w in self._where
                         if w[0] == kind.plural and (namespace is None or w[1] == namespace) and w not in seen]
                for where in stale:
                    self._drop(where)
                self._listed_scopes.add(scope)
                if len(self._listed_scopes) >= self._scopes:
                    self.synced.set()
        if kind.kind in POOL_KINDS:
            for obj in items:
                self.on_deployment("LISTED" if first else "RELISTED", obj)

    def changed(self, kind: Kind, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        with self._guard:
            if event == "DELETED":
                self._drop((kind.plural, meta.get("namespace", ""), meta.get("name", "")))
            else:
                self._put(kind, obj)
        if kind.kind in POOL_KINDS:
            self.on_deployment(event, obj)

    def expect(self, scopes: int) -> None:
        """Count more scopes before `synced` (kinds found at start-up)."""
        with self._guard:
            self._scopes += scopes

    def has_listed(self, kind: Kind, scopes: list[str | None]) -> bool:
        """Whether every scope of `kind` has been listed once (its objects are all in the cache)."""
        with self._guard:
            return all((kind.plural, scope) in self._listed_scopes for scope in scopes)

    def children(self, namespace: str, service: str) -> dict[ChildKey, dict[str, Any]]:
        with self._guard:
            packed = list((self._by_service.get((namespace, service)) or {}).items())
        return {key: unpack(value) for key, value in packed}


def build_registry(settings: OperatorSettings, metrics: OperatorMetrics) -> kopf.OperatorRegistry:
    """All handlers of the operator, bound to its settings (no module-level state)."""
    registry = kopf.OperatorRegistry()
    locks = ServiceLocks()
    catalog = load_catalog(settings.accelerator_catalog)
    scrapers = DEFAULT_METRICS_SCRAPERS if settings.metrics_scrapers is None else parse_scrapers(
        settings.metrics_scrapers)
    state: dict[str, Reconciler] = {}
    index = Index()
    threads: list[AutoscalerThread] = []
    kopf_context: list[contextvars.Context] = []
    applier = ThreadPoolExecutor(apply_threads(settings), thread_name_prefix="disagg-apply")  # threads start lazily

    def record_from_thread(obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        """kopf posts Events only from its own context (its handlers); the autoscaler's thread borrows
        the context of a handler that ran (kopf.warn there raised LookupError and aborted the tick)."""
        if not kopf_context:
            log.info("Event %s %s not posted (no handler has run yet): %s", event_type, reason, message)
            return
        kopf_context[0].copy().run(_event_recorder, obj, event_type, reason, message)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # in a pod: its ServiceAccount token; elsewhere: $KUBECONFIG (kopf's pure-Python readers)
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.INFO
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.persistence.progress_storage = NoProgress()
        # kopf logs "Handler ... succeeded" for every watch event: ~30,000 lines for 1,000 new services
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        settings.execution.max_workers = disagg_settings.workers
        # No limit on kopf's per-object workers (it watches only the services, whose handlers just
        # queue work). Should kopf indexes ever come back: with a limit below the objects of one kind,
        # kopf's start-up hangs for good (each object's worker waits for all to be indexed; kopf#1243).
        settings.queueing.worker_limit = None
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 10
        settings.networking.request_timeout = 60
        if disagg_settings.peering is None:
            settings.peering.standalone = True
        else:
            settings.peering.name = disagg_settings.peering
            settings.peering.mandatory = True
            settings.peering.clusterwide = not disagg_settings.namespaces
            settings.peering.priority = disagg_settings.priority
            # a dead active replica is noticed within this many seconds (its entry expires)
            settings.peering.lifetime = 15
        state["reconciler"] = Reconciler(
            kube=Kube(
                make_api_client(disagg_settings), on_request=lambda m: metrics.api_requests.labels(method=m).inc()
            ),
            catalog=catalog,
            record_event=record_from_thread,
            applier=applier,
            metrics_scrapers=scrapers,
        )
        source = None
        if disagg_settings.prometheus_url:
            source = PrometheusSource(
                url=disagg_settings.prometheus_url,
                token_file=disagg_settings.prometheus_token_file,
                ca_file=disagg_settings.prometheus_ca_file,
                timeout_s=disagg_settings.prometheus_timeout_s,
                queries=QuerySet(window=disagg_settings.prometheus_rate_window),
                on_query=_observe_query,
            )
        autoscaler = Autoscaler(
            kube=state["reconciler"].kube,
            catalog=catalog,
            source=source,
            settings=PolicySettings(
                tick_s=disagg_settings.autoscale_tick_s,
                scale_down_window_s=disagg_settings.scale_down_window_s,
                staleness_s=disagg_settings.metrics_staleness_s,
                # latency right after the pool size changed mixes two sizes for one rate window
                signal_window_s=disagg_settings.signal_window_s,
            ),
            record_event=record_from_thread,
            index=index,
            scrape_interval_s=disagg_settings.scrape_interval_s,
            lock_for=locks,
            ready=lambda: children.synced.is_set(),
            victims=VictimMarker(state["reconciler"].kube, source.query) if source is not None else None,
            on_scale=lambda role, direction: metrics.scaling_decisions.labels(role=role, direction=direction).inc(),
            on_kv_path=lambda namespace, name, ok: metrics.kv_transfer_ready.labels(namespace, name).set(int(ok)),
        )
        if disagg_settings.peering is not None:
            autoscaler.is_active = PeeringCheck(
                kube=autoscaler.kube,
                name=disagg_settings.peering,
                identity=disagg_settings.identity,
                priority=disagg_settings.priority,
                namespace=None if not disagg_settings.namespaces else disagg_settings.namespaces[0],
            ).is_active
        thread = AutoscalerThread(
            autoscaler, disagg_settings.autoscale_tick_s,
            on_tick=lambda queried: metrics.autoscaler_ticks.labels(queried=str(queried).lower()).inc(),
        )
        thread.start()
        threads.append(thread)
        log.info("disagg operator configured: %d accelerator types, %d workers, autoscaling %s",
                 len(catalog.names()), disagg_settings.workers,
                 f"from {disagg_settings.prometheus_url}" if source else "without metrics (no --prometheus-url)")

    def _observe_query(seconds: float, succeeded: bool) -> None:
        metrics.prometheus_query_seconds.observe(seconds)
        if not succeeded:
            metrics.prometheus_query_failures.inc()

    @kopf.on.cleanup(registry=registry)
    def stop_autoscaler(**_: Any) -> None:
        for thread in threads:
            thread.stop()

    disagg_settings = settings

    spec_seen: dict[tuple[str, str], tuple[int, float]] = {}
    """(generation, when its watch event arrived) of services whose new spec is not applied yet."""

    def reconcile(body: Mapping[str, Any], trigger: str) -> None:
        obj = copy.deepcopy(dict(body))
        meta = obj.get("metadata", {})
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        reconciler = state["reconciler"]
        started = time.monotonic()
        pending = spec_seen.get((namespace, name))
        children.synced.wait()  # diffing against a cache still listing would re-apply what exists
        with locks(namespace, name):
            # Act on the newest version known: an event's body goes stale while it waits for the lock
            # (another reconcile may have written status meanwhile); a child event carries none.
            fresh = index.services.get((namespace, name))
            if trigger == "child" and fresh is None:
                return
            if fresh is not None and resource_version(fresh) > resource_version(obj):
                obj = copy.deepcopy(fresh)
            try:
                outcome = reconcile_service(reconciler, obj)  # reports its own failures in status
                if outcome.status_object:
                    index.remember(outcome.status_object)
            finally:
                metrics.reconcile_seconds.observe(time.monotonic() - started)
        if outcome.failed is not None:
            if outcome.failed_status is not None:
                metrics.reconciles.labels(result="api_error").inc()
                metrics.api_errors.labels(status=str(outcome.failed_status)).inc()
            else:
                metrics.reconciles.labels(result="error").inc()
            return
        generation = int((obj.get("metadata") or {}).get("generation") or 0)
        if pending is not None and generation >= pending[0] and spec_seen.get((namespace, name)) == pending:
            del spec_seen[(namespace, name)]
            metrics.spec_change_seconds.labels(stage="started").observe(started - pending[1])
            metrics.spec_change_seconds.labels(stage="applied").observe(time.monotonic() - pending[1])
        if outcome.conflicts:
            retry_later(namespace, name)
        result = "invalid" if outcome.invalid else ("changed" if outcome.applied or outcome.deleted else "unchanged")
        metrics.reconciles.labels(result=result).inc()
        if outcome.applied or outcome.deleted or outcome.status_written:
            log.info("reconciled %s/%s (%s): applied %d%s, deleted %d, status %s", namespace, name, trigger,
                     len(outcome.applied),
                     f" ({', '.join(f'{kind}/{child}' for _, kind, child in outcome.applied)})"
                     if 0 < len(outcome.applied) < 4 else "",
                     len(outcome.deleted), "written" if outcome.status_written else "same")

    retries: set[tuple[str, str]] = set()
    retries_guard = threading.Lock()

    def retry_later(namespace: str, name: str) -> None:
        """One more reconcile of a service whose children conflict, in a while (one pending at a time)."""
        with retries_guard:
            if (namespace, name) in retries:
                return
            retries.add((namespace, name))

        def fire() -> None:
            with retries_guard:
                retries.discard((namespace, name))
            submit({"metadata": {"namespace": namespace, "name": name}}, "child")

        timer = threading.Timer(CONFLICT_RETRY_S, fire)
        timer.daemon = True
        timer.start()

    def remember_context() -> None:
        if not kopf_context:  # a handler's context: lets other threads post Events through kopf
            kopf_context.append(contextvars.copy_context())

    # Handlers only update the caches and hand the reconcile to this pool: kopf's per-object workers
    # are never held up by a reconcile in progress.
    reconcile_queue = ReconcileQueue(settings.workers, reconcile, spec_workers=spec_workers(settings),
                                     status_delay_s=settings.status_delay_s)

    def submit(body: Mapping[str, Any], trigger: str, priority: int = ReconcileQueue.STATUS) -> None:
        reconcile_queue.submit(body, trigger, priority)

    @kopf.on.cleanup(registry=registry)
    def stop_reconciles(**_: Any) -> None:
        reconcile_queue.stop()
        applier.shutdown(wait=False, cancel_futures=True)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def on_service_event(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
        remember_context()
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if type == "DELETED":
            index.services.pop(key, None)
            spec_seen.pop(key, None)
            state["reconciler"].forget(meta.get("uid"))
            return
        known = index.services.get(key)
        if known is not None and resource_version(known) == resource_version(body):
            return  # the echo of this operator's own status write: the index has it already
        spec_changed = known is None or (known.get("metadata") or {}).get("generation") != meta.get("generation")
        index.remember(dict(body))
        if spec_changed:
            spec_seen.setdefault(key, (int(meta.get("generation") or 0), time.monotonic()))
        submit(copy.deepcopy(dict(body)), "event", ReconcileQueue.SPEC if spec_changed else ReconcileQueue.STATUS)

    # The periodic resync is one thread over the index, not a kopf timer: kopf timers put a finalizer
    # on every object (a write per object, and deletions that hang while no operator runs) and keep
    # one task per object.
    def resync_all(stop: threading.Event) -> None:
        while not stop.wait(disagg_settings.resync_seconds):
            if disagg_settings.peering is not None and threads and not threads[0].autoscaler.is_active():
                continue  # a standby replica: the active one resyncs
            for namespace, name in list(index.services):
                if stop.is_set():
                    return
                submit({"metadata": {"namespace": namespace, "name": name}}, "child")

    resync_stop = threading.Event()

    @kopf.on.startup(registry=registry)
    def start_resync(**_: Any) -> None:
        threading.Thread(target=resync_all, args=(resync_stop,), name="disagg-resync", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def stop_resync(**_: Any) -> None:
        resync_stop.set()

    def on_deployment(event: str, body: dict[str, Any]) -> None:
        # status follows the pools: a Deployment changing readiness re-reconciles its service
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event == "DELETED":
            index.deployments.pop(key, None)
        else:
            index.deployments[key] = pool_counts(body)
        if event == "LISTED":
            return  # the first listing: the services' own listing reconciles them already
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if service:
            submit({"metadata": {"namespace": meta.get("namespace"), "name": service}}, "child")

    scopes: list[str | None] = list(settings.namespaces) or [None]
    children = ChildCache(len(scopes) * len(CHILD_KINDS), on_deployment)
    watches: list[KindWatch] = []

    @kopf.on.startup(registry=registry)
    def start_child_watches(**_: Any) -> None:
        kube = Kube(make_api_client(disagg_settings, connections=len(scopes) * (len(CHILD_KINDS) + 1) + 2))
        reconciler = state["reconciler"]
        reconciler.live_children = children.children

        def watch_kind(kind: Kind) -> None:
            for namespace in scopes:
                watch = KindWatch(kube, kind, namespace, f"app.kubernetes.io/managed-by={MANAGED_BY}",
                                  children.listed, children.changed)
                watch.start()
                watches.append(watch)

        # LeaderWorkerSets only where their CRD is served (found now or by a later reconcile that needs
        # them); found now, the first reconciles wait for their listing too
        lws = OptionalKind(kube, LEADER_WORKER_SET, scopes, lambda: watch_kind(LEADER_WORKER_SET))
        reconciler.lws_available = lws.available
        reconciler.lws_reason = lambda: lws.reason
        reconciler.lws_listed = lambda: children.has_listed(LEADER_WORKER_SET, scopes)
        children.expect(len(scopes))
        if not lws.available():
            children.expect(-len(scopes))  # not watched (yet): the first reconciles do not wait for it
        for kind in CHILD_KINDS:
            watch_kind(kind)

    @kopf.on.cleanup(registry=registry)
    def stop_child_watches(**_: Any) -> None:
        for watch in watches:
            watch.stop.set()

    return registry
