"""A model-revision rollout through reconcile against an emulated API server, step by step: the new revision's
pools beside the serving ones, the routers switched only when both are ready, the old pools deleted once no
router selects them; status and Events at each step, and no write when nothing changed. Each reconcile here
builds a new Reconciler (no cache): an operator restarted at any step goes on from the live objects."""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from support.kmock import ApplyingEmulator
from support.kmock_harness import DEPLOYMENTS, NAME, NAMESPACE, Harness, child_writes, condition, create_service

pytestmark = pytest.mark.kmock(cls=ApplyingEmulator)
REVISION = "disagg.dev/revision"


def set_ready(harness: Harness, name: str, terminating: int = 0) -> None:
    """The Deployment controller's status of a rolled-out Deployment."""
    obj = harness.api.objects[kmock.resource(DEPLOYMENTS), NAMESPACE, name]
    replicas = obj.raw["spec"].get("replicas", 1)
    obj.patch({"status": {"observedGeneration": obj.raw["metadata"]["generation"], "replicas": replicas,
                          "readyReplicas": replicas, "updatedReplicas": replicas, "terminatingReplicas": terminating}})


def router_selects(harness: Harness) -> str:
    router = harness.children()[f"deployments/{NAME}-router"]
    args: list[str] = router["spec"]["template"]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"{REVISION}="))


def reasons(harness: Harness) -> list[str]:
    return [reason for _, reason, _ in harness.events]


async def test_a_model_revision_rollout_step_by_step(harness: Harness) -> None:
    await create_service(harness)
    for pool in ("prefill", "decode", "router"):
        set_ready(harness, f"{NAME}-{pool}")
    await harness.reconcile()
    old = harness.service()["status"]["revision"]
    assert router_selects(harness) == old
    status: dict[str, Any]

    # 1. the edit: slot b comes up at the serving size, the routers and the serving pools stay
    harness.edit({"model": {"revision": "v2"}})
    _, found = await harness.reconcile()
    created = {w.name for w in child_writes(found) if w.method == "POST"}
    assert created == {f"deployments/{NAME}--prefill-b", f"deployments/{NAME}--decode-b"}
    assert not [w for w in child_writes(found) if w.method in ("PATCH", "DELETE") and "-b" not in w.name]
    status = harness.service()["status"]
    new = status["rollout"]["to"]
    assert (status["revision"], status["rollout"]["from"], status["rollout"]["phase"]) == (old, old, "Starting")
    assert new != old and router_selects(harness) == old
    assert status["decode"]["workload"] == f"{NAME}-decode"
    assert harness.children()[f"deployments/{NAME}--decode-b"]["spec"]["replicas"] == 2
    assert "RolloutStarting" in reasons(harness)

    # 2. a restarted operator, nothing changed: no write at all
    _, again = await harness.reconcile()
    assert again == [], [(w.method, w.name) for w in again]

    # 3. one new pool ready: still Starting; both: the routers switch
    set_ready(harness, f"{NAME}--prefill-b")
    await harness.reconcile()
    assert router_selects(harness) == old and harness.service()["status"]["rollout"]["phase"] == "Starting"
    set_ready(harness, f"{NAME}--decode-b")
    _, found = await harness.reconcile()
    assert router_selects(harness) == new
    assert {w.name for w in child_writes(found)} == {f"deployments/{NAME}-router"}
    assert "RolloutSwitching" in reasons(harness)

    # 4. an old router pod still streams: the old pools stay
    set_ready(harness, f"{NAME}-router", terminating=1)
    _, found = await harness.reconcile()
    status = harness.service()["status"]
    assert (status["revision"], status["rollout"]["phase"]) == (new, "Draining")
    assert status["decode"]["workload"] == f"{NAME}--decode-b"
    assert not [w for w in child_writes(found) if w.method == "DELETE"]

    # 5. none left: the old pools are deleted and the rollout is over
    set_ready(harness, f"{NAME}-router")
    _, found = await harness.reconcile()
    assert {w.name for w in child_writes(found) if w.method == "DELETE"} == {
        f"deployments/{NAME}-prefill", f"deployments/{NAME}-decode"}
    status = harness.service()["status"]
    assert status["revision"] == new and "rollout" not in status
    assert condition(status, "Progressing")["reason"] == "RevisionServing"
    assert "RevisionServing" in reasons(harness)
    _, idle = await harness.reconcile()
    assert idle == []


async def test_a_rollout_whose_pods_cannot_be_scheduled_says_why_and_keeps_serving(harness: Harness) -> None:
    await create_service(harness)
    for pool in ("prefill", "decode", "router"):
        set_ready(harness, f"{NAME}-{pool}")
    await harness.reconcile()
    old = harness.service()["status"]["revision"]
    harness.edit({"model": {"revision": "v2"}})
    await harness.reconcile()

    # the new prefill pool's controller made its pods; the scheduler cannot place them
    obj = harness.api.objects[kmock.resource(DEPLOYMENTS), NAMESPACE, f"{NAME}--prefill-b"]
    obj.patch({"status": {"observedGeneration": obj.raw["metadata"]["generation"], "replicas": 2,
                          "readyReplicas": 0, "updatedReplicas": 2}})
    harness.api.put_object("v1/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{NAME}-prefill-b-abc", "namespace": NAMESPACE,
                     "labels": obj.raw["spec"]["template"]["metadata"]["labels"]},
        "status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]},
    })
    await harness.reconcile()
    status = harness.service()["status"]
    progressing = condition(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in progressing["message"] and old in progressing["message"]
    assert status["rollout"]["phase"] == "Blocked" and status["revision"] == old
    assert condition(status, "Ready")["status"] == "True", "the serving revision still serves"
    assert router_selects(harness) == old
    assert ("Warning", "Unschedulable") in [(kind, reason) for kind, reason, _ in harness.events]
