"""Before the autoscaler lowers a pool's replicas: which workers leave (`disagg.scaling.victims`), told to the
ReplicaSet controller through each pod's `controller.kubernetes.io/pod-deletion-cost`.

The load of each pod comes from its engine's own gauges in Prometheus (requests running and waiting, KV-cache
usage), two queries per scale-down (never on an ordinary tick). A pod Prometheus has no sample of counts as
busy (it leaves last). Only Deployments: a LeaderWorkerSet removes its highest-numbered groups.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from disagg.engines import ENGINES
from disagg.kube.client import POD, ApiError, Kube
from disagg.scaling.victims import DELETION_COST_ANNOTATION, WorkerLoad, choose_victims, deletion_costs

log = logging.getLogger(__name__)

PodLoads = tuple[dict[str, float], dict[str, float]]
"""(requests in flight by pod name, KV usage by pod name)."""


def load_queries(namespace: str, service: str, role: str) -> dict[str, str]:
    """The two PromQL queries of one pool's per-pod load (both engines' names)."""
    metrics = [engine.metrics for engine in ENGINES.values()]
    in_flight = "|".join(sorted({n for m in metrics for n in (*m.running_requests, *m.waiting_requests)}))
    kv = "|".join(sorted({n for m in metrics for n in m.kv_cache_usage}))
    where = f'namespace="{namespace}",disagg_service="{service}",disagg_role="{role}"'
    return {"in_flight": f'sum by (pod) ({{__name__=~"{in_flight}",{where}}})',
            "kv_usage": f'max by (pod) ({{__name__=~"{kv}",{where}}})'}


def _created(pod: Mapping[str, Any]) -> float:
    stamp = (pod.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return 0.0
    return datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in ((pod.get("status") or {}).get("conditions") or []))


def worker_loads(pods: list[dict[str, Any]], loads: PodLoads) -> list[WorkerLoad]:
    """The pool's live pods (not being deleted) as the choice reads them."""
    in_flight, kv = loads
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        name = str(meta.get("name"))
        out.append(WorkerLoad(name, _ready(pod), in_flight.get(name, float("inf")), kv.get(name, 0.0),
                              _created(pod)))
    return out


@dataclass
class VictimMarker:
    """Marks the pods of a pool with their deletion cost right before a scale-down."""

    kube: Kube
    query: Callable[[str], list[dict[str, Any]]]
    """A PromQL instant query (the autoscaler's Prometheus source)."""

    def loads(self, namespace: str, service: str, role: str) -> PodLoads:
        out: list[dict[str, float]] = []
        for promql in load_queries(namespace, service, role).values():
            values: dict[str, float] = {}
            for sample in self.query(promql):
                pod = (sample.get("metric") or {}).get("pod")
                if pod:
                    values[str(pod)] = float(sample["value"][1])
            out.append(values)
        return out[0], out[1]

    def mark(self, namespace: str, service: str, role: str, selector: str, count: int) -> list[str]:
        """Writes each live pod's deletion cost (only where it changes); the `count` pods chosen to leave.
        Prometheus or the API server failing leaves the choice to the ReplicaSet controller."""
        try:
            pods = self.kube.list(POD, namespace, selector)
            workers = worker_loads(pods, self.loads(namespace, service, role))
        except Exception as error:  # the scale-down goes on; only the choice of victims is lost
            log.warning("%s/%s %s: no victims chosen (%s); the ReplicaSet controller chooses", namespace, service,
                        role, error)
            return []
        costs = deletion_costs(workers)
        by_name = {str((p.get("metadata") or {}).get("name")): p for p in pods}
        for name, cost in costs.items():
            meta = by_name[name].get("metadata") or {}
            if (meta.get("annotations") or {}).get(DELETION_COST_ANNOTATION) == str(cost):
                continue
            try:
                self.kube.annotate(POD, namespace, name, {DELETION_COST_ANNOTATION: str(cost)}, uid=meta.get("uid"))
            except ApiError as error:
                log.info("%s/%s: deletion cost not written: %s", namespace, name, error)
        return choose_victims(workers, count)
