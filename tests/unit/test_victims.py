"""A scale-down removes the workers the simulator assumes: the operator's deletion costs, read by the
ReplicaSet controller's own ranking, pick the same replicas the simulator drains, on the same inputs."""

from __future__ import annotations

import datetime
import random
from typing import Any

import numpy as np
import pytest

from disagg.capacity.models import builtin_model
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.reconcile.victims import VictimMarker, load_queries, worker_loads
from disagg.scaling.victims import DELETION_COST_ANNOTATION, WorkerLoad, choose_victims, deletion_costs
from disagg.sim.engine import DecodePool, PrefillReplica, prefill_victims

PHASE = {"Pending": 0, "Unknown": 1, "Running": 2}
EPOCH = 1_700_000_000.0


def replicaset_order(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ReplicaSet controller's order of deletion (kubernetes v1.36 pkg/controller/controller_utils.go,
    ActivePodsWithRanks.Less): unassigned first, then Pending < Unknown < Running, not ready before ready, then
    the lower pod-deletion-cost; the later tie-breaks (co-located pods, ready time, restarts, creation) never
    decide here, where the costs differ."""

    def ready(pod: dict[str, Any]) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

    def key(pod: dict[str, Any]) -> tuple[Any, ...]:
        cost = int((pod["metadata"].get("annotations") or {}).get(DELETION_COST_ANNOTATION, "0"))
        return (bool(pod["spec"].get("nodeName")), PHASE[pod["status"]["phase"]], ready(pod), cost,
                pod["metadata"]["name"])

    return sorted(pods, key=key)


def pod(name: str, ready: bool, created: float) -> dict[str, Any]:
    stamp = datetime.datetime.fromtimestamp(EPOCH + created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": stamp},
            "spec": {"nodeName": "node-1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def operators_choice(pods: list[dict[str, Any]], in_flight: dict[str, float], kv: dict[str, float],
                     count: int) -> list[str]:
    """What the operator writes (deletion costs from the pods and their engines' gauges), as the ReplicaSet
    controller then reads it."""
    costs = deletion_costs(worker_loads(pods, (in_flight, kv)))
    annotated = [{**p, "metadata": {**p["metadata"], "annotations": {DELETION_COST_ANNOTATION: str(costs[
        p["metadata"]["name"]])}}} for p in pods]
    return [p["metadata"]["name"] for p in replicaset_order(annotated)[:count]]


@pytest.mark.parametrize("seed", range(40))
def test_decode_scale_down_removes_what_the_simulator_drains(seed: int) -> None:
    rng = random.Random(seed)
    pool = DecodePool(builtin_model("llama-3.1-8b"), DEFAULT_CATALOG["nvidia-h200"], 1, size=4)
    now = 100.0
    times = rng.sample(range(1, 200), 9)  # whole, distinct seconds: creation timestamps have second resolution
    for slot in range(rng.randint(2, 9)):
        starting = rng.random() < 0.25
        index = pool.add(now - 60, now + times[slot] if starting else now - times[slot])
        if not starting:
            for request in range(rng.choice([0, 0, 1, 2, 3, 5, 8])):
                pool.admit(index, slot * 100 + request, float(rng.randint(100, 4000)), float(rng.randint(10, 500)))
    live = [int(s) for s in np.flatnonzero((pool.state == pool.STARTING) | (pool.state == pool.READY))]
    pods = [pod(f"decode-{s}", bool(pool.state[s] == pool.READY), float(pool.ready_at[s])) for s in live]
    in_flight = {f"decode-{s}": float(pool.batch[s]) for s in live if pool.state[s] == pool.READY}
    kv = {f"decode-{s}": float(pool.reserved[s] / pool.capacity) for s in live}
    count = rng.randint(1, len(live))
    operator = operators_choice(pods, in_flight, kv, count)
    simulator = [f"decode-{s}" for s in pool.scale_down(count)]
    assert operator == simulator


@pytest.mark.parametrize("seed", range(20))
def test_prefill_scale_down_removes_what_the_simulator_drains(seed: int) -> None:
    rng = random.Random(seed)
    now = 100.0
    replicas: list[PrefillReplica[int]] = []
    times = rng.sample(range(-60, 30), 7)
    for i in range(rng.randint(2, 7)):
        replica: PrefillReplica[int] = PrefillReplica(8192, 0.01, ready_at=now + times[i])
        for request in range(rng.choice([0, 0, 1, 3, 6])):
            replica.submit(i * 100 + request, 512.0, 0.05, max(now, replica.ready_at))
        replicas.append(replica)
    names = {id(r): f"prefill-{i}" for i, r in enumerate(replicas)}
    pods = [pod(names[id(r)], r.ready_at <= now, r.ready_at) for r in replicas]
    in_flight = {names[id(r)]: float(r.running + r.waiting) for r in replicas}
    count = rng.randint(1, len(replicas))
    assert operators_choice(pods, in_flight, {}, count) == [names[id(r)] for r in prefill_victims(replicas, now,
                                                                                                  count)]


def test_the_least_busy_leave_and_unknown_load_counts_as_busy() -> None:
    workers = [WorkerLoad("busy", True, 9.0), WorkerLoad("idle", True, 0.0, 0.2), WorkerLoad("idle-less-kv", True,
               0.0, 0.1), WorkerLoad("unknown", True), WorkerLoad("starting", False, started=5.0),
               WorkerLoad("starting-newer", False, started=6.0)]
    assert choose_victims(workers, 6) == ["starting-newer", "starting", "idle-less-kv", "idle", "busy", "unknown"]


class FakeKube:
    def __init__(self, pods: list[dict[str, Any]]) -> None:
        self.pods = pods
        self.written: list[tuple[str, dict[str, str | None], str | None]] = []

    def list(self, kind: Any, namespace: str, selector: str, cached: bool = False) -> list[dict[str, Any]]:
        return self.pods

    def annotate(self, kind: Any, namespace: str, name: str, annotations: dict[str, str | None],
                 uid: str | None = None) -> dict[str, Any]:
        self.written.append((name, annotations, uid))
        return {}


def test_the_marker_writes_each_pods_cost_once_from_its_engines_gauges() -> None:
    pods = [pod("a", True, 1.0), pod("b", True, 2.0), pod("c", True, 3.0)]
    pods[2]["metadata"]["annotations"] = {DELETION_COST_ANNOTATION: "0"}  # c is already the cheapest
    answers = {"in_flight": [{"metric": {"pod": "a"}, "value": [0, "4"]}, {"metric": {"pod": "b"}, "value": [0, "2"]},
                             {"metric": {"pod": "c"}, "value": [0, "0"]}],
               "kv_usage": [{"metric": {"pod": "a"}, "value": [0, "0.5"]}]}
    queries = load_queries("ns", "svc", "decode")
    kube = FakeKube(pods)
    marker = VictimMarker(kube, lambda promql: answers[next(k for k, q in queries.items() if q == promql)])  # type: ignore[arg-type]
    assert marker.mark("ns", "svc", "decode", "sel", 2) == ["c", "b"]
    assert kube.written == [("b", {DELETION_COST_ANNOTATION: "1"}, "uid-b"), ("a", {DELETION_COST_ANNOTATION: "2"},
                                                                             "uid-a")]
    assert 'namespace="ns",disagg_service="svc",disagg_role="decode"' in queries["in_flight"]
    assert "vllm:num_requests_running" in queries["in_flight"] and "sglang:num_queue_reqs" in queries["in_flight"]
