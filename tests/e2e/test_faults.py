"""Fault tests of the real operator on the local cluster (issue 7): what happens to it, and what it leaves
behind, when things go wrong around it.

Each test runs its own `disagg run` process(es) as in test_operator.py: namespaced to the test's namespace,
with a TokenRequest token of a ServiceAccount bound to the rules `disagg rbac` prints (session-specific
names), and this module's ValidatingAdmissionPolicy keeping every other operator on the shared cluster
from writing there (operator_support.isolation_policy).

The pools of the services here run on this module's own kwok nodes (`fault-<session>-<type>-<i>`, copies
of the cluster's accelerator nodes with the same labels and resources, plus the label and taint
`disagg.dev/fault-pool=<session>`, which the services select and tolerate; `disagg.dev/bench` keeps
test_cluster_smoke from counting them). So the tests neither depend on nor take the shared nodes' capacity,
the cordon test cordons only nodes no one else uses, and a pool that ignored its accelerator type would find
free accelerators of another type on those nodes.

In order (the API server restart goes last: it disturbs everyone using the cluster):
1. SIGKILL in the middle of a large reconcile (N_KILL services created at once), restart: converges with
   exactly the expected children, no duplicates, no orphans, every pool at its expected size, all Ready.
   Restarted (SIGTERM) over N_MANY settled services: it takes them all up, writes nothing, applies an edit.
2. Hand edits of children (a Deployment's image, a Service's labels, replicas of a fixed pool) are reverted
   within the resync period; an autoscaled pool scaled by hand is held at that count (no Prometheus:
   the policy holds the current count clamped into min/max) and clamped back when outside the bounds.
3. Every node of the decode pool's accelerator type cordoned: new pods stay Pending rather than land on
   another type; DecodeReady=False/Unschedulable with counts; uncordoned: they schedule.
4. Two operators peering: only the active one acts; SIGKILL it and the standby takes over; the takeover
   time (kill -> the standby's apply of a change made right after the kill) is measured and printed.
5. 500+ hypothesis-generated invalid or extreme services (derandomized; two in three broken by one of
   MUTATIONS in turn), created 8 at a time: each is refused by the API server (schema, CEL, strict field
   validation: 400/422 with a message) or gets Ready from the operator, with reason InvalidSpec naming the
   field (the same message as `disagg validate`, or the API server's refusal of a child) or a known
   reason; the operator never crashes, and once settled it re-applies nothing. A ResourceQuota keeps the
   valid services' huge pools from getting ReplicaSets or pods.
6. The API server restarted under the running operator: it recovers by itself (same process, its watches,
   not a resync) and catches up on an edit and a new service made right after.

Prometheus down/up (ScalingActive) is covered by test_autoscaling.py (with the simulated fleet).
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client as kclient

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.engines import ENGINES
from disagg.render import render_service
from support.operators import (
    GROUP,
    MANAGED_BY_SELECTOR,
    PLURAL,
    ROLE_LABEL,
    SERVICE_LABEL,
    VERSION,
    Cluster,
    E2ESession,
    Kubectl,
    OperatorProcess,
    Operators,
    bin_dir,
    condition,
    dump,
    expected_replicas,
    is_ready,
    isolate,
    key,
    operator_session,
    operators_of,
    wait_until,
)
from support.paths import REPO

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

PEERING_CRDS = REPO / "charts" / "disagg-operator" / "crds" / "kopf.dev_peerings.yaml"
RESYNC_S = 5.0
POOL_LABEL = "disagg.dev/fault-pool"
BENCH_LABEL = "disagg.dev/bench"
"""test_cluster_smoke ignores nodes with this label (bench/scale.py adds its nodes with it too)."""
FAULT_NODES = {"nvidia-h100": 5, "nvidia-h200": 5, "nvidia-b200": 2}
N_KILL = 24
N_MANY = 40
"""More InferenceServices (and 3x as many Deployments) than kopf ran workers before (4 x 8)."""
PEER_LIFETIME_S = 15.0
N_GENERATED = 510
KNOWN_REASONS = {
    "Serving", "NotCreated", "NoReplicasReady", "ReplicasNotReady", "RollingOut", "ScaledToZero", "Unschedulable",
    "ServicesMissing", "NoPeers",
}


# ----------------------------------------------------------------------------------------------------
# environment: operator identity, isolation, CRDs, this module's nodes


@dataclass(frozen=True)
class FaultEnv(E2ESession):
    nodes: dict[str, list[str]]
    """Accelerator type -> this module's nodes of that type."""


def fault_node(template: Any, name: str, session: str) -> dict[str, Any]:
    """A kwok node like `template` (labels, taints, resources), selectable and tainted as this module's."""
    labels = {**(template.metadata.labels or {}), "kubernetes.io/hostname": name, POOL_LABEL: session,
              BENCH_LABEL: "faults"}
    taints = [{"key": t.key, "value": t.value, "effect": t.effect} for t in template.spec.taints or []]
    taints.append({"key": POOL_LABEL, "value": session, "effect": "NoSchedule"})
    resources = dict(template.status.allocatable)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"}},
        "spec": {"taints": taints},
        "status": {"capacity": resources, "allocatable": resources, "phase": "Running",
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake",
                                "kubeProxyVersion": "fake", "bootID": "", "containerRuntimeVersion": "",
                                "kernelVersion": "", "machineID": "", "osImage": "", "systemUUID": ""}},
    }


def node_ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


@pytest.fixture(scope="module")
def env(
    cluster: LocalCluster, kube_api: kclient.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultEnv]:
    kubectl = Kubectl(bin_dir() / "kubectl", cluster.kubeconfig)
    workdir = tmp_path_factory.mktemp("faults-e2e")
    api = Cluster(kube_api)
    crds = kubectl("get", "crd", "-o", "name").stdout.split()
    if not {"customresourcedefinition.apiextensions.k8s.io/kopfpeerings.kopf.dev",
            "customresourcedefinition.apiextensions.k8s.io/clusterkopfpeerings.kopf.dev"} <= set(crds):
        kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s", timeout=90)
    for node in api.core.list_node(label_selector=f"{BENCH_LABEL}=faults").items:
        # left by a run that could not clean up (killed): an hour is longer than any run
        if time.time() - node.metadata.creation_timestamp.timestamp() > 3600:
            kubectl("delete", "node", node.metadata.name, "--wait=false", check=False)
    with operator_session(kubectl, api, workdir, "faults") as base:
        try:
            yield base.extended(FaultEnv, nodes=add_fault_nodes(api, kubectl, base.session))
        finally:
            kubectl("delete", "nodes", "-l", f"{POOL_LABEL}={base.session}", "--wait=false", check=False)


def add_fault_nodes(api: Cluster, kubectl: Kubectl, session: str) -> dict[str, list[str]]:
    """FAULT_NODES copies of the cluster's accelerator nodes, selectable and tainted as this module's;
    returns their names per accelerator type once all are Ready."""
    nodes: dict[str, list[str]] = {}
    for acc_type, count in FAULT_NODES.items():
        accelerator = DEFAULT_CATALOG[acc_type]
        selector = ",".join(f"{k}={v}" for k, v in accelerator.node_labels.items())
        templates = [n for n in api.core.list_node(label_selector=selector).items
                     if BENCH_LABEL not in (n.metadata.labels or {})
                     and accelerator.resource_name in (n.status.allocatable or {})]
        assert templates, f"no {acc_type} node in the cluster to copy"
        nodes[acc_type] = [f"fault-{session}-{acc_type}-{i}" for i in range(count)]
        for name in nodes[acc_type]:
            api.core.create_node(fault_node(templates[0], name, session))

    def all_ready() -> bool:
        listed = api.core.list_node(label_selector=f"{POOL_LABEL}={session}").items
        assert sum(map(node_ready, listed)) == sum(FAULT_NODES.values()), [
            (n.metadata.name, node_ready(n)) for n in listed]
        return True

    wait_until(all_ready, 60, "this module's kwok nodes to be Ready",
               lambda: kubectl.text("get", "nodes", "-l", f"{POOL_LABEL}={session}"))
    return nodes


@pytest.fixture
def ns(env: FaultEnv, e2e_namespace: str) -> str:
    """The test's namespace, under this module's isolation policy (checked before it is used)."""
    isolate(env.kubectl, env.session, e2e_namespace)
    return e2e_namespace


@pytest.fixture
def operators(env: FaultEnv, ns: str, request: pytest.FixtureRequest) -> Iterator[Operators]:
    with operators_of(env, request.node.name, RESYNC_S) as ops:
        yield ops


# ----------------------------------------------------------------------------------------------------
# helpers


def pool(env: FaultEnv, acc_type: str, replicas: int = 1, count: int = 1,
         autoscaling: tuple[int, int] | None = None) -> dict[str, Any]:
    """A pool on this module's nodes of `acc_type`."""
    spec: dict[str, Any] = {
        "replicas": replicas,
        "accelerator": {"type": acc_type, "count": count},
        "nodeSelector": {POOL_LABEL: env.session},
        "tolerations": [{"key": POOL_LABEL, "operator": "Equal", "value": env.session, "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
    }
    if autoscaling is not None:
        spec["autoscaling"] = {"minReplicas": autoscaling[0], "maxReplicas": autoscaling[1]}
    return spec


def service(name: str, namespace: str, prefill: dict[str, Any], decode: dict[str, Any],
            router_replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "tiny", "uri": "hf://example/tiny"},
            "router": {"replicas": router_replicas},
            "prefill": prefill,
            "decode": decode,
        },
    }


def expected_children(manifest: dict[str, Any]) -> set[tuple[str, str]]:
    return {key(m) for m in render_service(copy.deepcopy(manifest), DEFAULT_CATALOG)}


def expected_pools(manifest: dict[str, Any]) -> dict[str, int]:
    spec = manifest["spec"]
    want = {role: expected_replicas(spec[role]) for role in ("prefill", "decode")}
    want["router"] = int((spec.get("router") or {}).get("replicas", 1))
    return want


def deployment(env: FaultEnv, namespace: str, name: str) -> Any:
    return env.cluster.apps.read_namespaced_deployment(name, namespace)


def replicas_owner(dep: Any) -> list[str]:
    """Field managers that own a Deployment's spec.replicas."""
    return [entry.manager for entry in dep.metadata.managed_fields or []
            if "f:replicas" in ((entry.fields_v1 or {}).get("f:spec") or {})]


def wait_all_ready(env: FaultEnv, ops: Operators, namespace: str, names: set[str], timeout: float) -> None:
    def ready() -> bool:
        services = {s["metadata"]["name"]: s for s in env.cluster.services(namespace)}
        waiting = sorted(n for n in names if not is_ready(services.get(n)))
        assert not waiting, f"{len(waiting)} not Ready yet, e.g. {waiting[:5]}: " + "; ".join(
            f"{n}: {(condition(services.get(n), 'Ready') or {}).get('message')}" for n in waiting[:3])
        return True

    wait_until(ready, timeout, f"{len(names)} InferenceServices Ready=True", ops.diagnostics(), interval=1.0)


def wait_condition(env: FaultEnv, ops: Operators, namespace: str, name: str, ctype: str, status: str,
                   reason: str, timeout: float) -> dict[str, Any]:
    def matches() -> dict[str, Any]:
        svc = env.cluster.service(namespace, name)
        cond = condition(svc, ctype)
        assert cond is not None and (cond["status"], cond["reason"]) == (status, reason), cond
        assert svc is not None
        return svc

    return wait_until(matches, timeout, f"{namespace}/{name} {ctype}={status} reason {reason}", ops.diagnostics())


def no_crash(op: OperatorProcess, pid: int | None = None) -> None:
    """The process is the same one, alive and live, and no reconcile crashed."""
    assert op.alive(), f"operator {op.name} exited with {op.proc and op.proc.returncode}\n{op.log_tail()}"
    if pid is not None:
        assert op.pid == pid
    assert op.healthz() == 200, f"/healthz of {op.name}: {op.healthz()}\n{op.log_tail()}"
    errors = op.metric("disagg_reconciles_total", "result").get("error", 0.0)
    crashed = [line for line in op.log_text().splitlines() if "crashed" in line or "Traceback" in line]
    assert errors == 0 and not crashed, f"{errors:.0f} crashed reconciles: {crashed[:5]}\n{op.log_tail(80)}"


# ----------------------------------------------------------------------------------------------------
# 1. SIGKILL in the middle of a large reconcile


def kill_fleet(env: FaultEnv, namespace: str) -> list[dict[str, Any]]:
    """N_KILL small services; every other one with autoscaled pools created at 2 replicas (the initial
    count of an autoscaled pool is set in a second step after the Deployment is created)."""
    out = []
    for i in range(N_KILL):
        if i % 2:
            prefill = pool(env, "nvidia-h100", replicas=2, autoscaling=(1, 3))
            decode = pool(env, "nvidia-h200", replicas=1)
        else:
            prefill = pool(env, "nvidia-h100", replicas=1)
            decode = pool(env, "nvidia-h200", replicas=2, autoscaling=(1, 2))
        out.append(service(f"kill-{i:02d}", namespace, prefill, decode))
    return out


def children_by_service(env: FaultEnv, namespace: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for child in env.cluster.children(namespace):
        out.setdefault((child["metadata"].get("labels") or {}).get(SERVICE_LABEL, ""), []).append(child)
    return out


def test_sigkill_mid_large_reconcile_converges_without_duplicates_or_orphans(
    env: FaultEnv, ns: str, operators: Operators
) -> None:
    services = kill_fleet(env, ns)
    want = {s["metadata"]["name"]: expected_children(s) for s in services}
    total = sum(len(children) for children in want.values())
    first = operators.start(ns, name="first")
    diag = operators.diagnostics()
    started = time.monotonic()
    env.kubectl("apply", "-f", "-", input=dump(services))

    def applying() -> bool:
        # a quarter of the Deployments exist: the operator is in the middle of it
        deployments = env.cluster.apps.list_namespaced_deployment(ns, label_selector=MANAGED_BY_SELECTOR).items
        return len(deployments) >= 3 * N_KILL // 4

    wait_until(applying, 60, "the first operator to be applying children", diag, interval=0.02)
    first.kill()
    killed_after = time.monotonic() - started
    assert first.proc is not None and first.proc.returncode == -9
    at_kill = {name: {key(c) for c in children} for name, children in children_by_service(env, ns).items()}
    have = sum(len(c) for c in at_kill.values())
    partial = sorted(n for n in want if 0 < len(at_kill.get(n, ())) < len(want[n]))
    untouched = sorted(n for n in want if not at_kill.get(n))
    statuses = sum(1 for s in env.cluster.services(ns) if s.get("status"))
    print(f"\nSIGKILL {killed_after:.2f}s after creating {N_KILL} services: {have}/{total} children applied, "
          f"{len(partial)} services partly applied, {len(untouched)} untouched, {statuses} with a status")
    assert 0 < have < total, f"{have}/{total} children at the kill: not in the middle of the reconcile"

    second = operators.start(ns, name="restarted")
    wait_all_ready(env, operators, ns, set(want), timeout=180)

    live = {s["metadata"]["name"]: s for s in env.cluster.services(ns)}
    uids = {s["metadata"]["uid"]: name for name, s in live.items()}
    by_service = children_by_service(env, ns)
    assert set(by_service) <= set(want), f"children of unknown services: {sorted(set(by_service) - set(want))}"
    for name, children in sorted(by_service.items()):
        keys = [key(c) for c in children]
        duplicates = sorted(k for k, n in Counter(keys).items() if n > 1)
        assert not duplicates, f"{name}: duplicate children {duplicates}"
        assert set(keys) == want[name], (
            f"{name}: missing {sorted(want[name] - set(keys))}, unexpected {sorted(set(keys) - want[name])}\n{diag()}")
        for child in children:
            refs = child["metadata"].get("ownerReferences") or []
            assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
                ("InferenceService", name, live[name]["metadata"]["uid"], True)], f"{name} {key(child)}: {refs}"
    orphans = [key(c) for c in env.cluster.children(ns)
               if not {r["uid"] for r in c["metadata"].get("ownerReferences") or []} & set(uids)]
    assert not orphans, f"managed objects owned by no existing service: {orphans}"

    # the pools: every Deployment at its expected size, with one ReplicaSet and that many Ready pods
    replica_sets = env.cluster.apps.list_namespaced_replica_set(ns, label_selector=MANAGED_BY_SELECTOR).items
    pods = env.cluster.pods(ns, MANAGED_BY_SELECTOR)
    wrong: list[str] = []
    for manifest in services:
        name = manifest["metadata"]["name"]
        for role, count in expected_pools(manifest).items():
            dep = deployment(env, ns, f"{name}-{role}")
            mine = [rs for rs in replica_sets if any(r.uid == dep.metadata.uid for r in rs.metadata.owner_references)]
            rs_uids = {rs.metadata.uid for rs in mine}
            dep_pods = [p for p in pods if any(r.uid in rs_uids for r in p.metadata.owner_references or [])]
            ready = [p for p in dep_pods if any(c.type == "Ready" and c.status == "True"
                                                for c in p.status.conditions or [])]
            if (dep.spec.replicas, len(mine), len(dep_pods), len(ready)) != (count, 1, count, count):
                wrong.append(f"{dep.metadata.name}: replicas {dep.spec.replicas} (want {count}), {len(mine)} "
                             f"ReplicaSets, {len(dep_pods)} pods, {len(ready)} Ready; replicas owned by "
                             f"{replicas_owner(dep)}")
    assert not wrong, "pools after the restart:\n" + "\n".join(wrong) + f"\n{second.log_tail()}"
    orphan_pods = [p.metadata.name for p in pods
                   if not {r.uid for r in p.metadata.owner_references or []} & {rs.metadata.uid for rs in replica_sets}]
    assert not orphan_pods, f"pods owned by no ReplicaSet of ours: {orphan_pods}"
    for name, svc in live.items():
        assert (svc.get("status") or {}).get("observedGeneration") == svc["metadata"]["generation"], name
    no_crash(second)


def test_restart_with_many_objects_of_a_kind_takes_up_every_service_and_writes_nothing(
    env: FaultEnv, ns: str, operators: Operators
) -> None:
    """An operator (re)started where one kind has more objects than it runs workers: kopf with a worker
    limit hung for good at start-up (each object's worker waits until all are indexed; kopf#1243)."""
    services = [service(f"many-{i:02d}", ns, pool(env, "nvidia-h100", replicas=0),
                        pool(env, "nvidia-h200", replicas=0)) for i in range(N_MANY)]
    first = operators.start(ns, name="first")
    diag = operators.diagnostics()
    env.kubectl("apply", "-f", "-", input=dump(services))

    def settled() -> bool:
        live = {s["metadata"]["name"]: s for s in env.cluster.services(ns)}
        waiting = sorted(n for n in live if (condition(live[n], "RouterReady") or {}).get("status") != "True"
                         or (condition(live[n], "PrefillReady") or {}).get("reason") != "ScaledToZero")
        assert len(live) == N_MANY and not waiting, f"{len(waiting)} services not settled, e.g. {waiting[:3]}"
        return True

    wait_until(settled, 120, f"{N_MANY} services with a ready router and pools scaled to zero", diag, interval=1.0)
    deployments = len(env.cluster.apps.list_namespaced_deployment(ns, label_selector=MANAGED_BY_SELECTOR).items)
    assert deployments == 3 * N_MANY
    first.stop()

    second = operators.start(ns, name="second")
    wait_until(lambda: second.reconciles() >= N_MANY, 60,
               f"the restarted operator to reconcile the {N_MANY} services it found", diag, interval=0.5)
    assert writes(second) == 0, f"restart over an unchanged fleet wrote: {second.request_counts()}\n{second.log_tail()}"
    env.kubectl("patch", PLURAL, "many-00", "-n", ns, "--type=merge", "-p", '{"spec":{"router":{"replicas":2}}}')
    wait_until(lambda: deployment(env, ns, "many-00-router").spec.replicas == 2, 30,
               "the edit made after the restart to reach the router's Deployment", diag, interval=0.25)
    no_crash(second)


# ----------------------------------------------------------------------------------------------------
# 2. hand edits: reverted; an autoscaled pool scaled by hand: held, never fought over


def test_hand_edits_are_reverted_and_hand_scaling_of_an_autoscaled_pool_is_held(
    env: FaultEnv, ns: str, operators: Operators
) -> None:
    name = "edited"
    manifest = service(name, ns, pool(env, "nvidia-h100", replicas=1, autoscaling=(1, 4)),
                       pool(env, "nvidia-h200", replicas=2))
    op = operators.start(ns)  # no --prometheus-url: the autoscaler has no metrics and holds
    diag = operators.diagnostics()
    env.kubectl("apply", "-f", "-", input=dump([manifest]))
    wait_all_ready(env, operators, ns, {name}, timeout=90)
    wait_condition(env, operators, ns, name, "ScalingActive", "False", "MetricsUnavailable", timeout=20)
    decode, prefill, router = f"{name}-decode", f"{name}-prefill", name
    want_image = deployment(env, ns, decode).spec.template.spec.containers[0].image
    want_labels = dict(env.cluster.core.read_namespaced_service(router, ns).metadata.labels)

    # --- three edits at once: a pool's image, a child Service's labels, a fixed pool's replicas
    edited_at = time.monotonic()
    env.kubectl("-n", ns, "set", "image", f"deployment/{decode}", "engine=registry.example/evil:1")
    env.kubectl("-n", ns, "label", "service", router, "app.kubernetes.io/component=hacked",
                "app.kubernetes.io/part-of-", "--overwrite")
    env.kubectl("-n", ns, "scale", f"deployment/{decode}", "--replicas=5")
    reverted: dict[str, float] = {}

    def all_reverted() -> bool:
        dep = deployment(env, ns, decode)
        labels = env.cluster.core.read_namespaced_service(router, ns).metadata.labels or {}
        now = time.monotonic() - edited_at
        if dep.spec.template.spec.containers[0].image == want_image:
            reverted.setdefault("image", now)
        if dep.spec.replicas == 2:
            reverted.setdefault("replicas", now)
        if labels == want_labels:
            reverted.setdefault("labels", now)
        assert len(reverted) == 3, f"reverted so far {reverted}; image {dep.spec.template.spec.containers[0].image},"\
                                   f" replicas {dep.spec.replicas}, labels {labels}"
        return True

    wait_until(all_reverted, RESYNC_S + 10, "the hand edits to be reverted", diag, interval=0.1)
    print("\nhand edits reverted after (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(reverted.items())))
    assert max(reverted.values()) <= RESYNC_S + 3, reverted
    dep = deployment(env, ns, decode)
    assert "disagg" in replicas_owner(dep), replicas_owner(dep)

    # --- the autoscaled pool scaled by hand within its bounds: held there, never written by reconcile
    env.kubectl("-n", ns, "scale", f"deployment/{prefill}", "--replicas=3")
    before = deployment(env, ns, prefill)
    assert before.spec.replicas == 3
    watched_until = time.monotonic() + 15
    seen: list[int] = []
    while time.monotonic() < watched_until:
        seen.append(deployment(env, ns, prefill).spec.replicas)
        time.sleep(0.25)
    after = deployment(env, ns, prefill)
    counts = Counter(seen)
    assert set(counts) == {3}, f"{prefill} replicas moved while held at 3 by hand: {dict(counts)}\n{diag()}"
    assert after.metadata.generation == before.metadata.generation, "the Deployment was written while held"
    owners = replicas_owner(after)
    assert "disagg" not in owners, f"reconcile's field manager owns replicas of an autoscaled pool: {owners}"
    svc = env.cluster.service(ns, name) or {}
    assert ((svc.get("status") or {}).get("prefill") or {}).get("desiredReplicas") == 3, svc.get("status")
    cond = condition(svc, "ScalingActive") or {}
    assert cond.get("reason") == "MetricsUnavailable", cond

    # --- scaled by hand above its maxReplicas: clamped back to the bound by the autoscaler, then held
    env.kubectl("-n", ns, "scale", f"deployment/{prefill}", "--replicas=9")
    scaled_at = time.monotonic()
    wait_until(lambda: deployment(env, ns, prefill).spec.replicas == 4, 5 + 10,
               f"the autoscaler to clamp {prefill} to maxReplicas 4", diag, interval=0.2)
    clamped_after = time.monotonic() - scaled_at
    time.sleep(6)  # more than a tick: it stays there
    dep = deployment(env, ns, prefill)
    assert dep.spec.replicas == 4, dep.spec.replicas
    assert replicas_owner(dep) == ["disagg-autoscaler"], replicas_owner(dep)
    print(f"autoscaled pool: held at 3 (set by hand) for 15 s; 9 clamped to 4 after {clamped_after:.1f}s")
    no_crash(op)


# ----------------------------------------------------------------------------------------------------
# 3. the pool's accelerator nodes cordoned: Pending, never elsewhere; Unschedulable with counts


def test_cordoned_accelerator_nodes_leave_pods_pending_and_unschedulable(
    env: FaultEnv, ns: str, operators: Operators
) -> None:
    name = "cordoned"
    b200 = env.nodes["nvidia-b200"]
    manifest = service(name, ns, pool(env, "nvidia-h100"), pool(env, "nvidia-b200", replicas=1, count=4))
    op = operators.start(ns)
    env.kubectl("apply", "-f", "-", input=dump([manifest]))
    wait_all_ready(env, operators, ns, {name}, timeout=90)
    selector = f"{SERVICE_LABEL}={name},{ROLE_LABEL}=decode"
    accelerator = DEFAULT_CATALOG["nvidia-b200"]

    def placement() -> dict[str, str | None]:
        return {p.metadata.name: p.spec.node_name for p in env.cluster.pods(ns, selector)}

    def free_elsewhere() -> list[str]:
        """This module's nodes of other types with room for a decode pod (4 GPUs)."""
        roomy = []
        for acc_type, names in env.nodes.items():
            if acc_type == "nvidia-b200":
                continue
            for node in names:
                used = sum(int((c.resources.requests or {}).get("nvidia.com/gpu", 0))
                           for p in env.cluster.core.list_pod_for_all_namespaces(
                               field_selector=f"spec.nodeName={node}").items for c in p.spec.containers
                           if p.status.phase not in ("Succeeded", "Failed"))
                if used + 4 <= 8:
                    roomy.append(node)
        return roomy

    (first_node,) = set(placement().values())
    assert first_node in b200, f"decode pod on {first_node}, not on a b200 node"
    cordoned: list[str] = []
    try:
        for node in b200:
            env.kubectl("cordon", node)
            cordoned.append(node)
        wait_until(free_elsewhere, 60, "a node of another type with room (else the test proves nothing)",
                   operators.diagnostics())
        patch = {"spec": {"decode": {"replicas": 3}}}
        env.kubectl("-n", ns, "patch", "inferenceservice", name, "--type=merge", "-p", json.dumps(patch))

        def both_unschedulable() -> dict[str, Any]:
            # the operator looks at a pool's pods at most every 10 s: the first look may see one of them
            svc = env.cluster.service(ns, name)
            decode = condition(svc, "DecodeReady") or {}
            assert (decode.get("status"), decode.get("reason")) == ("False", "Unschedulable"), decode
            assert decode["message"].startswith("2 of 3 pods cannot be scheduled: "), decode
            assert svc is not None
            return svc

        svc = wait_until(both_unschedulable, 45, "DecodeReady=False/Unschedulable for 2 of 3 pods",
                         operators.diagnostics())
        decode = condition(svc, "DecodeReady") or {}
        assert re.search(r"\d+/\d+ nodes are available", decode["message"]), decode
        assert "unschedulable" in decode["message"], decode
        ready = condition(svc, "Ready") or {}
        assert (ready["status"], ready["reason"]) == ("False", "Unschedulable"), ready
        time.sleep(3)  # still Pending, with free accelerators of another type on matching nodes
        pending = placement()
        assert sorted(pending.values(), key=str) == sorted([first_node, None, None], key=str), pending
        print(f"\ncordoned {len(b200)} b200 nodes: DecodeReady {decode['message'][:160]}")

        # one node of the right type back: the pending pods land there, and only there
        env.kubectl("uncordon", b200[1] if first_node == b200[0] else b200[0])
        cordoned.remove(b200[1] if first_node == b200[0] else b200[0])
        wait_condition(env, operators, ns, name, "DecodeReady", "True", "AllReplicasReady", timeout=30)
        for pod_name, placed in placement().items():
            assert placed in b200, f"{pod_name} on {placed}"
            labels = env.cluster.core.read_node(placed).metadata.labels or {}
            assert all(labels.get(k) == v for k, v in accelerator.node_labels.items()), (
                f"{pod_name} on {placed} ({labels.get('node.kubernetes.io/instance-type')})")
    finally:
        for node in cordoned:
            env.kubectl("uncordon", node, check=False)
    no_crash(op)


# ----------------------------------------------------------------------------------------------------
# 4. two operators peering: one acts; SIGKILL it, the standby takes over


def peers(env: FaultEnv, namespace: str, peering: str) -> dict[str, Any]:
    obj = env.cluster.custom.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", peering)
    status: dict[str, Any] = obj.get("status") or {}
    return status


def writes(op: OperatorProcess) -> float:
    counts = op.request_counts()
    return sum(counts.get(m, 0.0) for m in ("POST", "PUT", "PATCH", "DELETE"))


def test_peering_standby_takes_over_after_sigkill(env: FaultEnv, ns: str, operators: Operators) -> None:
    peering = "faults"
    env.kubectl("apply", "-f", "-", input=dump([{
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering, "namespace": ns}}]))
    name = "peered"
    manifest = service(name, ns, pool(env, "nvidia-h100", autoscaling=(1, 2)), pool(env, "nvidia-h200"))
    active = operators.start(ns, name="active", flags=("--peering", peering, "--priority", "200"))
    diag = operators.diagnostics(lambda: json.dumps(peers(env, ns, peering), indent=1))
    env.kubectl("apply", "-f", "-", input=dump([manifest]))
    wait_all_ready(env, operators, ns, {name}, timeout=90)
    standby = operators.start(ns, name="standby", flags=("--peering", peering, "--priority", "100"))
    wait_until(lambda: len(peers(env, ns, peering)) == 2, 20, "both operators in the KopfPeering", diag)

    # only the active one acts: a spec change, a resync period and an autoscaler tick later
    env.kubectl("-n", ns, "patch", "inferenceservice", name, "--type=merge", "-p",
                json.dumps({"spec": {"router": {"replicas": 2}}}))
    wait_until(lambda: deployment(env, ns, f"{name}-router").spec.replicas == 2, 20,
               "the active operator to apply router replicas 2", diag)
    time.sleep(RESYNC_S + 1.5)
    assert active.reconciles() > 0
    assert standby.reconciles() == 0, f"the standby reconciled\n{standby.log_tail()}"
    assert writes(standby) == 0, f"the standby wrote: {standby.request_counts()}\n{standby.log_tail()}"
    assert "Pausing operations in favour of" in standby.log_text() or "Resuming" not in standby.log_text(), (
        standby.log_tail())

    # SIGKILL the active one (no goodbye in the peering) and change the spec right after
    killed = time.monotonic()
    active.kill()
    env.kubectl("-n", ns, "patch", "inferenceservice", name, "--type=merge", "-p",
                json.dumps({"spec": {"router": {"replicas": 3}}}))
    wait_until(lambda: deployment(env, ns, f"{name}-router").spec.replicas == 3, PEER_LIFETIME_S + 20,
               "the standby to take over and apply router replicas 3", diag, interval=0.1)
    takeover = time.monotonic() - killed
    print(f"\npeering takeover: {takeover:.1f}s from SIGKILL of the active operator to the standby's apply "
          f"(peer lifetime {PEER_LIFETIME_S:.0f}s)")
    wait_until(lambda: standby.reconciles() > 0, 10, "the standby's reconcile to be counted", diag)
    assert takeover <= PEER_LIFETIME_S + 5, f"takeover took {takeover:.1f}s"
    # the standby is the active one now: its status writes and the autoscaler's condition follow
    wait_until(lambda: ((env.cluster.service(ns, name) or {}).get("status") or {}).get("observedGeneration")
               == (env.cluster.service(ns, name) or {})["metadata"]["generation"], 20, "status of the edit", diag)
    no_crash(standby)


# ----------------------------------------------------------------------------------------------------
# 5. hundreds of generated invalid or extreme services


ACCELERATOR_TYPES = sorted(DEFAULT_CATALOG.names())
UNICODE = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
ARG = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=60).filter(
    lambda a: not a.startswith("-"))
ENV_NAME = st.from_regex(r"\AUSR_[A-Za-z0-9_.-]{0,30}\Z")
LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?\Z")
QUANTITY = st.sampled_from(["100m", "1", "2", "0.5", "64Gi", "1e3", "1.5G", "+4", ".5", "500M"])


@st.composite
def pool_spec(draw: st.DrawFn, acc_type: str) -> dict[str, Any]:
    count = draw(st.sampled_from([1, 1, 2, 4, 8]))
    out: dict[str, Any] = {
        "replicas": draw(st.sampled_from([0, 1, 2, 500, 999, 1000])),
        "accelerator": {"type": acc_type, "count": count},
        "parallelism": {"tensor": draw(st.sampled_from([t for t in (1, 2, 4, 8) if t <= count]))},
    }
    if draw(st.booleans()):
        low = draw(st.sampled_from([1, 2, 999, 1000]))
        out["autoscaling"] = {"minReplicas": low, "maxReplicas": draw(st.sampled_from([low, 1000]))}
    if draw(st.integers(0, 3)) == 0:
        out["extraArgs"] = draw(st.lists(ARG, max_size=64))
    if draw(st.integers(0, 4)) == 0:
        out["nodeSelector"] = draw(st.dictionaries(st.from_regex(r"\Aexample\.com/[a-z]{1,10}\Z"), LABEL,
                                                   max_size=3))
    if draw(st.integers(0, 4)) == 0:
        out["tolerations"] = [{"key": draw(LABEL), "operator": "Exists", "effect": "NoSchedule"}]
    if draw(st.integers(0, 3)) == 0:
        out["resources"] = {"requests": {"cpu": draw(QUANTITY), "memory": draw(QUANTITY)}}
    return out


@st.composite
def valid_ish_spec(draw: st.DrawFn) -> dict[str, Any]:
    """Specs the schema and the operator accept, at the edges of every range: huge pools, long names,
    unicode, many arguments, every accelerator type (also those no node here has)."""
    engine_kind = draw(st.sampled_from(["vllm", "sglang"]))
    engine = ENGINES[engine_kind]
    types = [t for t in ACCELERATOR_TYPES if DEFAULT_CATALOG[t].vendor in engine.vendors]
    prefill_type, decode_type = draw(st.sampled_from(types)), draw(st.sampled_from(types))
    spec: dict[str, Any] = {
        "model": {
            "name": draw(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1,
                                 max_size=256).filter(lambda name: not name.startswith("-"))),
            "uri": draw(st.sampled_from(["hf://org/model", "pvc://weights/llama"]
                                        + (["s3://bucket/m", "gs://b/m"] if engine_kind == "vllm" else []))),
        },
        "engine": {"kind": engine_kind, "port": draw(st.sampled_from([1024, 8000, 65535]))},
        "prefill": draw(pool_spec(prefill_type)),
        "decode": draw(pool_spec(decode_type)),
    }
    for role, acc_type in (("prefill", prefill_type), ("decode", decode_type)):
        if DEFAULT_CATALOG[acc_type].vendor not in engine.images:
            spec[role]["image"] = f"registry.example/{engine_kind}-{DEFAULT_CATALOG[acc_type].vendor}:1"
    if draw(st.booleans()):
        spec["model"]["architecture"] = {
            "parameters": draw(st.sampled_from([1e6, 70.6e9, 6.7e11, 2e12])),
            "layers": draw(st.integers(1, 1000)), "kvHeads": draw(st.sampled_from([1, 8, 64, 1024])),
            "headDim": draw(st.sampled_from([1, 128, 4096])),
            "weightDtype": draw(st.sampled_from(["bf16", "fp16", "fp8", "int8", "int4"])),
        }
    if draw(st.booleans()):
        spec["engine"]["env"] = draw(st.lists(st.fixed_dictionaries({"name": ENV_NAME, "value": UNICODE}),
                                              max_size=64, unique_by=lambda e: e["name"]))
    if draw(st.booleans()):
        spec["engine"]["extraArgs"] = draw(st.lists(st.one_of(ARG, st.sampled_from(
            ["--max-model-len=4096", "--enable-chunked-prefill", "--gpu-memory-utilization", "0.9"])), max_size=64))
    same_vendor = DEFAULT_CATALOG[prefill_type].vendor == DEFAULT_CATALOG[decode_type].vendor
    mooncake = engine_kind == "sglang" and same_vendor and draw(st.booleans())
    spec["kvTransfer"] = {"connector": "mooncake" if mooncake else "nixl"}
    if mooncake:
        spec["decode"]["parallelism"] = dict(spec["prefill"]["parallelism"])
        spec["decode"]["accelerator"]["count"] = spec["prefill"]["accelerator"]["count"]
    if draw(st.booleans()):
        spec["kvTransfer"]["rdma"] = {"resource": "rdma/ib", "count": draw(st.integers(1, 64))}
    if draw(st.integers(0, 3)) == 0:
        spec["kvCache"] = {"cpuOffloadGiB": draw(st.integers(1, 4096))}
        if draw(st.booleans()):
            spec["kvCache"]["disk"] = {"size": draw(st.sampled_from(["1Ti", "500Gi", "1e12", "1Gi", "1.5Gi"]))}
    spec["router"] = {"replicas": draw(st.integers(1, 64)),
                      "policy": draw(st.sampled_from(["round_robin", "random", "cache_aware", "power_of_two"]))}
    spec["slo"] = {"ttftMs": draw(st.integers(1, 600000)), "itlMs": draw(st.integers(1, 60000)),
                   "percentile": draw(st.sampled_from([50, 90, 99.9]))}
    if draw(st.booleans()):
        spec["acceleratorBudget"] = 100000
    return spec


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        node.pop(last, None)

    return mutate


def _mooncake_unequal(spec: dict[str, Any]) -> None:
    spec["kvTransfer"] = {"connector": "mooncake"}
    spec["prefill"]["accelerator"]["count"] = spec["decode"]["accelerator"]["count"] = 8
    spec["prefill"]["parallelism"] = {"tensor": 4}
    spec["decode"]["parallelism"] = {"tensor": 2}


def _sglang_on_trainium(spec: dict[str, Any]) -> None:
    spec["engine"]["kind"] = "sglang"
    spec["prefill"]["accelerator"]["type"] = "aws-trainium2"


def _vllm_mooncake(spec: dict[str, Any]) -> None:
    spec["engine"]["kind"] = "vllm"
    spec["kvTransfer"] = {"connector": "mooncake"}
    spec["decode"]["accelerator"] = dict(spec["prefill"]["accelerator"])
    spec["decode"]["parallelism"] = dict(spec["prefill"]["parallelism"])


def _cross_vendor_mooncake(spec: dict[str, Any]) -> None:
    spec["engine"]["kind"] = "sglang"
    spec["kvTransfer"] = {"connector": "mooncake"}
    spec["prefill"]["accelerator"] = {"type": "amd-mi300x", "count": 1}
    spec["decode"]["accelerator"] = {"type": "nvidia-h200", "count": 1}
    for role in ("prefill", "decode"):
        spec[role]["parallelism"] = {"tensor": 1}
        spec[role].pop("image", None)


def _kv_port_is_engine_port(spec: dict[str, Any]) -> None:
    spec["engine"]["port"] = 9000
    spec["kvTransfer"]["port"] = 9000


def _both_type_and_resource(spec: dict[str, Any]) -> None:
    spec["decode"]["accelerator"]["resourceName"] = "nvidia.com/gpu"
    spec["decode"]["accelerator"]["nodeSelector"] = {"a": "b"}


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    # refused by the schema, its CEL rules or strict field validation
    "unknown-field": _set("prefill.gpus", 4),
    "unknown-top-field": _set("replicas", 2),
    "string-replicas": _set("decode.replicas", "three"),
    "float-count": _set("prefill.accelerator.count", 1.5),
    "string-port": _set("engine.port", "8000"),
    "args-not-a-list": _set("engine.extraArgs", "--foo"),
    "negative-replicas": _set("prefill.replicas", -1),
    "negative-ttft": _set("slo.ttftMs", -5),
    "zero-count": _set("decode.accelerator.count", 0),
    "replicas-above-max": _set("decode.replicas", 1001),
    "min-above-max": _set("prefill.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
    "mooncake-unequal-tp": _mooncake_unequal,
    "tensor-above-count": _set("prefill.parallelism", {"tensor": 128}),
    "bad-disk-quantity": _set("kvCache", {"cpuOffloadGiB": 4, "disk": {"size": "lots"}}),
    "bad-cpu-quantity": _set("decode.resources", {"requests": {"cpu": "1 core"}}),
    "no-model": _drop("model"),
    "no-decode": _drop("decode"),
    "no-uri": _drop("model.uri"),
    "no-accelerator": _drop("prefill.accelerator"),
    "neither-type-nor-resource": _set("decode.accelerator", {"count": 1}),
    "type-and-resource": _both_type_and_resource,
    "unknown-engine": _set("engine.kind", "trtllm"),
    "unknown-policy": _set("router.policy", "fastest"),
    "bad-uri": _set("model.uri", "ftp://x/y"),
    "bad-env-name": _set("engine.env", [{"name": "1BAD", "value": "x"}]),
    "low-port": _set("router.port", 80),
    "backend-with-mooncake": _set("kvTransfer", {"connector": "mooncake", "backend": "ucx"}),
    "kv-port-is-engine-port": _kv_port_is_engine_port,
    "too-many-args": _set("engine.extraArgs", ["--x"] * 65),
    "tensor-not-power-of-two": _set("prefill.parallelism", {"tensor": 3}),
    "managed-flag": _set("decode.extraArgs", ["--port=9000"]),
    "managed-engine-flag": _set("engine.extraArgs", ["--served-model-name", "x"]),
    "managed-flag-spelled": _set("engine.extraArgs", ["--tensor_parallel_size=8", "--disaggregation-mod=decode"]),
    "empty-kv-cache": _set("kvCache", {}),
    "disk-without-cpu": _set("kvCache", {"disk": {"size": "1Ti"}}),
    "disk-too-large": _set("kvCache", {"cpuOffloadGiB": 4, "disk": {"size": "1e400"}}),
    "vllm-mooncake": _vllm_mooncake,
    "bad-claim": _set("model.uri", "pvc://Bad_Claim/x"),
    "small-budget": _set("acceleratorBudget", 1),
    "duplicate-env": _set("engine.env", [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}]),
    "env-shadows-operator": _set("engine.env", [{"name": "HF_HOME", "value": "/elsewhere"}]),
    "bad-node-selector": _set("decode.nodeSelector", {"bad key!": "has space"}),
    "bad-toleration": _set("prefill.tolerations", [{"key": "bad key!", "operator": "Exists"}]),
    "spaced-image": _set("engine.image", " registry.example/engine:1 "),
    # accepted by the API server, refused by the operator: by the catalogue, or as the API server would
    # refuse the children (InvalidSpec, offline as in `disagg validate`)
    "unknown-type": _set("prefill.accelerator.type", "nvidia-h999"),
    "count-above-node": _set("decode.accelerator", {"type": "nvidia-h200", "count": 16}),
    "sglang-on-trainium": _sglang_on_trainium,
    "cross-vendor-mooncake": _cross_vendor_mooncake,
    "requests-above-limits": _set("prefill.resources", {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
    "bad-resource-name": _set("decode.resources", {"requests": {"not a resource!": "1"}}),
    "bad-affinity": _set("decode.affinity", {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 0, "preference": {}}]}}),
}
REFUSED_CHILDREN: set[str] = set()
"""Mutations the operator accepts and the API server refuses in a child: none any more, every one is
refused by the schema or offline (issue 18)."""
NAME_SHAPES = [*["short"] * 6, "max", "too-long-for-children", "dns-subdomain", "dotted", "uppercase", "too-long"]


@st.composite
def generated_case(draw: st.DrawFn) -> tuple[str, bool, dict[str, Any]]:
    """(name shape, whether to break it, spec)."""
    return draw(st.sampled_from(NAME_SHAPES)), bool(draw(st.integers(0, 2))), draw(valid_ish_spec())


def generated_cases(n: int) -> list[tuple[str, str, dict[str, Any]]]:
    """n cases (name shape, mutation or "", spec): hypothesis draws the specs (derandomized: the same
    every run); two in three are then broken by each of MUTATIONS in turn, so every one is covered."""
    drawn: list[tuple[str, bool, dict[str, Any]]] = []

    @settings(max_examples=n, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(generated_case())
    def collect(case: tuple[str, bool, dict[str, Any]]) -> None:
        drawn.append(case)

    collect()
    names = sorted(MUTATIONS)
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for shape, broken, spec in drawn:
        mutation = names[len(cases) % len(names)] if broken else ""
        if mutation:
            MUTATIONS[mutation](spec)
        cases.append((shape, mutation, spec))
    return cases


def shaped_name(shape: str, index: int) -> str:
    stem = f"gen-{index:04d}"
    return {
        "short": stem,
        "max": (stem + "-" + "x" * 63)[:52],
        "too-long-for-children": (stem + "-" + "y" * 63)[:60],
        "dns-subdomain": (stem + "-" + "z" * 253)[:253],
        "dotted": f"{stem}.v1",
        "uppercase": f"Gen-{index:04d}",
        "too-long": stem + "-" + "w" * 260,
    }[shape]


@dataclass
class Outcome:
    name: str
    shape: str
    mutation: str
    rejected: str | None = None
    """The API server's message when it refused the object."""
    offline: str | None = None
    """`disagg validate`'s verdict on the object as stored (None: valid)."""


def test_generated_invalid_and_extreme_services_never_crash_the_operator(
    env: FaultEnv, ns: str, operators: Operators
) -> None:
    cases = generated_cases(N_GENERATED)
    assert len(cases) >= 500, f"hypothesis generated only {len(cases)} cases"
    # valid services get their children, but their huge pools never get ReplicaSets or pods
    env.kubectl("-n", ns, "create", "quota", "no-pools", "--hard=pods=0,count/replicasets.apps=0")
    op = operators.start(ns)
    pid = op.pid
    diag = operators.diagnostics()
    outcomes = [Outcome(shaped_name(shape, i), shape, mutation) for i, (shape, mutation, _) in enumerate(cases)]

    def create(index: int) -> None:
        outcome, spec = outcomes[index], cases[index][2]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
                "metadata": {"name": outcome.name, "namespace": ns}, "spec": spec}
        try:
            stored = env.cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body,
                                                                        field_validation="Strict")
        except kclient.ApiException as e:
            assert e.status in (400, 422), f"{outcome.name} ({outcome.mutation}): {e.status} {e.body}"
            message = json.loads(e.body or "{}").get("message", "")
            assert message, e.body
            outcome.rejected = message
            return
        try:
            validate_service(stored, DEFAULT_CATALOG)
        except InvalidSpec as error:
            outcome.offline = str(error)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool_:
        list(pool_.map(create, range(len(outcomes))))
    created_in = time.monotonic() - started
    accepted = {o.name: o for o in outcomes if o.rejected is None}
    seen: dict[str, dict[str, Any]] = {}

    def all_reported() -> bool:
        for svc in env.cluster.services(ns):
            name = svc["metadata"]["name"]
            ready = condition(svc, "Ready")
            if ready is not None and ready.get("observedGeneration") == svc["metadata"]["generation"]:
                seen[name] = svc
        missing = sorted(set(accepted) - set(seen))
        assert not missing, f"{len(missing)} of {len(accepted)} without a Ready condition, e.g. {missing[:5]}"
        assert op.alive(), op.log_tail()
        return True

    wait_until(all_reported, 180, "a Ready condition on every accepted service", diag, interval=2.0)
    reported_in = time.monotonic() - started

    unclear: list[str] = []
    kinds: Counter[str] = Counter()
    for name, outcome in accepted.items():
        ready = condition(seen[name], "Ready") or {}
        reason, message = ready.get("reason"), str(ready.get("message", ""))
        if reason == "InvalidSpec":
            kinds["InvalidSpec (operator)" if outcome.offline else "InvalidSpec (a child refused)"] += 1
            if not re.search(r"\b(spec|metadata\.name)[.\[:]", message):
                unclear.append(f"{name} ({outcome.mutation}): no field path in {message[:200]!r}")
            if outcome.offline is None and outcome.mutation not in REFUSED_CHILDREN:
                unclear.append(f"{name} ({outcome.mutation}): valid, yet {message[:300]!r}")
            if outcome.offline is not None and outcome.offline not in message:
                unclear.append(f"{name} ({outcome.mutation}): {message[:200]!r} is not `disagg validate`'s "
                               f"{outcome.offline[:200]!r}")
        else:
            kinds[f"valid ({reason})"] += 1
            if outcome.offline is not None:
                unclear.append(f"{name} ({outcome.mutation}): Ready {reason}, but invalid: {outcome.offline[:200]}")
            if reason not in KNOWN_REASONS or ready.get("status") not in ("True", "False") or not message:
                unclear.append(f"{name} ({outcome.mutation}): unclear Ready condition {ready}")
    rejected = [o for o in outcomes if o.rejected is not None]
    by_mutation = Counter(o.mutation or "none" for o in rejected)
    print(f"\n{len(outcomes)} generated services: {len(rejected)} refused by the API server, "
          + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
          + f"; created in {created_in:.1f}s, all reported after {reported_in:.1f}s")
    print("refused, by mutation: " + ", ".join(f"{k} {n}" for k, n in sorted(by_mutation.items())))
    for sample in sorted({o.mutation: o for o in rejected}.values(), key=lambda o: o.mutation)[:40]:
        print(f"  {sample.mutation or 'none'}: {(sample.rejected or '')[:160]}")
    assert not unclear, f"{len(unclear)} unclear outcomes:\n" + "\n".join(unclear[:30]) + f"\n{op.log_tail(60)}"
    # settled: then no service re-applies anything for two resync periods (each child's diff is stable)
    def steady() -> bool:
        since = len(op.log_text().splitlines())
        time.sleep(2 * RESYNC_S + 1)
        reapplied = [line for line in op.log_text().splitlines()[since:]
                     if re.search(r"reconciled \S+ \(\w+\): applied [1-9]", line)]
        assert not reapplied, f"{len(reapplied)} re-applies, e.g.:\n" + "\n".join(reapplied[:5])
        return True

    wait_until(steady, 60, "no more re-applies", lambda: op.log_tail(60), interval=0)
    api_errors = op.metric("disagg_reconciles_total", "result").get("api_error", 0.0)
    assert api_errors == 0, f"{api_errors:.0f} reconciles failed on the API server\n{op.log_tail(60)}"
    no_crash(op, pid)
    env.kubectl("-n", ns, "delete", "inferenceservices", "--all", "--wait=false", timeout=120)


# ----------------------------------------------------------------------------------------------------
# 6. the API server restarted under the running operator (last: it disturbs everyone on the cluster)


def test_apiserver_restart_operator_recovers_and_catches_up(
    cluster: LocalCluster, env: FaultEnv, ns: str, operators: Operators
) -> None:
    name, late = "survivor", "late"
    manifest = service(name, ns, pool(env, "nvidia-h100"), pool(env, "nvidia-h200", replicas=1))
    # a resync far beyond the test: catching up must come from the operator's watches
    op = operators.start(ns, resync=3600)
    pid = op.pid
    diag = operators.diagnostics()
    env.kubectl("apply", "-f", "-", input=dump([manifest]))
    wait_all_ready(env, operators, ns, {name}, timeout=90)

    restart_started = time.monotonic()
    cluster.apiserver_restart()
    restarted_in = time.monotonic() - restart_started
    # right away, while the operator's watches reconnect: an edit, and a new service
    edited_at = time.monotonic()
    env.kubectl("-n", ns, "patch", "inferenceservice", name, "--type=merge", "-p",
                json.dumps({"spec": {"decode": {"replicas": 2}}}), timeout=60)
    env.kubectl("apply", "-f", "-", input=dump([service(late, ns, pool(env, "nvidia-h100"),
                                                        pool(env, "nvidia-h200"))]), timeout=60)
    wait_until(lambda: deployment(env, ns, f"{name}-decode").spec.replicas == 2, 60,
               "the operator to apply the edit made after the restart", diag, interval=0.2)
    edit_applied = time.monotonic() - edited_at
    wait_all_ready(env, operators, ns, {name, late}, timeout=90)
    caught_up = time.monotonic() - edited_at
    svc = env.cluster.service(ns, name) or {}
    assert ((svc.get("status") or {}).get("decode") or {}).get("readyReplicas") == 2, svc.get("status")
    print(f"\nkube-apiserver restarted in {restarted_in:.1f}s; the edit made right after was applied in "
          f"{edit_applied:.1f}s, both services Ready {caught_up:.1f}s after")
    no_crash(op, pid)
