"""The real reconcile code against a kmock-emulated API server (issue 2, "Done when", bullet 2).

`reconcile_service` talks to kmock over HTTP through the real `Kube` client (run in a worker thread,
since the kubernetes client is synchronous, while kmock serves in the test's event loop). The
emulator (tests/support/kmock.py) adds server-side apply, the status subresource, DELETE
preconditions and label selectors to kmock's KubernetesEmulator. Every assertion about writes
counts the PATCH/POST/PUT/DELETE requests kmock actually received.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kmock
import pytest

from disagg.reconcile.run import reconcile_service
from disagg.wellknown import AUTOSCALER_FIELD_MANAGER, FIELD_MANAGER
from support.kmock import ApplyingEmulator
from support.kmock_harness import (
    CHILDREN,
    DEPLOYMENTS,
    ISVC,
    NAME,
    NAMESPACE,
    SERVICES,
    STATUS,
    Harness,
    applied,
    child_writes,
    claim,
    condition,
    create_service,
    created,
    example,
    managers_of_replicas,
)

pytestmark = pytest.mark.kmock(cls=ApplyingEmulator)


async def test_children_applied_concurrently_after_their_prerequisites(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator applies a service's children from a thread pool: every child once all the same,
    # but the router's Role before its RoleBinding (the API server resolves the Role to check the
    # grant: 404 otherwise) and its ServiceAccount before any Deployment (or the pods are refused).
    # The two are made slow to answer, so a RoleBinding or Deployment sent alongside them would win.
    harness.api.put_object(ISVC, example())
    create = harness.kube.create
    in_flight, most = [0], [0]
    counting = threading.Lock()

    def slow_prerequisites(manifest: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        with counting:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05 if manifest["kind"] in ("ServiceAccount", "Role") else 0.01)
        try:
            return create(manifest, **kwargs)
        finally:
            with counting:
                in_flight[0] -= 1

    monkeypatch.setattr(harness.kube, "create", slow_prerequisites)
    with ThreadPoolExecutor(8) as pool:
        harness.applier = pool
        outcome, found = await harness.reconcile()

    ours = [w for w in found if w.field_manager == FIELD_MANAGER]
    assert sorted(w.name for w in ours) == sorted(CHILDREN)  # once each
    assert sorted(name for _, _, name in outcome.applied) == sorted(c.split("/")[1] for c in CHILDREN)
    order = [w.name.split("/")[0] for w in ours]
    first = [i for i, plural in enumerate(order) if plural in ("serviceaccounts", "roles")]
    assert len(first) == 2 and max(first) < min(order.index("rolebindings"), order.index("deployments"))
    assert most[0] > 1  # the applies of a group overlapped
    assert set(harness.children()) == CHILDREN
    assert harness.service()["status"]["observedGeneration"] == 1


async def test_create_applies_every_child_with_an_owner_reference(harness: Harness) -> None:
    uid = str(harness.api.put_object(ISVC, example())["metadata"]["uid"])

    outcome, found = await harness.reconcile()

    assert sorted(name for _, _, name in outcome.applied) == sorted(c.split("/")[1] for c in CHILDREN)
    # every child created, never applied: a create cannot change an object that exists
    assert created(found) == CHILDREN
    assert sorted(w.name for w in found if w.field_manager == FIELD_MANAGER) == sorted(CHILDREN)  # once each
    assert not [w for w in found if w.method in ("PUT", "DELETE")]
    assert {w.name for w in found if w.method == "PATCH"} == {STATUS} | {
        f"deployments/{NAME}-{role}" for role in ("prefill", "decode")}  # and the autoscaler's initial count
    assert [w.name for w in found if w.name == STATUS] == [STATUS]

    live = harness.children()
    assert set(live) == CHILDREN
    for key, obj in live.items():
        owners = obj["metadata"].get("ownerReferences", [])
        assert owners == [{
            "apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService", "name": NAME, "uid": uid,
            "controller": True, "blockOwnerDeletion": True,
        }], key
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "disagg", key

    status = harness.service()["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == f"http://{NAME}.{NAMESPACE}.svc:8000"
    assert {c["type"] for c in status["conditions"]} >= {
        "Ready", "PrefillReady", "DecodeReady", "RouterReady", "KVTransferReady"
    }
    assert [reason for _, reason, _ in harness.events].count("Created") == 1


# --- (b) unchanged resync -----------------------------------------------------------------------


async def test_unchanged_resync_writes_nothing(harness: Harness) -> None:
    await create_service(harness)
    before = harness.children()

    for _ in range(3):
        events = len(harness.events)
        outcome, found = await harness.reconcile()
        assert found == [], [f"{w.method} {w.path}" for w in found]
        assert outcome.applied == [] and outcome.deleted == [] and not outcome.status_written
        assert harness.events[events:] == []

    assert harness.children() == before


# --- (c) spec edits -----------------------------------------------------------------------------


async def test_pool_resources_edit_reapplies_only_that_pool(harness: Harness) -> None:
    # resources are outside the engines' revision: a compatible change rolls the pool in place
    await create_service(harness)
    before = harness.children()

    harness.edit({"decode": {"resources": {"requests": {"cpu": "12"}}}})
    outcome, found = await harness.reconcile()

    assert [(w.method, w.name, w.field_manager) for w in child_writes(found)] == [
        ("PATCH", f"deployments/{NAME}-decode", FIELD_MANAGER)
    ]
    assert [w.name for w in found if w.name == STATUS] == [STATUS]  # observedGeneration 1 -> 2
    assert outcome.applied == [("apps/v1", "Deployment", f"{NAME}-decode")]
    after = harness.children()
    containers = after[f"deployments/{NAME}-decode"]["spec"]["template"]["spec"]["containers"]
    assert containers[0]["resources"]["requests"]["cpu"] == "12"
    assert {k: v for k, v in after.items() if k != f"deployments/{NAME}-decode"} == {
        k: v for k, v in before.items() if k != f"deployments/{NAME}-decode"
    }
    assert harness.service()["status"]["observedGeneration"] == 2

    _, again = await harness.reconcile()
    assert again == []


async def test_engine_args_edit_creates_the_new_revisions_pools_beside_the_serving_ones(harness: Harness) -> None:
    # engine arguments are in the revision: the new pools come up in slot b, the serving ones stay untouched
    await create_service(harness)
    before = harness.children()

    harness.edit({"engine": {"extraArgs": ["--max-num-seqs", "128"]}})
    _, found = await harness.reconcile()

    new = {f"deployments/{NAME}--prefill-b", f"deployments/{NAME}--decode-b"}
    assert {w.name for w in child_writes(found) if w.field_manager == FIELD_MANAGER} == new
    after = harness.children()
    for role in ("prefill", "decode"):
        args = after[f"deployments/{NAME}--{role}-b"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[-2:] == ["--max-num-seqs", "128"]
        assert after[f"deployments/{NAME}-{role}"] == before[f"deployments/{NAME}-{role}"]
    assert after[f"deployments/{NAME}-router"] == before[f"deployments/{NAME}-router"]


async def test_removed_field_is_removed_from_the_child(harness: Harness) -> None:
    # The live object still carries every remaining desired field, so only the applied-hash
    # annotation can tell that something went away; the apply then drops the field.
    await create_service(harness)

    harness.edit({"decode": {"resources": {"requests": {"cpu": None}}}})
    _, found = await harness.reconcile()

    assert [(w.method, w.name) for w in child_writes(found)] == [("PATCH", f"deployments/{NAME}-decode")]
    container = harness.children()[f"deployments/{NAME}-decode"]["spec"]["template"]["spec"]["containers"][0]
    assert "cpu" not in container["resources"]["requests"]
    assert container["resources"]["requests"]["memory"] == "128Gi"


async def test_hand_edit_of_a_child_is_repaired(harness: Harness) -> None:
    await create_service(harness)
    harness.api.objects[SERVICES, NAMESPACE, f"{NAME}--metrics"].patch(
        {"metadata": {"labels": {"app.kubernetes.io/part-of": "something-else"}}}
    )

    _, found = await harness.reconcile()

    assert [(w.method, w.name) for w in child_writes(found)] == [("PATCH", f"services/{NAME}--metrics")]
    assert harness.children()[f"services/{NAME}--metrics"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == (
        "disagg")


# --- (d) pruning --------------------------------------------------------------------------------


def stale_service(name: str, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "labels": {"disagg.dev/service": NAME, "app.kubernetes.io/managed-by": "disagg"},
    }
    if owner_uid is not None:
        meta["ownerReferences"] = [{
            "apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService", "name": NAME,
            "uid": owner_uid, "controller": True, "blockOwnerDeletion": True,
        }]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": [{"port": 1}]}}


async def test_child_no_longer_desired_is_deleted_and_others_left_alone(harness: Harness) -> None:
    uid = await create_service(harness)
    stale = harness.api.put_object(SERVICES, stale_service(f"{NAME}-old", uid))
    harness.api.put_object(SERVICES, stale_service(f"{NAME}-foreign", "some-other-uid"))
    harness.api.put_object(SERVICES, stale_service(f"{NAME}-unowned", None))

    outcome, found = await harness.reconcile()

    assert [(w.method, w.name) for w in found] == [("DELETE", f"services/{NAME}-old")]
    assert found[0].body["preconditions"] == {"uid": stale["metadata"]["uid"]}
    assert outcome.deleted == [("v1", "Service", f"{NAME}-old")]
    assert harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}-old") is None
    assert harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}-foreign") is not None
    assert harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}-unowned") is not None
    assert ("Normal", "Pruned", f"deleted children no longer in the spec: Service/{NAME}-old") in harness.events

    _, again = await harness.reconcile()
    assert again == []


async def test_metrics_service_of_an_earlier_version_is_replaced_by_a_headless_one(harness: Harness) -> None:
    # Earlier versions served the router's metrics from `<name>-router` with a cluster IP (immutable,
    # so it cannot become headless in place); upgrading must not leave it behind.
    uid = await create_service(harness)
    earlier = stale_service(f"{NAME}-router", uid)
    earlier["spec"] = {"type": "ClusterIP", "clusterIP": "10.96.0.10", "ports": [{"name": "metrics", "port": 9000}]}
    harness.api.put_object(SERVICES, earlier)

    _, found = await harness.reconcile()

    assert [(w.method, w.name) for w in found] == [("DELETE", f"services/{NAME}-router")]
    metrics = harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}--metrics")
    assert metrics is not None and metrics["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]


# --- (e) invalid edit ---------------------------------------------------------------------------


async def test_invalid_edit_sets_invalid_spec_and_leaves_children_alone(harness: Harness) -> None:
    await create_service(harness)
    before = harness.children()
    events = len(harness.events)

    harness.edit({"decode": {"accelerator": {"type": "nvidia-h999"}}})
    outcome, found = await harness.reconcile()

    assert [(w.method, w.name, w.content_type) for w in found] == [
        ("PATCH", STATUS, "application/merge-patch+json")
    ]
    assert outcome.invalid is not None and "spec.decode.accelerator.type" in outcome.invalid
    assert harness.children() == before
    status = harness.service()["status"]
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "InvalidSpec", 2)
    assert "spec.decode.accelerator.type" in ready["message"] and "nvidia-h200" in ready["message"]
    assert status["observedGeneration"] == 2
    warnings = [e for e in harness.events[events:] if e[:2] == ("Warning", "InvalidSpec")]
    assert len(warnings) == 1 and "spec.decode.accelerator.type" in warnings[0][2]

    # Resyncing the same invalid spec: no write, no second event.
    events = len(harness.events)
    _, again = await harness.reconcile()
    assert again == [] and harness.events[events:] == []

    # Fixing it: the children were never touched, so only the status changes back.
    harness.edit({"decode": {"accelerator": {"type": "nvidia-h200"}}})
    _, fixed = await harness.reconcile()
    assert [w.name for w in fixed] == [STATUS]
    assert condition(harness.service()["status"], "Ready")["reason"] != "InvalidSpec"
    assert harness.children() == before


# --- (f) autoscaled pools -----------------------------------------------------------------------


async def test_autoscaled_pool_replicas_belong_to_the_autoscaler(harness: Harness) -> None:
    harness.api.put_object(ISVC, example())
    _, found = await harness.reconcile()

    for role in ("prefill", "decode"):
        path = f"deployments/{NAME}-{role}"
        mine = [w for w in found if w.name == path and w.field_manager == FIELD_MANAGER and w.method == "POST"]
        scaler = [w for w in found if w.name == path and w.field_manager == AUTOSCALER_FIELD_MANAGER]
        assert len(mine) == 1 and "replicas" not in mine[0].body["spec"]
        assert len(scaler) == 1 and scaler[0].body["spec"] == {"replicas": 2}
        assert found.index(mine[0]) < found.index(scaler[0])  # the object exists before it is scaled
        live = harness.children()[path]
        assert live["spec"]["replicas"] == 2
        assert managers_of_replicas(live) == {AUTOSCALER_FIELD_MANAGER}
    router = [w for w in found if w.name == f"deployments/{NAME}-router"]
    assert [w.body["spec"]["replicas"] for w in router] == [2]  # a fixed count stays the operator's

    # The autoscaler moves decode to 5; an edit re-applies the pool but never writes its replicas.
    await asyncio.to_thread(harness.kube.scale, NAMESPACE, f"{NAME}-decode", 5, AUTOSCALER_FIELD_MANAGER)
    harness.edit({"decode": {"resources": {"requests": {"cpu": "12"}}}})
    _, found = await harness.reconcile()
    decode = [w for w in child_writes(found) if w.name == f"deployments/{NAME}-decode"]
    assert [(w.field_manager, "replicas" in w.body["spec"]) for w in decode] == [(FIELD_MANAGER, False)]
    assert harness.children()[f"deployments/{NAME}-decode"]["spec"]["replicas"] == 5
    assert harness.service()["status"]["decode"]["replicas"] == 5


async def test_pools_starting_at_one_replica_are_created_without_a_scale_write_and_still_follow_the_autoscaler(
    harness: Harness,
) -> None:
    service = example()
    for role in ("prefill", "decode"):
        service["spec"][role]["replicas"] = 1  # the API server's default
    harness.api.put_object(ISVC, service)
    _, found = await harness.reconcile()
    assert applied(found, AUTOSCALER_FIELD_MANAGER) == set()  # 2 writes fewer per new service
    _, again = await harness.reconcile()
    assert [w.name for w in again if "deployments/" in w.name] == []  # and none later

    # `kubectl scale` of a field nobody owns records no owner (measured on the local cluster): kept
    prefill = harness.children()[f"deployments/{NAME}-prefill"]
    prefill["spec"]["replicas"] = 3
    harness.api.put_object(DEPLOYMENTS, prefill)
    _, held = await harness.reconcile()
    assert [w.name for w in held if "deployments/" in w.name] == []
    assert harness.children()[f"deployments/{NAME}-prefill"]["spec"]["replicas"] == 3

    await asyncio.to_thread(harness.kube.scale, NAMESPACE, f"{NAME}-decode", 3, AUTOSCALER_FIELD_MANAGER)
    harness.edit({"decode": {"resources": {"requests": {"cpu": "12"}}}})  # an apply that omits replicas
    _, edited = await harness.reconcile()
    assert f"deployments/{NAME}-decode" in applied(edited)
    live = harness.children()[f"deployments/{NAME}-decode"]
    assert live["spec"]["replicas"] == 3
    assert managers_of_replicas(live) == {AUTOSCALER_FIELD_MANAGER}


async def test_turning_autoscaling_on_hands_replicas_over_without_a_reset(harness: Harness) -> None:
    manifest = example()
    del manifest["spec"]["decode"]["autoscaling"]
    await create_service(harness, manifest)
    path = f"deployments/{NAME}-decode"
    assert managers_of_replicas(harness.children()[path]) == {FIELD_MANAGER}
    await asyncio.to_thread(harness.kube.scale, NAMESPACE, f"{NAME}-decode", 3, AUTOSCALER_FIELD_MANAGER)

    harness.edit({"decode": {"autoscaling": {"minReplicas": 1, "maxReplicas": 16}}})
    _, found = await harness.reconcile()

    decode = [(w.field_manager, w.body["spec"].get("replicas")) for w in child_writes(found) if w.name == path]
    assert decode == [(FIELD_MANAGER, None)]
    live = harness.children()[path]
    assert live["spec"]["replicas"] == 3  # not reset to the default by the apply that dropped it
    assert managers_of_replicas(live) == {AUTOSCALER_FIELD_MANAGER}

    _, again = await harness.reconcile()
    assert again == []


async def test_turning_autoscaling_on_keeps_the_operators_count(harness: Harness) -> None:
    manifest = example()
    del manifest["spec"]["decode"]["autoscaling"]
    await create_service(harness, manifest)
    path = f"deployments/{NAME}-decode"

    harness.edit({"decode": {"autoscaling": {"minReplicas": 1, "maxReplicas": 16}}})
    _, found = await harness.reconcile()

    decode = [(w.field_manager, w.body["spec"].get("replicas")) for w in child_writes(found) if w.name == path]
    assert decode == [(AUTOSCALER_FIELD_MANAGER, 2), (FIELD_MANAGER, None)]  # handover first
    live = harness.children()[path]
    assert live["spec"]["replicas"] == 2
    assert managers_of_replicas(live) == {AUTOSCALER_FIELD_MANAGER}


def test_example_is_the_one_the_counts_assume() -> None:
    spec = example()["spec"]
    assert (spec["prefill"]["replicas"], spec["decode"]["replicas"], spec["router"]["replicas"]) == (2, 2, 2)
    assert spec["prefill"]["autoscaling"] and spec["decode"]["autoscaling"]


# --- pods are listed only when there are pods to explain a shortfall with ----------------------


async def test_a_new_service_lists_no_pods_and_a_pool_short_of_pods_it_made_says_why(harness: Harness) -> None:
    def pod_lists(mark: int) -> int:
        return sum(1 for r in harness.api.requests_since(mark)
                   if str(r.method.value).upper() == "GET" and r.url.path.endswith("/pods"))

    mark = harness.api.mark()
    await create_service(harness)
    # nothing is ready yet, but the Deployments' controller has not made any pod to look at: a cold start
    # of 1,000 services would list 3,000 empty selections
    assert pod_lists(mark) == 0
    assert condition(harness.service()["status"], "PrefillReady")["status"] == "False"

    # the controller made the prefill pod; the scheduler cannot place it
    obj = harness.api.objects[kmock.resource(DEPLOYMENTS), NAMESPACE, f"{NAME}-prefill"]
    obj.patch({"status": {"observedGeneration": obj.raw["metadata"]["generation"], "replicas": 1,
                          "readyReplicas": 0, "updatedReplicas": 1}})
    labels = obj.raw["spec"]["template"]["metadata"]["labels"]
    harness.api.put_object("v1/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{NAME}-prefill-abc", "namespace": NAMESPACE, "labels": labels},
        "status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]},
    })
    mark = harness.api.mark()
    await harness.reconcile()
    assert pod_lists(mark) == 1  # the prefill pool's; decode and router still have no pods
    prefill = condition(harness.service()["status"], "PrefillReady")
    assert (prefill["reason"], prefill["message"].split(":")[0]) == ("Unschedulable", "1 of 2 pods cannot be scheduled")


# --- (g) names held by objects this service does not own ----------------------------------------


def foreign_service(name: str, labels: dict[str, str] | None = None, owner: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "labels": labels or {"app": "someone-elses"}}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService",
                                    "name": "other", "uid": owner, "controller": True}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.7.7", "ports": [{"name": "web", "port": 80}]}}


@pytest.mark.parametrize("labelled", [False, True], ids=["unlabelled", "labelled-as-ours-owned-by-another"])
async def test_an_object_holding_a_childs_name_is_left_untouched_and_reported(harness: Harness, labelled: bool) -> None:
    # labelled: what the old naming scheme left behind (Service/a-metrics of `a`, taken over by `a-metrics`)
    labels = {"disagg.dev/service": NAME, "app.kubernetes.io/managed-by": "disagg"} if labelled else None
    foreign = harness.api.put_object(SERVICES, foreign_service(f"{NAME}--metrics", labels, "uid-of-another"))
    harness.api.put_object(ISVC, example())

    outcome, found = await harness.reconcile()

    assert harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}--metrics") == foreign, "the object was changed"
    assert not [w for w in found if w.name == f"services/{NAME}--metrics" and w.method != "POST"]
    assert set(harness.children()) == CHILDREN, "the other children are reconciled all the same"
    assert [(c.kind, c.name) for c in outcome.conflicts] == [("Service", f"{NAME}--metrics")]
    ready = condition(harness.service()["status"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ChildConflict")
    assert f"Service/{NAME}--metrics" in ready["message"] and "uid-of-another" in ready["message"], ready
    warnings = [e for e in harness.events if e[:2] == ("Warning", "ChildConflict")]
    assert len(warnings) == 1 and f"Service/{NAME}--metrics" in warnings[0][2]

    # again: still untouched, no second Event
    _, again = await harness.reconcile()
    assert harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}--metrics") == foreign
    assert not [w for w in again if w.method in ("PATCH", "PUT", "DELETE") and "--metrics" in w.name]
    assert len([e for e in harness.events if e[1] == "ChildConflict"]) == 1

    # the object goes: the child is created, the conflict is over
    del harness.api.objects[SERVICES, NAMESPACE, f"{NAME}--metrics"]
    outcome, _ = await harness.reconcile()
    assert outcome.conflicts == []
    assert harness.children()[f"services/{NAME}--metrics"]["metadata"]["ownerReferences"][0]["name"] == NAME
    assert condition(harness.service()["status"], "Ready")["reason"] != "ChildConflict"


async def test_a_foreign_deployment_with_a_pools_name_is_never_scaled_or_applied(harness: Harness) -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": f"{NAME}-decode", "namespace": NAMESPACE, "labels": {"app": "mine"}},
                  "spec": {"replicas": 7, "selector": {"matchLabels": {"app": "mine"}},
                           "template": {"metadata": {"labels": {"app": "mine"}},
                                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
    foreign = harness.api.put_object(DEPLOYMENTS, deployment)
    harness.api.put_object(ISVC, example())

    outcome, found = await harness.reconcile()

    assert harness.api.get_object(DEPLOYMENTS, NAMESPACE, f"{NAME}-decode") == foreign
    assert [w.method for w in found if w.name == f"deployments/{NAME}-decode"] == ["POST"]  # refused: 409
    assert [(c.kind, c.name) for c in outcome.conflicts] == [("Deployment", f"{NAME}-decode")]
    status = harness.service()["status"]
    assert condition(status, "Ready")["reason"] == "ChildConflict"
    assert condition(status, "DecodeReady")["reason"] == "NotCreated", "the foreign Deployment is not the pool"
    assert "it has no owner" in condition(status, "Ready")["message"]


async def test_an_own_child_whose_labels_were_removed_is_repaired_not_reported(harness: Harness) -> None:
    await create_service(harness)
    obj = harness.api.get_object(SERVICES, NAMESPACE, f"{NAME}--decode-kv")
    assert obj is not None
    obj["metadata"]["labels"] = {}  # no longer found by its labels
    harness.api.objects[SERVICES, NAMESPACE, f"{NAME}--decode-kv"] = obj

    outcome, found = await harness.reconcile()

    assert outcome.conflicts == []
    assert [w.method for w in found if w.name == f"services/{NAME}--decode-kv"][-1] == "PATCH"
    labels = harness.children()[f"services/{NAME}--decode-kv"]["metadata"]["labels"]
    assert labels["disagg.dev/service"] == NAME


async def test_the_first_apply_after_a_create_claims_the_created_fields_once(harness: Harness) -> None:
    # A create records the fields as the operator's Update; without the claim, an apply could never
    # remove a field the create had set (it is still "owned" by the Update).
    await create_service(harness)
    toleration = {"key": "example.com/spot", "operator": "Exists"}
    harness.edit({"prefill": {"tolerations": [toleration]}, "decode": {"tolerations": [toleration]}})
    _, found = await harness.reconcile()
    claims = [w.name for w in found if claim(w)]
    assert sorted(claims) == [f"deployments/{NAME}-decode", f"deployments/{NAME}-prefill"]
    managers = {(e["manager"], e["operation"]) for e in
                harness.children()[f"deployments/{NAME}-decode"]["metadata"]["managedFields"]}
    assert (FIELD_MANAGER, "Update") not in managers and (FIELD_MANAGER, "Apply") in managers

    harness.edit({"prefill": {"tolerations": []}, "decode": {"tolerations": []}})
    _, found = await harness.reconcile()
    assert not [w for w in found if claim(w)], "claimed once"
    tolerations = harness.children()[f"deployments/{NAME}-decode"]["spec"]["template"]["spec"]["tolerations"]
    assert toleration not in tolerations


async def test_an_apply_reaches_only_the_object_it_was_planned_for(harness: Harness) -> None:
    # between the watch's view and the write the Service was replaced by someone else's: the apply
    # carries the uid it saw, the API server refuses it, and the service reports the conflict
    uid = await create_service(harness)
    harness.edit({"router": {"port": 8080}})
    mine = harness.api.get_object(SERVICES, NAMESPACE, NAME)
    assert mine is not None
    live = {("v1", "Service", NAME): mine}
    del harness.api.objects[SERVICES, NAMESPACE, NAME]
    replaced = harness.api.put_object(SERVICES, foreign_service(NAME))
    reconciler = harness.reconciler
    reconciler.live_children = lambda ns, name: {
        **{k: v for k, v in _live_by_label(harness).items() if k[2] != NAME or k[1] != "Service"}, **live}

    outcome = await asyncio.to_thread(reconcile_service, reconciler, harness.service())

    assert harness.api.get_object(SERVICES, NAMESPACE, NAME) == replaced
    assert [(c.kind, c.name) for c in outcome.conflicts] == [("Service", NAME)]
    assert uid


def _live_by_label(harness: Harness) -> dict[tuple[str, str, str], dict[str, Any]]:
    from disagg.reconcile.run import live_children

    return live_children(harness.kube, NAMESPACE, NAME)


async def test_services_whose_names_collided_before_both_get_every_child(harness: Harness) -> None:
    # `a` and `a-metrics` both rendered Service/a-metrics (and `a` and `a-prefill` would share
    # Service/a-prefill-kv): with `<name>--<part>` every child of each is its own
    names = ["a", "a-metrics", "a-prefill", "a-decode-kv", "a-router"]
    for name in names:
        manifest = example()
        manifest["metadata"]["name"] = name
        harness.api.put_object(ISVC, manifest)
    owners: dict[str, str] = {}
    for name in names:
        body = harness.api.get_object(ISVC, NAMESPACE, name)
        assert body is not None
        outcome = await asyncio.to_thread(reconcile_service, harness.reconciler, body)
        assert outcome.conflicts == [] and len(outcome.applied) == len(CHILDREN), name
    for key, obj in harness.children().items():
        refs = obj["metadata"]["ownerReferences"]
        assert len(refs) == 1
        owners[key] = refs[0]["name"]
    assert len(owners) == len(names) * len(CHILDREN)
    assert owners["services/a-metrics"] == "a-metrics" and owners["services/a--metrics"] == "a"
