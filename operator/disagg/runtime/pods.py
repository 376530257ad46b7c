"""The operator's watch of its pods (the pools' and the routers'), one per scope, and what it does with them:
engines restarted in place are replaced by new pods (`disagg.reconcile.restarts`), and every router's worker
list is checked against the pods every few seconds and when a worker's pod is deleted: leaving workers and those
no pod is behind any more are removed through the router's API (`disagg.reconcile.router_workers`), and a router
with no healthy worker of a role shows in the service's RouterWorkers condition."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from disagg.engines import ROUTER_METRICS_PORT
from disagg.engines.sglang import BOOTSTRAP_PORT_ANNOTATION
from disagg.kube.client import INFERENCE_SERVICE, POD, ApiError, Kind, Kube
from disagg.kube.events import EventRecorder
from disagg.kube.watch import KindWatch
from disagg.reconcile.restarts import WINDOW_S, Replacement, ReplacementBudget, restarted_engine
from disagg.reconcile.router_workers import (
    READD_ROUTERS,
    KeptOut,
    KeptOutTracker,
    StaleTracker,
    StaleWorker,
    kept_out,
    listed_workers,
    open_circuits,
)
from disagg.reconcile.status import (
    ROUTER_WORKERS,
    Cond,
    merge_conditions,
    router_workers_condition,
    routers_missing_roles,
)
from disagg.wellknown import (
    LWS_WORKER_INDEX_LABEL,
    MANAGED_SELECTOR,
    REVISION_LABEL,
    ROLE_LABEL,
    ROLES,
    ROUTER,
    SERVICE_LABEL,
)

log = logging.getLogger(__name__)

PODS_SELECTOR = f"{MANAGED_SELECTOR},{ROLE_LABEL} in ({','.join((*ROLES, ROUTER))})"
HANDLED_MAX = 10_000
"""Pods remembered as replaced (or left to the kubelet) at most; the oldest are forgotten first."""
ROUTER_CHECK_S = 5.0
"""How often each router's worker list is compared with the pods."""
ROUTER_TIMEOUT_S = 2.0
WORKER_HEALTH_TIMEOUT_S = 1.0
"""A worker kept out of a router is put back only if its own /health answers within this."""
RECHECK_ROUNDS = 12
"""A RouterWorkers condition written False is read back from the API server every this many rounds (another
writer of the status may have dropped it); one written True only when it changes."""


@dataclass(frozen=True)
class PodView:
    """What the operator keeps of one of its pods."""

    namespace: str
    name: str
    service: str
    role: str
    url: str
    """http://<pod IP>:<its container port named http>, or "" while it has no IP."""
    ready: bool
    deleting: bool
    app: str = ""
    """app.kubernetes.io/name: which router a router pod runs."""
    bootstrap_port: int | None = None
    """A prefill pod's KV bootstrap port as sglang-router's discovery reads it (its annotation)."""
    revision: str = ""
    """A router selects the workers of its own revision only (versioned rollouts)."""
    leader: bool = True
    """False for the non-leader pods of a multi-node worker, which no router selects."""


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    ports = [p for c in (pod.get("spec") or {}).get("containers") or [] for p in c.get("ports") or []
             if p.get("name") == "http"]
    ip = status.get("podIP") or ""
    if not labels.get(SERVICE_LABEL) or not labels.get(ROLE_LABEL):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    bootstrap = str((meta.get("annotations") or {}).get(BOOTSTRAP_PORT_ANNOTATION) or "")
    return PodView(namespace=str(meta.get("namespace") or "default"), name=str(meta.get("name")),
                   service=str(labels[SERVICE_LABEL]), role=str(labels[ROLE_LABEL]),
                   url=f"http://{ip}:{ports[0].get('containerPort')}" if ip and ports else "", ready=ready,
                   deleting=bool(meta.get("deletionTimestamp")), app=str(labels.get("app.kubernetes.io/name") or ""),
                   bootstrap_port=int(bootstrap) if bootstrap.isdigit() else None,
                   revision=str(labels.get(REVISION_LABEL) or ""),
                   leader=str(labels.get(LWS_WORKER_INDEX_LABEL, "0")) == "0")


class RestartedEngines:
    """Replaces the pods whose engine restarted in place (once per pod, within each service's budget)."""

    def __init__(self, kube: Kube, record_event: EventRecorder, is_active: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube, self.record_event, self.is_active, self.clock = kube, record_event, is_active, clock
        self.budget = ReplacementBudget()
        self._handled: dict[str, None] = {}
        """uids acted on (insertion-ordered, bounded): one action per restarted pod."""
        self._guard = threading.Lock()

    def seen(self, pod: Mapping[str, Any]) -> Replacement | None:
        """Replaces `pod` if its engine restarted in place; what was decided."""
        replacement = restarted_engine(pod)
        if replacement is None or not self.is_active():
            return None
        with self._guard:
            if replacement.uid in self._handled:
                return None
            self._handled[replacement.uid] = None
            while len(self._handled) > HANDLED_MAX:
                del self._handled[next(iter(self._handled))]
            allowed = self.budget.take(replacement.namespace, replacement.service, self.clock())
        service = {"metadata": {"namespace": replacement.namespace, "name": replacement.service}}
        if not allowed:
            self.record_event(service, "Warning", "EngineRestartLoop",
                              f"{replacement.role} worker {replacement.name}: its engine restarted in place again "
                              f"(restart {replacement.restarts}); {self.budget.burst} pods of this service were "
                              f"replaced in the last {WINDOW_S:.0f} s, so this one is left to the kubelet's back-off")
            return replacement
        try:
            self.kube.delete(POD, replacement.namespace, replacement.name, uid=replacement.uid)
        except ApiError as error:
            log.warning("cannot replace pod %s/%s: %s", replacement.namespace, replacement.name, error)
            with self._guard:
                self._handled.pop(replacement.uid, None)
            return None
        log.info("replaced %s/%s: %s", replacement.namespace, replacement.name, replacement.message())
        self.record_event(service, "Normal", "EngineReplaced", replacement.message())
        return replacement


Pools = dict[tuple[str, str], dict[str, set[str]]]
"""(namespace, service) -> role -> worker URLs."""


def pools_of(pods: list[PodView]) -> tuple[Pools, Pools, dict[tuple[str, str], dict[str, int]]]:
    """The URLs of each service's live workers, those of its leaving ones, and its count of Ready workers."""
    current: Pools = {}
    leaving: Pools = {}
    ready: dict[tuple[str, str], dict[str, int]] = {}
    for pod in pods:
        if pod.role not in ROLES:
            continue
        service = (pod.namespace, pod.service)
        if pod.url:
            into = leaving if pod.deleting else current
            into.setdefault(service, {}).setdefault(pod.role, set()).add(pod.url)
        if pod.ready and not pod.deleting:
            counts = ready.setdefault(service, {})
            counts[pod.role] = counts.get(pod.role, 0) + 1
    return current, leaving, ready


def ready_workers(pods: list[PodView]) -> dict[tuple[str, str, str], dict[str, dict[str, int | None]]]:
    """(namespace, service, revision) -> role -> the URL of each Ready worker a router of that revision selects
    (not being deleted; a multi-node worker's leader only) -> its bootstrap port."""
    out: dict[tuple[str, str, str], dict[str, dict[str, int | None]]] = {}
    for pod in pods:
        if pod.role in ROLES and pod.ready and not pod.deleting and pod.url and pod.leader:
            key = (pod.namespace, pod.service, pod.revision)
            out.setdefault(key, {}).setdefault(pod.role, {})[pod.url] = pod.bootstrap_port
    return out


RouterApi = Callable[[str, str], Any]
"""(method, url) -> the decoded JSON answer; raises OSError (or ValueError) when there is none."""


def http_json(method: str, url: str) -> Any:
    request = urllib.request.Request(url, method=method, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=ROUTER_TIMEOUT_S) as response:
        return json.loads(response.read() or b"null")


class WorkerHttp(Protocol):
    """The calls that put a worker back into a router: its /metrics, the worker's own /health, the add."""

    def text(self, url: str) -> str: ...

    def healthy(self, url: str) -> bool: ...

    def post(self, url: str, body: Mapping[str, Any]) -> Any: ...


class UrllibHttp:
    def text(self, url: str) -> str:
        with urllib.request.urlopen(url, timeout=ROUTER_TIMEOUT_S) as response:
            return str(response.read().decode("utf-8", "replace"))

    def healthy(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=WORKER_HEALTH_TIMEOUT_S) as response:
                return 200 <= int(response.status) < 300
        except (OSError, ValueError):
            return False

    def post(self, url: str, body: Mapping[str, Any]) -> Any:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Accept": "application/json", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=ROUTER_TIMEOUT_S) as response:
            return json.loads(response.read() or b"null")


class RouterWorkers:
    """Every `ROUTER_CHECK_S`: each Ready router's `GET /workers` against its service's pods. A worker whose pod
    is leaving is removed at once (and a pod's deletion wakes a check), one no pod is behind after two checks;
    with sglang-router's `DELETE /workers/<id>` or vllm-router's `DELETE /workers/<url>`."""

    def __init__(self, pods: Callable[[], list[PodView]], record_event: EventRecorder,
                 is_active: Callable[[], bool], api: RouterApi = http_json,
                 clock: Callable[[], float] = time.monotonic, kube: Kube | None = None,
                 http: WorkerHttp | None = None) -> None:
        self.pods, self.record_event, self.is_active, self.api, self.clock = pods, record_event, is_active, api, clock
        self.kube = kube
        self.http: WorkerHttp = http or UrllibHttp()
        self.tracker = StaleTracker()
        self.kept_out = KeptOutTracker()
        self._reported: dict[tuple[str, str], tuple[str, str, int]] = {}
        """service -> the RouterWorkers (status, reason) last written or read, and the round it was."""
        self._rounds = 0
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="disagg-router-workers")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def leaving(self) -> None:
        """A worker's pod got its deletion timestamp: check the routers now rather than at the next round."""
        self.wake.set()

    def _run(self) -> None:
        next_round = self.clock() + ROUTER_CHECK_S
        while not self.stop_event.is_set():
            woken = self.wake.wait(max(0.0, next_round - self.clock()))
            self.wake.clear()
            if self.stop_event.is_set():
                return
            regular = self.clock() >= next_round
            if regular:
                next_round = self.clock() + ROUTER_CHECK_S
            elif not woken:
                continue
            if self.is_active():
                try:
                    self.check(count=regular)
                except Exception:  # a check must never end the loop
                    log.exception("router worker check failed")

    def check(self, count: bool = True) -> list[tuple[str, StaleWorker]]:
        """One round over every router; the workers removed. With `count` false only leaving workers go (the
        two-check rule counts regular rounds only) and no condition is written."""
        pods = self.pods()
        current, leaving, ready_pods = pools_of(pods)
        routers = [p for p in pods if p.role == ROUTER and p.ready and p.url and not p.deleting]
        ready_urls = ready_workers(pods)
        self.tracker.forget({f"{r.namespace}/{r.name}" for r in routers})
        self.kept_out.forget({f"{r.namespace}/{r.name}" for r in routers})
        healthy: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        removed = []
        for router in routers:
            key = f"{router.namespace}/{router.name}"
            service = (router.namespace, router.service)
            try:
                listed = listed_workers(self.api("GET", f"{router.url}/workers"))
            except (OSError, ValueError):
                continue  # no such API, or the router is busy: next round
            going = leaving.get(service, {})
            counts = healthy.setdefault(service, {}).setdefault(router.name, {})
            for worker in listed:
                if worker.healthy and worker.url not in going.get(worker.role, set()):
                    counts[worker.role] = counts.get(worker.role, 0) + 1
            for worker in self.tracker.check(key, listed, current.get(service, {}), going, count=count):
                if self._remove(router, worker, worker.url in going.get(worker.role, set())):
                    removed.append((key, worker))
            if count and router.app in READD_ROUTERS:
                self.put_back(router, listed, ready_urls.get((*service, router.revision), {}))
        if count:
            self._rounds += 1
            for service, by_router in healthy.items():
                self.report(service, router_workers_condition(by_router, ready_pods.get(service, {})),
                            routers_missing_roles(by_router), ready_pods.get(service, {}))
            for service in [s for s in self._reported if s not in healthy]:
                del self._reported[service]
        return removed

    def put_back(self, router: PodView, listed: list[StaleWorker],
                 ready: Mapping[str, Mapping[str, int | None]]) -> list[KeptOut]:
        """Removes and adds again the Ready workers `router` has kept out for two checks that answer their own
        health check; those put back."""
        key = f"{router.namespace}/{router.name}"
        try:
            metrics = self.http.text(f"http://{urlsplit(router.url).hostname}:{ROUTER_METRICS_PORT}/metrics")
        except (OSError, ValueError):
            metrics = ""  # no circuits known this round: the listing still tells unlisted and unhealthy workers
        done = []
        for worker in self.kept_out.check(key, kept_out(listed, ready, open_circuits(metrics)), self.clock()):
            if not self.http.healthy(worker.url):
                continue  # still failing: the router is right to keep it out
            if self._readd(router, worker):
                done.append(worker)
        return done

    def _readd(self, router: PodView, worker: KeptOut) -> bool:
        key = f"{router.namespace}/{router.name}"
        body: dict[str, Any] = {"url": worker.url, "worker_type": worker.role}
        if worker.role == "prefill":
            if worker.bootstrap_port is None:
                log.info("router %s: cannot add prefill worker %s back: no bootstrap port known", key, worker.url)
                return False
            body["bootstrap_port"] = worker.bootstrap_port
        try:
            if worker.listed is not None:
                self.api("DELETE", f"{router.url}/workers/{quote(worker.listed.worker_id, safe='')}")
            self.http.post(f"{router.url}/workers", body)
        except (OSError, ValueError) as error:
            log.info("router %s: cannot put worker %s back: %s", key, worker.url, error)
            return False
        self.kept_out.readded(key, worker.url, self.clock())
        message = (f"router {router.name} kept {worker.role} worker {worker.url} out of its rotation for two checks "
                   f"({worker.why}) while its pod is Ready, and the worker answers its health check: removed and added "
                   "again through the router's API, which resets the router's health and circuit-breaker state")
        log.info("%s", message)
        self.record_event({"metadata": {"namespace": router.namespace, "name": router.service}},
                          "Normal", "RouterWorkerReadded", message)
        return True

    def _remove(self, router: PodView, worker: StaleWorker, leaving: bool) -> bool:
        key = f"{router.namespace}/{router.name}"
        try:
            self.api("DELETE", f"{router.url}/workers/{quote(worker.worker_id, safe='')}")
        except (OSError, ValueError) as error:
            log.info("router %s: cannot remove worker %s: %s", key, worker.url, error)
            return False
        self.tracker.removed(key, worker)
        if leaving:
            message = (f"router {router.name} still listed {worker.role} worker {worker.url}, whose pod is being "
                       "deleted: removed through the router's API so that it gets no new request while it drains")
        else:
            message = (f"router {router.name} still listed {worker.role} worker {worker.url}, which no pod of this "
                       "service has been for two checks (its pod was deleted while NotReady, which the router does "
                       "not see): removed through the router's API")
        log.info("%s", message)
        self.record_event({"metadata": {"namespace": router.namespace, "name": router.service}},
                          "Normal", "RouterWorkerRemoved", message)
        return True

    def report(self, service: tuple[str, str], cond: Cond, missing: list[str], ready_pods: Mapping[str, int]) -> None:
        """Writes the service's RouterWorkers condition when its status or reason changed (a new message alone is
        no write); a Warning when a router keeps out every Ready pod of a role."""
        if self.kube is None:
            return
        known = self._reported.get(service)
        if known is not None and known[:2] == (cond.status, cond.reason) and (
                cond.status == "True" or self._rounds - known[2] < RECHECK_ROUNDS):
            return
        namespace, name = service
        try:
            body = self.kube.get(INFERENCE_SERVICE, namespace, name)
            if body is None:
                return
            old = (body.get("status") or {}).get("conditions") or []
            previous = next((c for c in old if c.get("type") == ROUTER_WORKERS), None)
            if previous is None or (previous.get("status"), previous.get("reason")) != (cond.status, cond.reason):
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                conditions = merge_conditions(old, [cond], (body.get("metadata") or {}).get("generation"), now)
                self.kube.patch_status(namespace, name, {"conditions": conditions})
                if cond.status == "False" and any(ready_pods.get(role) for role in missing):
                    self.record_event(body, "Warning", cond.reason, cond.message)
                elif cond.status == "True" and previous is not None:
                    self.record_event(body, "Normal", "RouterWorkersHealthy", cond.message)
        except ApiError as error:
            log.info("cannot write the RouterWorkers condition of %s/%s: %s", namespace, name, error)
            return
        self._reported[service] = (cond.status, cond.reason, self._rounds)


class OperatorPods:
    """The watch of the operator's pods per scope, feeding `RestartedEngines` and the index `RouterWorkers`
    reads."""

    def __init__(self, kube: Kube, scopes: list[str | None], record_event: EventRecorder,
                 is_active: Callable[[], bool]) -> None:
        self.kube, self.scopes = kube, scopes
        self.restarts = RestartedEngines(kube, record_event, is_active)
        self.routers = RouterWorkers(self.views, record_event, is_active, kube=kube)
        self._views: dict[str, PodView] = {}
        self._guard = threading.Lock()
        self.watches: list[KindWatch] = []

    def start(self) -> None:
        for namespace in self.scopes:
            watch = KindWatch(self.kube, POD, namespace, PODS_SELECTOR, self._listed, self._changed)
            watch.start()
            self.watches.append(watch)
        self.routers.start()

    def stop(self) -> None:
        self.routers.stop()
        for watch in self.watches:
            watch.close()

    def views(self) -> list[PodView]:
        with self._guard:
            return list(self._views.values())

    def _listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        for pod in items:
            self._seen(pod)

    def _changed(self, kind: Kind, event: str, pod: dict[str, Any]) -> None:
        if event == "DELETED":
            with self._guard:
                self._views.pop(str((pod.get("metadata") or {}).get("uid")), None)
            return
        self._seen(pod)

    def _seen(self, pod: Mapping[str, Any]) -> None:
        view = pod_view(pod)
        uid = str((pod.get("metadata") or {}).get("uid"))
        with self._guard:
            before = self._views.get(uid)
            if view is None:
                self._views.pop(uid, None)
            else:
                self._views[uid] = view
        if view is not None and view.role in ROLES and view.deleting and (before is None or not before.deleting):
            self.routers.leaving()
        if view is not None and view.role in ROLES:
            self.restarts.seen(pod)
