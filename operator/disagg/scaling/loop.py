"""The autoscaler: one loop for every InferenceService of the operator.

Each tick runs the same fixed set of PromQL queries whatever the number of services, decides every
autoscaled pool with the pure policy (`disagg.scaling.policy.decide`, the code the simulator
benchmarks), and actuates through its own field manager on the pools' `replicas` only. It reads
services and Deployments from in-memory indexes that the watches keep, so a tick makes no API
reads; it writes only when a pool changes or its status does.
"""

from __future__ import annotations

import copy
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from disagg.api.v1alpha1 import ROLES, InferenceServiceSpec
from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.engines import MetricNames, engine_adapter
from disagg.kube.client import AUTOSCALER_FIELD_MANAGER, DEPLOYMENT, LEADER_WORKER_SET, ApiError, Kube
from disagg.reconcile.status import KV_FROM_TRAFFIC, Cond, kv_traffic_condition, merge_conditions
from disagg.reconcile.victims import VictimMarker
from disagg.scaling.policy import LoadPicture, PolicySettings, PolicyState, PoolDecision, decide
from disagg.scaling.prometheus import PrometheusSource, PrometheusUnavailable
from disagg.scaling.signals import Observations

log = logging.getLogger(__name__)

MISSCRAPED_TICKS = 3
"""Ticks in a row whose engines' scrape interval is off `--scrape-interval` before the Warning."""

ServiceKey = tuple[str, str]
EventRecorder = Callable[[dict[str, Any], str, str, str], None]


def _custom_metrics(specs: Iterable[InferenceServiceSpec]) -> tuple[MetricNames, ...]:
    """The metric names of the custom engines among the services, each set once."""
    found: list[MetricNames] = []
    for spec in specs:
        names = engine_adapter(spec.engine).metrics
        if spec.engine.custom is not None and names not in found:
            found.append(names)
    return tuple(found)


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Index:
    """Objects as the watches last saw them (kept by the kopf handlers)."""

    services: dict[ServiceKey, dict[str, Any]] = field(default_factory=dict)
    """Without their managedFields (nothing reads them; half the size of a service)."""
    deployments: dict[ServiceKey, dict[str, Any]] = field(default_factory=dict)
    """By (namespace, Deployment name): just the counts (`pool_counts`)."""

    def remember(self, body: dict[str, Any]) -> None:
        """Keeps the newest version of a service: from its watch events and from this operator's own
        status writes, whose watch events may not have been handled yet."""
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        current = self.services.get(key)
        if current is None or resource_version(body) >= resource_version(current):
            kept = copy.deepcopy({k: v for k, v in body.items() if k != "metadata"})
            kept["metadata"] = copy.deepcopy({k: v for k, v in meta.items() if k != "managedFields"})
            self.services[key] = kept


def pool_counts(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """What the autoscaler reads of a pool's Deployment (3,000 whole Deployments took ~200 MiB): the
    counts, its uid, and the uids of its owners (a Deployment of that name that the service does not own
    is not its pool, and is never scaled)."""
    meta = deployment.get("metadata") or {}
    return {
        "metadata": {"uid": meta.get("uid"), "owners": [r.get("uid") for r in meta.get("ownerReferences") or []]},
        "spec": {"replicas": (deployment.get("spec") or {}).get("replicas", 0)},
        "status": {"readyReplicas": (deployment.get("status") or {}).get("readyReplicas", 0)},
    }


def workload_of(service: Mapping[str, Any], role: str) -> str:
    """The Deployment (or LeaderWorkerSet) that serves a pool: `<name>-<role>`, or the other slot's after a
    rollout (status.<role>.workload, reconcile/rollout.py)."""
    meta = service.get("metadata") or {}
    pool = (service.get("status") or {}).get(role) or {}
    return str(pool.get("workload") or f"{meta.get('name', '')}-{role}")


def rolling_out(service: Mapping[str, Any]) -> bool:
    """A rollout to a new revision is under way: both revisions' pools hold their size until it is over."""
    return bool((service.get("status") or {}).get("rollout"))


def pool_of(index: Index, service: Mapping[str, Any], role: str) -> dict[str, Any] | None:
    """The counts of a service's pool Deployment, if there is one that the service owns."""
    meta = service.get("metadata") or {}
    deployment = index.deployments.get((meta.get("namespace", ""), workload_of(service, role)))
    if deployment is None or meta.get("uid") not in deployment.get("metadata", {}).get("owners", []):
        return None
    return deployment


def resource_version(body: Mapping[str, Any]) -> int:
    """The object's resourceVersion as a number (comparable on kube-apiserver); -1 when absent."""
    try:
        return int(body.get("metadata", {}).get("resourceVersion", ""))
    except (TypeError, ValueError):
        return -1


@dataclass
class TickReport:
    """What one tick did (tests and logs)."""

    queried: bool = False
    decisions: dict[ServiceKey, dict[str, PoolDecision]] = field(default_factory=dict)
    scaled: list[tuple[str, str, int, int, str]] = field(default_factory=list)
    """(namespace, Deployment, from, to, the decision's reason)."""
    metrics_problem: str | None = None


@dataclass
class Autoscaler:
    kube: Kube
    catalog: AcceleratorCatalog
    source: PrometheusSource | None
    settings: PolicySettings
    record_event: EventRecorder
    index: Index
    lock_for: Callable[[str, str], threading.Lock]
    on_scale: Callable[[str, str], None] = lambda role, direction: None
    on_kv_path: Callable[[str, str, bool], None] = lambda namespace, name, ok: None
    """Called each tick with a service's KV-path verdict from traffic (operator metrics)."""
    clock: Callable[[], float] = time.time
    is_active: Callable[[], bool] = lambda: True
    """False while another operator of the peering group is the active one."""
    ready: Callable[[], bool] = lambda: True
    """False until the watch caches have their first listing: a pool missing from a partial cache
    would read as not created yet."""
    victims: VictimMarker | None = None
    """Chooses which pods a scale-down removes (their deletion cost), from their load in Prometheus."""
    scrape_interval_s: float | None = None
    """How often the engines are scraped as the operator was told (`--scrape-interval`): the rate window
    spans one interval less. A service whose engines are scraped at another interval gets a Warning."""
    states: dict[ServiceKey, PolicyState] = field(default_factory=dict)
    _actuated: dict[tuple[str, str], int] = field(default_factory=dict)
    _failing: set[ServiceKey] = field(default_factory=set)
    _misscraped: dict[ServiceKey, int] = field(default_factory=dict)
    """Services whose engines were scraped at another interval than `scrape_interval_s`: for how many
    ticks in a row (a missed scrape doubles one interval; three ticks are a setting, and warned once)."""

    def _valid(self) -> list[tuple[ServiceKey, dict[str, Any], InferenceServiceSpec]]:
        """Every service with a valid spec (the KV path is checked for all; the autoscaled ones are scaled)."""
        found = []
        for key, body in list(self.index.services.items()):
            if body.get("metadata", {}).get("deletionTimestamp"):
                continue
            try:
                spec = validate_service(body, self.catalog)
            except (InvalidSpec, ValidationError):
                continue  # reconcile reports InvalidSpec and leaves the pools as they are; so does this
            found.append((key, body, spec))
        return found

    def tick(self) -> TickReport:
        """One round: query, decide every autoscaled pool, actuate, record."""
        report = TickReport()
        if not self.ready() or not self.is_active():
            return report
        valid = self._valid()
        services = [(key, body, spec) for key, body, spec in valid
                    if any(getattr(spec, role).autoscaling is not None for role in ROLES)]
        live = {key for key, _, _ in services}
        for gone in [key for key in self.states if key not in live]:
            del self.states[gone]
        for gone in [key for key in self._misscraped if key not in live]:
            del self._misscraped[gone]
        if not valid:
            return report
        observations = self._observe(report, _custom_metrics(spec for _, _, spec in valid))
        now = self.clock()
        for key, body, spec in services:
            if not rolling_out(body):  # both revisions' pools hold their size until the rollout is over
                self._autoscale(key, body, spec, observations, report, now)
        if observations is not None:
            for key, _, _ in valid:
                self._check_kv_path(key, observations, now)
        return report

    def _check_kv_path(self, key: ServiceKey, observations: Observations, now: float) -> None:
        """KVTransferReady from the decode workers' counters: set here when the traffic's verdict changes, kept
        by reconcile while the Services and a ready worker per pool are there (it sets the structural one)."""
        traffic = observations.kv_traffic(*key)
        cond = None if traffic is None else kv_traffic_condition(traffic.handed_off, traffic.recomputed,
                                                                 traffic.failed)
        if cond is None:
            return  # no traffic: nothing to judge
        self.on_kv_path(key[0], key[1], cond.status == "True")
        with self.lock_for(*key):
            body = self.index.services.get(key)
            if body is None:
                return
            conditions = (body.get("status") or {}).get("conditions", []) or []
            current = next((c for c in conditions if c.get("type") == "KVTransferReady"), None)
            # only over the structural verdict that the KV path can work (reconcile's PeersReady) or our own
            if current is None or current.get("reason") not in ("PeersReady", *KV_FROM_TRAFFIC):
                return
            if (current.get("status"), current.get("reason")) == (cond.status, cond.reason):
                return
            merged = merge_conditions(conditions, [cond], body["metadata"].get("generation"), _rfc3339(now))
            written = self.kube.patch_status(key[0], key[1], {"conditions": merged})
            if written:
                self.index.remember(written)
        log.info("KV path of %s/%s: %s (%s)", key[0], key[1], cond.reason, cond.message)
        if cond.status == "False":
            self.record_event(body, "Warning", cond.reason, cond.message)

    def _observe(self, report: TickReport, custom: tuple[MetricNames, ...] = ()) -> Observations | None:
        """This tick's query results, or None (with the reason in the report)."""
        if self.source is None:
            report.metrics_problem = "no Prometheus configured (disagg run --prometheus-url)"
            return None
        try:
            observations = self.source.observe(custom) if custom else self.source.observe()
        except PrometheusUnavailable as error:
            report.metrics_problem = f"Prometheus unavailable: {error}"
            return None
        report.queried = True
        return observations

    def _autoscale(
        self, key: ServiceKey, body: dict[str, Any], spec: InferenceServiceSpec, observations: Observations | None,
        report: TickReport, now: float,
    ) -> None:
        """Decide one service's pools and act on the decisions."""
        namespace, name = key
        current: dict[str, int] = {}
        ready: dict[str, int] = {}
        for role in ROLES:
            deployment = pool_of(self.index, body, role)
            if deployment is not None:
                current[role] = int(deployment.get("spec", {}).get("replicas", 0))
                ready[role] = int((deployment.get("status") or {}).get("readyReplicas", 0))
        picture = None
        try:
            if observations is not None:
                picture = observations.picture(namespace, name, ready, spec.slo.percentile)
            decisions, state = decide(
                picture, spec, current, self.states.get(key, PolicyState()), now, self.settings, self.catalog
            )
        except Exception:
            # one service's failure must not stop the others' autoscaling (the tick goes on)
            if key not in self._failing:
                log.exception("autoscaling %s/%s: the policy failed; holding its pools", namespace, name)
            self._failing.add(key)
            return
        self._failing.discard(key)
        self.states[key] = state
        report.decisions[key] = decisions
        self._check_scrape_interval(key, body, picture)
        try:
            self._act(body, spec, decisions, report, now)
        except ApiError as error:
            log.warning("autoscaling %s/%s: %s", namespace, name, error)

    def _act_on_pool(
        self, body: dict[str, Any], spec: InferenceServiceSpec, decision: PoolDecision, pool_status: dict[str, Any],
        report: TickReport, now: float,
    ) -> dict[str, Any]:
        """Scale one pool as decided (once per change); returns its status as it should now be."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        role, deployment = decision.role, workload_of(body, decision.role)
        pool_status["desiredReplicas"] = decision.desired
        reach = out_of_reach_status(decision, pool_status.get("outOfReach"))
        if reach is not None:
            pool_status["outOfReach"] = reach
        elif "outOfReach" in pool_status:
            pool_status["outOfReach"] = None  # the merge patch removes it
        # without metrics the policy only ever holds (or clamps into min/max): act on it either way;
        # a pool not created yet is left to reconcile (it creates it with its initial replicas)
        pool = pool_of(self.index, body, role)
        if not (decision.changed and decision.desired != decision.current and pool is not None):
            self._actuated.pop((namespace, deployment), None)
            return pool_status
        if self._actuated.get((namespace, deployment)) == decision.desired:
            return pool_status
        # by whole groups for a LeaderWorkerSet; only the object this service owns
        kind = LEADER_WORKER_SET if getattr(spec, role).multi_node else DEPLOYMENT
        if decision.desired < decision.current and kind is DEPLOYMENT and self.victims is not None:
            chosen = self.victims.mark(namespace, name, role, f"disagg.dev/service={name},disagg.dev/role={role}",
                                       decision.current - decision.desired)
            log.info("scaling %s down: %s leave (fewest requests in flight, least KV)", deployment,
                     ", ".join(chosen) or "the ReplicaSet controller's choice")
        self.kube.scale(namespace, deployment, decision.desired, AUTOSCALER_FIELD_MANAGER, kind,
                        uid=pool["metadata"]["uid"])
        self._actuated[(namespace, deployment)] = decision.desired
        report.scaled.append((namespace, deployment, decision.current, decision.desired, decision.reason))
        self.on_scale(role, "up" if decision.desired > decision.current else "down")
        self.record_event(body, "Normal", "Scaled",
                          f"{role} {decision.current} -> {decision.desired}: {decision.reason}")
        pool_status["lastScale"] = {
            "time": _rfc3339(now), "from": decision.current, "to": decision.desired, "reason": decision.reason,
        }
        return pool_status

    def _check_scrape_interval(self, key: ServiceKey, body: dict[str, Any], picture: LoadPicture | None) -> None:
        """Warn (once while it lasts) when the engines' last scrape interval, as Prometheus' irate and
        idelta of the same counter tell it, is far from `--scrape-interval`: the rate window then holds
        other spans than the policy was tuned on, or too few samples for any rate."""
        told = self.scrape_interval_s
        if told is None or picture is None:
            return
        seen = next((s.last_interval_s for s in (picture.prefill, picture.decode)
                     if s is not None and s.last_interval_s is not None), None)
        if seen is None:
            return
        if told / 1.5 <= seen <= told * 1.5:
            self._misscraped.pop(key, None)
            return
        ticks = self._misscraped[key] = self._misscraped.get(key, 0) + 1
        if ticks != MISSCRAPED_TICKS:
            return
        window = self.settings.signal_window_s + seen
        message = (f"the engines are scraped every {seen:.3g}s, not every {told:g}s as --scrape-interval says: "
                   f"the rates span other windows than the policy assumes (or hold too few samples); set "
                   f"--scrape-interval {seen:.3g} and --prometheus-rate-window {window:.0f}s (chart: "
                   "autoscaling.scrapeIntervalSeconds and autoscaling.rateWindow)")
        log.warning("autoscaling %s/%s: %s", key[0], key[1], message)
        self.record_event(body, "Warning", "ScrapeIntervalMismatch", message)

    def _act(
        self,
        body: dict[str, Any],
        spec: InferenceServiceSpec,
        decisions: dict[str, PoolDecision],
        report: TickReport,
        now: float,
    ) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self.lock_for(*key):
            # the newest version: a reconcile may have written status since this tick read the index,
            # and the status patch below (whole `conditions` list) must not put back older conditions
            self._act_locked(self.index.services.get(key, body), spec, decisions, report, now)

    def _act_locked(
        self,
        body: dict[str, Any],
        spec: InferenceServiceSpec,
        decisions: dict[str, PoolDecision],
        report: TickReport,
        now: float,
    ) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        old_status: dict[str, Any] = body.get("status") or {}
        status_patch: dict[str, Any] = {}
        for role, decision in decisions.items():
            pool_status = self._act_on_pool(body, spec, decision, dict(old_status.get(role) or {}), report, now)
            if pool_status != (old_status.get(role) or {}):
                status_patch[role] = pool_status
        blind = [d for d in decisions.values() if not d.metrics_available]
        if blind:
            reasons = "; ".join(f"{d.role}: {d.reason}" for d in blind)
            if report.metrics_problem:
                reasons = f"{report.metrics_problem}; holding {', '.join(d.role for d in blind)} at current replicas"
            cond = Cond("ScalingActive", "False", "MetricsUnavailable", reasons)
        else:
            summary = "; ".join(f"{d.role} {d.desired} ({d.reason})" for d in decisions.values())
            cond = Cond("ScalingActive", "True", "MetricsAvailable", summary)
        old_conditions = old_status.get("conditions", []) or []
        previous = next((c for c in old_conditions if c.get("type") == "ScalingActive"), None)
        # a changing message alone (fresh numbers every tick) is not worth a write
        if previous is None or (previous.get("status"), previous.get("reason")) != (cond.status, cond.reason):
            status_patch["conditions"] = merge_conditions(
                old_conditions, [cond], meta.get("generation"), _rfc3339(now)
            )
            # a pool with no ready replica yet has no metrics to give: a new service's ordinary state,
            # said by the condition, not worth a Warning (1,000 new services: 1,000 Events)
            starting = not report.metrics_problem and all(
                not (pool_of(self.index, body, d.role) or {}).get("status", {}).get("readyReplicas")
                for d in blind)
            if cond.status == "False" and not starting:
                self.record_event(body, "Warning", cond.reason, cond.message)
        if status_patch:
            written = self.kube.patch_status(namespace, name, status_patch)
            if written:
                self.index.remember(written)


def out_of_reach_status(decision: PoolDecision, written: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pool's `outOfReach` status for this decision: the written one while the share stays within a
    quarter of it (at least a point: a status write per tick for a moving share is not worth it)."""
    if decision.out_of_reach is None:
        return None
    share, reason = decision.out_of_reach
    percent = round(share * 100.0, 1)
    if written is not None and written.get("reason") == reason:
        before = float(written.get("percent", -100.0))
        if abs(percent - before) < max(1.0, 0.25 * before):
            return written
    return {"percent": percent, "reason": reason}


class AutoscalerThread:
    """Runs ticks every `tick_s` in a daemon thread until stopped."""

    def __init__(self, autoscaler: Autoscaler, tick_s: float, on_tick: Callable[[bool], None] | None = None) -> None:
        self.autoscaler = autoscaler
        self.tick_s = tick_s
        self.on_tick = on_tick
        """Called after each tick with whether it queried Prometheus (operator metrics)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disagg-autoscaler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.tick_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                report = self.autoscaler.tick()
                if self.on_tick is not None:
                    self.on_tick(report.queried)
                for namespace, deployment, before, after, reason in report.scaled:
                    # the reason too: the Event that carries it goes when its service does
                    log.info("scaled %s/%s %d -> %d: %s", namespace, deployment, before, after, reason)
            except Exception:
                log.exception("autoscaler tick failed")
            self._stop.wait(max(0.0, self.tick_s - (time.monotonic() - started)))
