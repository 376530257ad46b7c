"""The operator's runtime as its composition root wires it, without kopf: `Operator.build` against a
kmock-emulated API server, started, fed InferenceService watch events as kopf's layer feeds them
(`Operator.service_event`), and stopped. Every request is one kmock received."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import kmock
import pytest
import yaml
from kubernetes import client as k8s

from disagg.catalog.accelerators import load_catalog
from disagg.kube.client import DEPLOYMENT, Kube
from disagg.metrics import OperatorMetrics
from disagg.reconcile.run import Reconciler, reconcile_service
from disagg.runtime.operator import Operator
from disagg.settings import OperatorSettings
from support.kmock import ApplyingEmulator, writes
from support.paths import REPO

pytestmark = pytest.mark.kmock(cls=ApplyingEmulator)

EXAMPLE = REPO / "examples" / "01-vllm-nixl-llama70b.yaml"
NAMESPACE, NAME = "serving", "llama-70b"
ISVC = "disagg.dev/v1alpha1/inferenceservices"
CHILD_RESOURCES = ("v1/serviceaccounts", "rbac.authorization.k8s.io/v1/roles",
                   "rbac.authorization.k8s.io/v1/rolebindings", "apps/v1/deployments", "v1/services",
                   "policy/v1/poddisruptionbudgets", "networking.k8s.io/v1/networkpolicies")
CHILD_PLURALS = {resource.rsplit("/", 1)[1] for resource in CHILD_RESOURCES}
CHILDREN = 14
"""Objects example 01 becomes (test_reconcile_kmock.py names them)."""
SETTINGS = OperatorSettings(
    namespaces=(NAMESPACE,), workers=2, status_delay_s=0.0, resync_seconds=3600.0, autoscale_tick_s=3600.0,
    identity="operator-under-test", liveness_port=0, metrics_port=0,
)


def clients_of(api: ApplyingEmulator) -> Callable[[int, Callable[[str], None] | None], Kube]:
    def connect_to(connections: int, on_request: Callable[[str], None] | None) -> Kube:
        configuration = k8s.Configuration()
        configuration.host = str(api.url).rstrip("/")
        configuration.connection_pool_maxsize = connections
        return Kube(k8s.ApiClient(configuration), on_request=on_request)

    return connect_to


@dataclass
class Rig:
    api: ApplyingEmulator
    operator: Operator
    metrics: OperatorMetrics

    def service(self) -> dict[str, Any]:
        body = self.api.get_object(ISVC, NAMESPACE, NAME)
        assert body is not None
        return body

    def children(self) -> int:
        return sum(1 for resource in CHILD_RESOURCES for _ in self.api.live(resource, NAMESPACE))

    def reconciles(self, result: str) -> float:
        return self.metrics.registry.get_sample_value("disagg_reconciles_total", {"result": result}) or 0.0

    def posted_events(self) -> list[dict[str, Any]]:
        return [w.body for w in writes(self.api) if w.method == "POST" and w.path.endswith("/events")]


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    """Waits (without holding up kmock, which serves on this event loop) until `check()` is truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s}s: {what}")


@asynccontextmanager
async def rig_for(api: ApplyingEmulator, settings: OperatorSettings) -> AsyncIterator[Rig]:
    metrics = OperatorMetrics()
    operator = Operator.build(settings, metrics, connect_to=clients_of(api))
    await asyncio.to_thread(operator.start)
    try:
        yield Rig(api, operator, metrics)
    finally:
        await asyncio.to_thread(operator.stop)


@pytest.fixture()
async def rig(kmock: ApplyingEmulator) -> AsyncIterator[Rig]:
    async with rig_for(kmock, SETTINGS) as running:
        yield running


def example() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return manifest


async def test_a_new_service_is_created_through_the_queue_and_its_event_posted_through_disagg_kube(rig: Rig) -> None:
    stored = rig.api.put_object(ISVC, example())

    rig.operator.service_event("ADDED", stored)

    await eventually(lambda: rig.children() == CHILDREN, f"the service's {CHILDREN} children")
    await eventually(lambda: (rig.service().get("status") or {}).get("observedGeneration") == 1, "status written")
    created = await eventually(lambda: [e for e in rig.posted_events() if e["reason"] == "Created"],
                               "a Created Event posted")
    assert len(created) == 1
    event = created[0]
    assert event["involvedObject"] == {"apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService",
                                       "name": NAME, "namespace": NAMESPACE, "uid": stored["metadata"]["uid"]}
    assert event["type"] == "Normal" and event["message"].startswith(f"applied {CHILDREN} children")
    assert (event["source"], event["reportingInstance"]) == ({"component": "disagg"}, "operator-under-test")
    assert rig.reconciles("changed") == 1
    # the children's informers listed every child kind of the watched namespace, by the operator's label
    listed = {r.resource.plural for r in rig.api if r.method == kmock.method.GET and r.resource is not None
              and r.namespace == NAMESPACE and r.params.get("labelSelector") == "app.kubernetes.io/managed-by=disagg"
              and r.params.get("watch") != "true"}
    assert listed == CHILD_PLURALS


async def test_reconciles_wait_for_the_informers_and_diff_against_their_cache(kmock: ApplyingEmulator) -> None:
    # a service whose children exist already (an operator restarting)
    kmock.put_object(ISVC, example())
    configuration = k8s.Configuration()
    configuration.host = str(kmock.url).rstrip("/")
    with k8s.ApiClient(configuration) as api_client:
        first = Reconciler(kube=Kube(api_client), catalog=load_catalog(), record_event=lambda *_: None,
                           clock=lambda: datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
        await asyncio.to_thread(reconcile_service, first, kmock.get_object(ISVC, NAMESPACE, NAME) or {})
    mark = kmock.mark()

    async with rig_for(kmock, SETTINGS) as rig:
        rig.operator.service_event(None, rig.service())  # kopf's listing at start-up
        # this one, and any the watches' first events of the pools bring (none of them writes)
        await eventually(lambda: rig.reconciles("unchanged") >= 1, "a reconcile")
        await asyncio.sleep(0.5)
        assert rig.reconciles("changed") == rig.reconciles("error") == 0
        since = kmock.requests_since(mark)
        # no write, and no read of a child but the informers' own paged listing and watches
        assert writes(since) == []
        reads = [r for r in since if r.resource is not None and r.resource.plural in CHILD_PLURALS]
        assert reads and all(r.params.get("limit") == "100" or r.params.get("watch") == "true" for r in reads)


async def test_a_pools_change_reconciles_its_service_and_resync_stops_at_its_deletion(kmock: ApplyingEmulator) -> None:
    async with rig_for(kmock, replace(SETTINGS, resync_seconds=0.3)) as rig:
        stored = rig.api.put_object(ISVC, example())
        rig.operator.service_event("ADDED", stored)
        await eventually(lambda: rig.reconciles("changed") == 1, "the create")
        # the resync reconciles the known service again and again, changing nothing
        await eventually(lambda: rig.reconciles("unchanged") >= 2, "two resyncs")

        rig.operator.service_event("DELETED", rig.service())
        await asyncio.sleep(0.4)  # a resync under way when the service went
        settled = rig.reconciles("unchanged")
        await asyncio.sleep(1.0)
        assert rig.reconciles("unchanged") == settled  # no resync of a deleted service

        # a pool's change reaches the autoscaler's index and its service's reconcile (none: it is gone)
        pool = rig.api.get_object("apps/v1/deployments", NAMESPACE, f"{NAME}-decode")
        assert pool is not None
        pool["status"] = {"replicas": 2, "readyReplicas": 2}
        rig.operator.informers.cache.changed(DEPLOYMENT, "MODIFIED", pool)
        index = rig.operator.reconciles.index
        assert index.deployments[(NAMESPACE, f"{NAME}-decode")]["status"] == {"readyReplicas": 2}
        await asyncio.sleep(0.3)
        assert rig.reconciles("unchanged") == settled

        rig.operator.service_event("ADDED", rig.service())
        await eventually(lambda: rig.reconciles("unchanged") > settled, "the service back")
        rig.operator.informers.cache.changed(DEPLOYMENT, "MODIFIED", pool)
        counted = rig.reconciles("unchanged")
        await eventually(lambda: rig.reconciles("unchanged") > counted, "a reconcile after the pool's change")
