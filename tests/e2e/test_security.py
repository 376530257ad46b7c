"""Security edges on the real local cluster (issue 18): children that cannot collide or take over an
object they do not own, and engine pods under Pod Security admission.

Each test runs its own operator (`disagg run -n <ns>`) under the session's ServiceAccount, as in
test_operator.py; the namespaces are isolated from other operators by the session's admission policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client as kclient
from operator_support import (
    SERVICE_LABEL,
    Cluster,
    E2ESession,
    Kubectl,
    Operators,
    bin_dir,
    condition,
    disagg_cli,
    dump,
    is_ready,
    isolate,
    key,
    operator_session,
    operators_of,
    wait_until,
)

if TYPE_CHECKING:
    from conftest import LocalCluster

pytestmark = pytest.mark.e2e

RESYNC_S = 5.0
READY_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, kube_api: kclient.ApiClient,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ESession]:
    kubectl = Kubectl(bin_dir() / "kubectl", cluster.kubeconfig)
    with operator_session(kubectl, Cluster(kube_api), tmp_path_factory.mktemp("security-e2e"), "sec") as session:
        yield session


@pytest.fixture
def ns(env: E2ESession, e2e_namespace: str) -> str:
    isolate(env.kubectl, env.session, e2e_namespace)
    return e2e_namespace


@pytest.fixture
def operators(env: E2ESession, ns: str, request: pytest.FixtureRequest) -> Iterator[Operators]:
    with operators_of(env, request.node.name, RESYNC_S) as ops:
        yield ops


def small_service(name: str, namespace: str, rdma: bool = False) -> dict[str, Any]:
    """One prefill and one decode worker: the least the cluster has to schedule."""
    spec: dict[str, Any] = {
        "model": {"name": "tiny", "uri": "hf://example/tiny"},
        "prefill": {"accelerator": {"type": "nvidia-h100", "count": 1}},
        "decode": {"accelerator": {"type": "nvidia-h200", "count": 1}},
    }
    if rdma:
        spec["engine"] = {"kind": "sglang"}
        spec["kvTransfer"] = {"connector": "mooncake", "rdma": {"resource": "rdma/ib", "count": 1}}
    return {"apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def wait_ready(env: E2ESession, ops: Operators, namespace: str, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        svc = env.cluster.service(namespace, name)
        return svc if is_ready(svc) else None

    return wait_until(ready, READY_TIMEOUT_S, f"{namespace}/{name} Ready=True", ops.diagnostics())


def events(env: E2ESession, namespace: str, name: str, reason: str) -> list[Any]:
    found = env.cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=InferenceService").items
    return [e for e in found if e.reason == reason]


def service_state(env: E2ESession, namespace: str, name: str) -> dict[str, Any]:
    """What a takeover would change: everything but the server's read-only bookkeeping."""
    obj = env.cluster.api.sanitize_for_serialization(env.cluster.core.read_namespaced_service(name, namespace))
    assert isinstance(obj, dict)
    return obj


# ----------------------------------------------------------------------------------------------------
# 1. a child's name held by someone else's object


def test_an_existing_service_with_a_childs_name_survives_untouched(
    env: E2ESession, ns: str, operators: Operators
) -> None:
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "tiny--metrics", "namespace": ns, "labels": {"team": "payments"}},
               "spec": {"ports": [{"name": "web", "port": 80, "targetPort": 8080}], "selector": {"app": "payments"}}}
    env.kubectl("apply", "-f", "-", input=dump([foreign]))
    before = service_state(env, ns, "tiny--metrics")
    op = operators.start(ns)
    env.kubectl("apply", "-f", "-", input=dump([small_service("tiny", ns)]))

    def conflict() -> dict[str, Any]:
        svc = env.cluster.service(ns, "tiny")
        ready = condition(svc, "Ready") or {}
        assert (ready.get("status"), ready.get("reason")) == ("False", "ChildConflict"), ready
        assert "Service/tiny--metrics" in ready["message"], ready
        assert svc is not None
        return svc

    svc = wait_until(conflict, 60, "Ready=False ChildConflict naming Service/tiny--metrics", operators.diagnostics())
    assert "it has no owner" in (condition(svc, "Ready") or {})["message"]
    wait_until(lambda: [e for e in events(env, ns, "tiny", "ChildConflict") if e.type == "Warning"], 20,
               "a Warning Event ChildConflict", operators.diagnostics())
    # the other children are reconciled all the same: the pools run
    wait_until(lambda: (condition(env.cluster.service(ns, "tiny"), "PrefillReady") or {}).get("status") == "True"
               and (condition(env.cluster.service(ns, "tiny"), "DecodeReady") or {}).get("status") == "True",
               READY_TIMEOUT_S, "both pools ready despite the conflict", operators.diagnostics())
    time.sleep(2 * RESYNC_S)  # resyncs: still untouched
    after = service_state(env, ns, "tiny--metrics")
    assert after == before, "the foreign Service changed:\n" + json.dumps({"before": before, "after": after})
    assert op.alive()

    env.kubectl("-n", ns, "delete", "service", "tiny--metrics")
    svc = wait_ready(env, operators, ns, "tiny")
    metrics = env.cluster.core.read_namespaced_service("tiny--metrics", ns)
    assert [r.uid for r in metrics.metadata.owner_references] == [svc["metadata"]["uid"]]


def test_services_whose_children_collided_under_the_old_names_both_become_ready(
    env: E2ESession, ns: str, operators: Operators
) -> None:
    operators.start(ns)
    env.kubectl("apply", "-f", "-", input=dump([small_service("a", ns)]))
    a = wait_ready(env, operators, ns, "a")
    # what the old naming left of `a`: its router-metrics Service `a-metrics`, labelled and owned as
    # the operator made it, which `a-metrics` would have taken over as its endpoint
    leftover = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "a-metrics", "namespace": ns,
                             "labels": {SERVICE_LABEL: "a", "app.kubernetes.io/managed-by": "disagg"},
                             "ownerReferences": [{"apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService",
                                                  "name": "a", "uid": a["metadata"]["uid"], "controller": True}]},
                "spec": {"clusterIP": "None", "selector": {SERVICE_LABEL: "a"}, "ports": [{"port": 29000}]}}
    env.kubectl("apply", "-f", "-", input=dump([leftover]))
    env.kubectl("apply", "-f", "-", input=dump([small_service("a-metrics", ns)]))

    both = wait_until(lambda: all(is_ready(env.cluster.service(ns, n)) for n in ("a", "a-metrics")),
                      READY_TIMEOUT_S + 2 * RESYNC_S, "a and a-metrics both Ready", operators.diagnostics())
    assert both
    uids = {n: (env.cluster.service(ns, n) or {})["metadata"]["uid"] for n in ("a", "a-metrics")}
    endpoint = env.cluster.core.read_namespaced_service("a-metrics", ns)
    assert endpoint.spec.cluster_ip not in (None, "None"), "a-metrics' endpoint has a cluster IP"
    assert [r.uid for r in endpoint.metadata.owner_references] == [uids["a-metrics"]]
    for name, uid in uids.items():
        children = env.cluster.children(ns, f"{SERVICE_LABEL}={name}")
        rendered = disagg_cli("render", "-f", "-", input=dump([small_service(name, ns)]))
        assert rendered.returncode == 0, rendered.stderr
        expected = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout) if d)
        assert sorted(key(c) for c in children) == expected, name
        for child in children:
            assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [uid], (name, key(child))


# ----------------------------------------------------------------------------------------------------
# 3. Pod Security admission


def test_engine_pods_run_in_a_namespace_enforcing_restricted_and_rdma_pods_say_why_they_cannot(
    env: E2ESession, ns: str, operators: Operators
) -> None:
    env.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
                "pod-security.kubernetes.io/enforce-version=latest", "--overwrite")
    operators.start(ns)
    env.kubectl("apply", "-f", "-", input=dump([small_service("plain", ns), small_service("rdma", ns, rdma=True)]))

    wait_ready(env, operators, ns, "plain")
    pods = env.cluster.pods(ns, f"{SERVICE_LABEL}=plain")
    assert {p.metadata.labels["disagg.dev/role"] for p in pods} == {"prefill", "decode", "router"}
    assert all(c.status == "True" for p in pods for c in p.status.conditions if c.type == "Ready")
    svc = env.cluster.service(ns, "plain")
    assert (condition(svc, "PodSecurity") or {}).get("status") == "True"

    def refused() -> dict[str, Any]:
        svc = env.cluster.service(ns, "rdma")
        prefill = condition(svc, "PrefillReady") or {}
        assert (prefill.get("status"), prefill.get("reason")) == ("False", "FailedCreate"), prefill
        assert "PodSecurity" in prefill["message"] and "restricted" in prefill["message"], prefill
        security = condition(svc, "PodSecurity") or {}
        assert (security.get("status"), security.get("reason")) == ("False", "RDMANeedsIPCLock"), security
        assert svc is not None
        return svc

    svc = wait_until(refused, 60, "rdma: PrefillReady=False FailedCreate by PodSecurity, PodSecurity=False",
                     operators.diagnostics())
    ready = condition(svc, "Ready") or {}
    assert ready["status"] == "False" and "PodSecurity" in ready["message"], ready
    assert "IPC_LOCK" in (condition(svc, "PodSecurity") or {})["message"]
    wait_until(lambda: [e for e in events(env, ns, "rdma", "RDMANeedsIPCLock") if e.type == "Warning"], 20,
               "a Warning Event RDMANeedsIPCLock", operators.diagnostics())
    assert env.cluster.pods(ns, f"{SERVICE_LABEL}=rdma,disagg.dev/role=prefill") == []
