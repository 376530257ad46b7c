"""End-to-end tests of the real operator process (`disagg run`) against the local cluster.

Each test runs its own operator, namespaced to the test's namespace (`disagg run -n <ns>`), with a
ServiceAccount token (TokenRequest) bound to the rules `disagg rbac` prints, never as cluster admin.
A per-session admission policy keeps any other operator on the cluster (e.g. `make demo`'s
cluster-wide one) from writing in these namespaces; see operator_support.py.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client as kclient

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import render_service
from support.operators import (
    CONDITION_TYPES,
    EXAMPLES,
    MANAGED_BY_SELECTOR,
    ROLE_LABEL,
    SERVICE_LABEL,
    SESSION_LABEL,
    WRITE_METHODS,
    Cluster,
    E2ESession,
    Kubectl,
    Operators,
    bin_dir,
    condition,
    disagg_cli,
    dump,
    expected_replicas,
    in_namespace,
    is_ready,
    isolate,
    key,
    load_docs,
    operator_session,
    operators_of,
    renamed_rbac,
    storage_for,
    wait_until,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

RESYNC_S = 5.0
READY_TIMEOUT_S = 90.0
EXAMPLE_IDS = [p.stem for p in EXAMPLES]
ACCELERATOR_RESOURCES = {entry.resource_name for entry in DEFAULT_CATALOG.accelerators.values()}


# ----------------------------------------------------------------------------------------------------
# fixtures


Env = E2ESession


@pytest.fixture(scope="session")
def env(cluster: LocalCluster, kube_api: kclient.ApiClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """CRD installed; an operator identity with the shipped RBAC rules and a TokenRequest kubeconfig;
    the admission policy that isolates this session's namespaces."""
    kubectl = Kubectl(bin_dir() / "kubectl", cluster.kubeconfig)
    workdir = tmp_path_factory.mktemp("operator-e2e")
    with operator_session(kubectl, Cluster(kube_api), workdir, "e2e") as session:
        yield session


@pytest.fixture
def ns(env: Env, e2e_namespace: str) -> str:
    """The test's namespace, under this session's isolation policy (checked before it is used)."""
    isolate(env.kubectl, env.session, e2e_namespace)
    return e2e_namespace


@pytest.fixture
def operators(env: Env, ns: str, request: pytest.FixtureRequest) -> Iterator[Operators]:
    """Operators of the test (stopped before its namespace is deleted)."""
    with operators_of(env, request.node.name, RESYNC_S) as ops:
        yield ops


# ----------------------------------------------------------------------------------------------------
# helpers


def example_path(prefix: str) -> Path:
    (path,) = [p for p in EXAMPLES if p.name.startswith(prefix)]
    return path


def services_of(path: Path, namespace: str) -> list[dict[str, Any]]:
    return [in_namespace(d, namespace) for d in load_docs(path) if d.get("kind") == "InferenceService"]


def apply_services(env: Env, namespace: str, services: list[dict[str, Any]]) -> None:
    storage = storage_for(env.session, namespace, services)
    if storage:
        env.kubectl("apply", "-f", "-", input=dump(storage))
    env.kubectl("apply", "-f", "-", input=dump(services))


def expected_children(manifest: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every child `disagg render` gives for this service."""
    return {key(m) for m in render_service(copy.deepcopy(manifest), DEFAULT_CATALOG)}


def wait_ready(env: Env, ops: Operators, namespace: str, name: str, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        svc = env.cluster.service(namespace, name)
        return svc if is_ready(svc) else None

    return wait_until(ready, timeout, f"InferenceService {namespace}/{name} to be Ready=True", ops.diagnostics())


def wait_condition(
    env: Env, ops: Operators, namespace: str, name: str, ctype: str, status: str, reason: str, timeout: float = 45
) -> dict[str, Any]:
    def matches() -> dict[str, Any] | None:
        svc = env.cluster.service(namespace, name)
        cond = condition(svc, ctype)
        assert cond is not None, f"no {ctype} condition yet: {((svc or {}).get('status') or {})}"
        assert (cond["status"], cond["reason"]) == (status, reason), cond
        return svc

    return wait_until(matches, timeout, f"{namespace}/{name} {ctype}={status} reason {reason}", ops.diagnostics())


def printer_columns(env: Env, namespace: str, name: str) -> dict[str, str]:
    lines = env.kubectl("-n", namespace, "get", "dis", name, "-o", "wide").stdout.splitlines()
    assert len(lines) == 2, lines
    return dict(zip(lines[0].split(), lines[1].split(), strict=False))


def pool_pods_ready(env: Env, namespace: str, name: str, role: str, count: int) -> list[Any]:
    pods = env.cluster.pods(namespace, f"{SERVICE_LABEL}={name},{ROLE_LABEL}={role}")
    assert len(pods) == count, f"{role}: {len(pods)} pods, want {count}: {[p.metadata.name for p in pods]}"
    for pod in pods:
        conds = {c.type: c.status for c in pod.status.conditions or []}
        assert conds.get("Ready") == "True", f"{pod.metadata.name} not Ready: {conds}"
    return pods


def assert_converged(env: Env, ops: Operators, manifest: dict[str, Any]) -> dict[str, Any]:
    """Everything a converged service shows: children, owners, placement, status and printer columns."""
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    spec = manifest["spec"]
    replicas = {role: expected_replicas(spec[role]) for role in ("prefill", "decode")}
    replicas["router"] = int((spec.get("router") or {}).get("replicas", 1))

    def converged() -> dict[str, Any]:
        svc = env.cluster.service(namespace, name)
        status = (svc or {}).get("status") or {}
        counts = {role: ((status.get(role) or {}).get("replicas"), (status.get(role) or {}).get("readyReplicas"))
                  for role in ("prefill", "decode")}
        assert is_ready(svc), f"Ready: {condition(svc, 'Ready')}; pools {counts}"
        assert counts == {role: (replicas[role], replicas[role]) for role in counts}, f"Ready=True but pools {counts}"
        assert svc is not None
        return svc

    svc = wait_until(converged, READY_TIMEOUT_S,
                     f"{namespace}/{name} to be Ready=True with prefill {replicas['prefill']}/{replicas['prefill']} "
                     f"and decode {replicas['decode']}/{replicas['decode']} ready", ops.diagnostics())
    diag = ops.diagnostics()
    uid, generation = svc["metadata"]["uid"], svc["metadata"]["generation"]

    want = expected_children(manifest)
    children = env.cluster.children(namespace, f"{SERVICE_LABEL}={name}")
    have = [key(c) for c in children]
    assert sorted(have) == sorted(want), (
        f"children of {name}: missing {sorted(want - set(have))}, unexpected {sorted(set(have) - want)}\n{diag()}"
    )
    for child in children:
        refs = child["metadata"].get("ownerReferences") or []
        assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
            ("InferenceService", name, uid, True)
        ], f"{key(child)} owner references: {refs}"

    pods = {
        role: wait_until(partial(pool_pods_ready, env, namespace, name, role, count), 30,
                         f"{count} Ready {role} pods of {name}", diag)
        for role, count in replicas.items()
    }
    for role in ("prefill", "decode"):
        accelerator = DEFAULT_CATALOG[spec[role]["accelerator"]["type"]]
        for pod in pods[role]:
            node = env.cluster.core.read_node(pod.spec.node_name)
            labels = node.metadata.labels or {}
            wrong = {k: (labels.get(k), v) for k, v in accelerator.node_labels.items() if labels.get(k) != v}
            assert not wrong, (
                f"{role} pod {pod.metadata.name} of {name} was scheduled onto node {node.metadata.name}, which is not "
                f"a {accelerator.name} node: label (have, want) {wrong}; node labels {labels}"
            )
            assert accelerator.resource_name in (node.status.allocatable or {}), node.metadata.name
            assert labels.get("node.kubernetes.io/instance-type") in accelerator.instance_types, node.metadata.name
    for pod in pods["router"]:
        node = env.cluster.core.read_node(pod.spec.node_name)
        held = ACCELERATOR_RESOURCES & set(node.status.allocatable or {})
        assert not held, f"router pod {pod.metadata.name} landed on accelerator node {node.metadata.name} ({held})"

    svc = env.cluster.service(namespace, name) or {}
    status = svc.get("status") or {}
    for role in ("prefill", "decode"):
        pool = status.get(role) or {}
        assert (pool.get("replicas"), pool.get("readyReplicas")) == (replicas[role], replicas[role]), (
            f"status.{role} of {name}: {pool}, want {replicas[role]}/{replicas[role]}"
        )
    assert status.get("observedGeneration") == generation, status
    for ctype in CONDITION_TYPES:
        cond = condition(svc, ctype)
        assert cond and cond["status"] == "True", f"{name} {ctype}: {cond}"
        assert cond["observedGeneration"] == generation, f"{name} {ctype}: {cond}"
    columns = printer_columns(env, namespace, name)
    assert columns["PREFILL"] == f"{replicas['prefill']}/{replicas['prefill']}", columns
    assert columns["DECODE"] == f"{replicas['decode']}/{replicas['decode']}", columns
    assert columns["READY"] == "True", columns
    assert columns["ENDPOINT"] == f"http://{name}.{namespace}.svc:{(spec.get('router') or {}).get('port', 8000)}"
    return svc


def child_versions(env: Env, namespace: str, name: str) -> dict[tuple[str, str], tuple[Any, str]]:
    return {
        key(c): (c["metadata"].get("generation"), c["metadata"]["resourceVersion"])
        for c in env.cluster.children(namespace, f"{SERVICE_LABEL}={name}")
    }


def wait_available(env: Env, ops: Operators, namespace: str, name: str) -> None:
    """Every Deployment of the service rolled out and its pods available: the Deployment controller's last
    status write (`minReadySeconds` after the pods turn Ready) is behind us."""
    def available() -> bool:
        for child in env.cluster.children(namespace, f"{SERVICE_LABEL}={name}"):
            if child.get("kind") != "Deployment":
                continue
            status, want = child.get("status") or {}, (child.get("spec") or {}).get("replicas", 1)
            if status.get("observedGeneration") != child["metadata"].get("generation"):
                return False
            if status.get("availableReplicas", 0) != want or status.get("updatedReplicas", 0) != want:
                return False
        return True

    wait_until(available, 60, f"the Deployments of {namespace}/{name} available", ops.diagnostics())


def warning_events(env: Env, namespace: str, name: str, reason: str) -> list[Any]:
    events = env.cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=InferenceService"
    ).items
    return [e for e in events if e.type == "Warning" and e.reason == reason]


# ----------------------------------------------------------------------------------------------------
# 1. CRD, rendered examples and RBAC against the API server


def test_crd_is_established(env: Env) -> None:
    crd = yaml.safe_load(env.kubectl("get", "crd", "inferenceservices.disagg.dev", "-o", "yaml").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True", conditions
    assert "dis" in crd["spec"]["names"]["shortNames"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["served"] and version["storage"] and "status" in version["subresources"]
    (want,) = [v for v in yaml.safe_load(disagg_cli("crd").stdout)["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["schema"] == want["schema"], "the installed schema differs from `disagg crd`"
    assert version["additionalPrinterColumns"] == want["additionalPrinterColumns"]


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_rendered_example_passes_server_dry_run(env: Env, ns: str, example: Path) -> None:
    rendered = disagg_cli("render", "-f", str(example), "--namespace", ns)
    assert rendered.returncode == 0, rendered.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(rendered.stdout)}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Role"} <= kinds, kinds
    out = env.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.stdout).stdout
    assert "(server dry run)" in out, out
    services = dump(services_of(example, ns))
    env.kubectl("apply", "--dry-run=server", "-f", "-", input=services)


def test_shipped_rbac_applies_and_is_least_privilege(env: Env) -> None:
    shipped = disagg_cli("rbac")
    assert shipped.returncode == 0, shipped.stderr
    # as printed (names disagg-operator, namespace disagg-system): the API server accepts it as is
    # (the ServiceAccount's namespace must exist for a server-side dry run; a fresh cluster lacks it)
    namespace = env.kubectl("create", "namespace", "disagg-system", "--dry-run=client", "-o", "yaml")
    env.kubectl("apply", "-f", "-", input=namespace.stdout)
    env.kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", "-", input=shipped.stdout)
    # this session's copy (same rules, own names) is live; its token authenticates as the ServiceAccount
    whoami = env.kubectl("--kubeconfig", str(env.operator_kubeconfig), "auth", "whoami",
                         "-o", "jsonpath={.status.userInfo.username}")
    assert whoami.stdout == env.sa_user(), whoami.stdout
    user = env.sa_user()
    for verb, resource in [("create", "deployments.apps"), ("delete", "networkpolicies.networking.k8s.io"),
                           ("patch", "inferenceservices.disagg.dev/status"), ("list", "pods")]:
        answer = env.kubectl("auth", "can-i", verb, resource, "-n", "default", f"--as={user}", check=False)
        assert answer.stdout.strip() == "yes", (verb, resource, answer.stdout, answer.stderr)
    for verb, resource in [("create", "pods"), ("get", "secrets"), ("delete", "nodes"), ("create", "clusterroles"),
                           ("update", "inferenceservices.disagg.dev")]:
        answer = env.kubectl("auth", "can-i", verb, resource, "-n", "default", f"--as={user}", check=False)
        assert answer.stdout.strip() == "no", (verb, resource, answer.stdout, answer.stderr)


# ----------------------------------------------------------------------------------------------------
# 2. every example converges onto the right nodes


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_converges_on_its_accelerators(env: Env, ns: str, operators: Operators, example: Path) -> None:
    services = services_of(example, ns)
    operators.start(ns)
    apply_services(env, ns, services)
    for manifest in services:
        assert_converged(env, operators, manifest)


# ----------------------------------------------------------------------------------------------------
# 3. a spec edit rolls out and status follows


def test_spec_edit_rolls_out_and_status_follows(env: Env, ns: str, operators: Operators) -> None:
    (manifest,) = services_of(example_path("02"), ns)
    name = manifest["metadata"]["name"]
    assert "autoscaling" not in manifest["spec"]["decode"], "needs a pool with a fixed replica count"
    operators.start(ns)
    apply_services(env, ns, [manifest])
    before = assert_converged(env, operators, manifest)
    diag = operators.diagnostics()

    image, extra = "registry.example/sglang:e2e-edit", ["--max-running-requests", "48"]
    decode_replicas = int(manifest["spec"]["decode"]["replicas"]) + 1
    patch = {"spec": {"engine": {"image": image, "extraArgs": extra}, "decode": {"replicas": decode_replicas}}}
    env.kubectl("-n", ns, "patch", "inferenceservice", name, "--type=merge", "-p", yaml.safe_dump(patch))
    generation = (env.cluster.service(ns, name) or {})["metadata"]["generation"]
    assert generation == before["metadata"]["generation"] + 1

    want = {"prefill": int(manifest["spec"]["prefill"]["replicas"]), "decode": decode_replicas}

    def rolled_out(role: str) -> bool:
        # an image and arguments are a new revision: it comes up in the other slot (reconcile/rollout.py), the
        # routers switch to it and the old pools go
        found = env.cluster.apps.list_namespaced_deployment(ns, field_selector=f"metadata.name={name}--{role}-b").items
        assert found, f"no {role} pool of the new revision yet"
        (dep,) = found
        (container,) = dep.spec.template.spec.containers
        assert container.image == image, f"{role} template image {container.image}"
        assert container.args[-2:] == extra, f"{role} args end {container.args[-4:]}"
        assert dep.spec.replicas == want[role], f"{role} spec.replicas {dep.spec.replicas}"
        st = dep.status
        assert (st.observed_generation or 0) >= dep.metadata.generation, f"{role} rollout not observed"
        counts = (st.replicas, st.updated_replicas, st.ready_replicas, st.available_replicas)
        assert counts == (want[role],) * 4, f"{role} replicas/updated/ready/available {counts}"
        pods = pool_pods_ready(env, ns, name, role, want[role])
        assert all(p.spec.containers[0].image == image for p in pods), f"{role} pods with the old image remain"
        replica_sets = [
            rs for rs in env.cluster.apps.list_namespaced_replica_set(ns, label_selector=f"{SERVICE_LABEL}={name},"
                                                                       f"{ROLE_LABEL}={role}").items
            if any(ref.uid == dep.metadata.uid for ref in rs.metadata.owner_references or [])
        ]
        active = [rs for rs in replica_sets if rs.spec.replicas]
        assert len(replica_sets) >= 1 and len(active) == 1, (
            f"{role} ReplicaSets (name, replicas): {[(rs.metadata.name, rs.spec.replicas) for rs in replica_sets]}"
        )
        assert active[0].spec.template.spec.containers[0].image == image
        return True

    for role in ("prefill", "decode"):
        wait_until(partial(rolled_out, role), 90, f"the {role} pool to roll out the edit", diag)

    def status_follows() -> bool:
        svc = env.cluster.service(ns, name) or {}
        status = svc.get("status") or {}
        observed = status.get("observedGeneration")
        assert observed == generation, f"status.observedGeneration {observed}"
        for ctype in CONDITION_TYPES:
            cond = condition(svc, ctype) or {}
            assert (cond.get("status"), cond.get("observedGeneration")) == ("True", generation), f"{ctype}: {cond}"
        for role, count in want.items():
            pool = status.get(role) or {}
            assert (pool.get("replicas"), pool.get("readyReplicas")) == (count, count), f"{role}: {pool}"
            assert pool.get("workload") == f"{name}--{role}-b", pool
            left = env.cluster.apps.list_namespaced_deployment(ns, field_selector=f"metadata.name={name}-{role}").items
            assert not left, f"the old {role} pool is still there"
        assert "rollout" not in status, status.get("rollout")
        return True

    wait_until(status_follows, 60, f"status of {name} to follow generation {generation}", diag)
    columns = printer_columns(env, ns, name)
    assert (columns["PREFILL"], columns["DECODE"]) == (f"{want['prefill']}/{want['prefill']}",
                                                      f"{decode_replicas}/{decode_replicas}"), columns


# ----------------------------------------------------------------------------------------------------
# 4. killed mid-reconcile, restarted: converges with no duplicates and no orphans


def test_operator_killed_mid_reconcile_converges_after_restart(env: Env, ns: str, operators: Operators) -> None:
    services = [s for path in EXAMPLES for s in services_of(path, ns)]
    want = set().union(*(expected_children(s) for s in services))
    first = operators.start(ns, name="first")
    storage = storage_for(env.session, ns, services)
    if storage:
        env.kubectl("apply", "-f", "-", input=dump(storage))
    started = time.monotonic()
    env.kubectl("apply", "-f", "-", input=dump(services))
    diag = operators.diagnostics()

    def some_child() -> bool:
        return bool(env.cluster.core.list_namespaced_service_account(ns, label_selector=MANAGED_BY_SELECTOR).items)

    wait_until(some_child, 20, "the first operator to start creating children", diag, interval=0.01)
    first.kill()
    killed_after = time.monotonic() - started
    at_kill = {key(c) for c in env.cluster.children(ns)}
    assert first.proc is not None and first.proc.returncode == -9
    print(f"SIGKILL {killed_after:.3f}s after the apply started, with {len(at_kill)}/{len(want)} children")
    assert len(at_kill) < len(want), (
        f"the operator had created all {len(want)} children before it was killed ({killed_after:.2f}s after "
        "apply): the kill was not mid-reconcile"
    )

    operators.start(ns, name="restarted")
    for svc in services:
        wait_ready(env, operators, ns, svc["metadata"]["name"])

    live_services = {s["metadata"]["uid"]: s["metadata"]["name"] for s in env.cluster.services(ns)}
    children = env.cluster.children(ns)
    keys = [key(c) for c in children]
    assert len(keys) == len(set(keys)), f"duplicate children: {sorted(k for k in keys if keys.count(k) > 1)}"
    assert set(keys) == want, (
        f"children after restart: missing {sorted(want - set(keys))}, unexpected {sorted(set(keys) - want)}\n{diag()}"
    )
    for child in children:
        owners = [r["uid"] for r in child["metadata"].get("ownerReferences") or []]
        assert len(owners) == 1 and owners[0] in live_services, f"orphan {key(child)}: owners {owners}"
    deployments = {d.metadata.uid: d for d in env.cluster.apps.list_namespaced_deployment(ns).items}
    replica_sets = env.cluster.apps.list_namespaced_replica_set(ns, label_selector=MANAGED_BY_SELECTOR).items
    per_deployment: dict[str, int] = {}
    for rs in replica_sets:
        owners = [r.uid for r in rs.metadata.owner_references or []]
        assert len(owners) == 1 and owners[0] in deployments, f"orphan ReplicaSet {rs.metadata.name}"
        per_deployment[owners[0]] = per_deployment.get(owners[0], 0) + 1
    rolled = {deployments[u].metadata.name: n for u, n in per_deployment.items() if n != 1}
    assert not rolled, f"Deployments with more than one ReplicaSet (rolled again after the restart): {rolled}"
    rs_uids = {rs.metadata.uid: rs for rs in replica_sets}
    pods = env.cluster.pods(ns, MANAGED_BY_SELECTOR)
    for pod in pods:
        owners = [r.uid for r in pod.metadata.owner_references or []]
        assert len(owners) == 1 and owners[0] in rs_uids, f"orphan pod {pod.metadata.name}"
    for dep in deployments.values():
        mine = [p for p in pods if p.metadata.owner_references[0].uid in
                {u for u, rs in rs_uids.items() if rs.metadata.owner_references[0].uid == dep.metadata.uid}]
        assert len(mine) == dep.spec.replicas, f"{dep.metadata.name}: {len(mine)} pods for {dep.spec.replicas} replicas"


# ----------------------------------------------------------------------------------------------------
# 5. deleting a service: the garbage collector removes every child


def test_delete_removes_every_child_through_the_garbage_collector(env: Env, ns: str, operators: Operators) -> None:
    (manifest,) = services_of(example_path("03"), ns)
    name = manifest["metadata"]["name"]
    op = operators.start(ns)
    apply_services(env, ns, [manifest])
    wait_ready(env, operators, ns, name)
    selector = f"{SERVICE_LABEL}={name}"
    assert env.cluster.children(ns, selector) and env.cluster.pods(ns, selector)
    deletes_before = op.request_counts().get("DELETE", 0.0)

    env.kubectl("-n", ns, "delete", "inferenceservice", name, "--wait=false")

    def all_gone() -> bool:
        left = [f"{k}/{n}" for k, n in map(key, env.cluster.children(ns, selector))]
        left += [f"ReplicaSet/{rs.metadata.name}" for rs in
                 env.cluster.apps.list_namespaced_replica_set(ns, label_selector=selector).items]
        left += [f"Pod/{p.metadata.name}" for p in
                 env.cluster.core.list_namespaced_pod(ns, label_selector=selector).items]
        if env.cluster.service(ns, name) is not None:
            left.append(f"InferenceService/{name}")
        assert not left, f"still there: {left}"
        return True

    wait_until(all_gone, 60, f"every child of {name} to be garbage-collected", operators.diagnostics())
    assert op.request_counts().get("DELETE", 0.0) == deletes_before, "the operator deleted children itself"


# ----------------------------------------------------------------------------------------------------
# 6. a pool with nowhere to run: Unschedulable with the scheduler's reason; the operator stays healthy


def test_pool_without_nodes_is_unschedulable_and_operator_stays_healthy(
    env: Env, ns: str, operators: Operators
) -> None:
    (stranded,) = services_of(example_path("01"), ns)
    stranded["metadata"]["name"] = "stranded"
    assert "nvidia-b300" in DEFAULT_CATALOG.names()
    stranded["spec"]["decode"]["accelerator"]["type"] = "nvidia-b300"  # in the catalogue, no such node here
    (healthy,) = services_of(example_path("03"), ns)
    op = operators.start(ns)
    apply_services(env, ns, [stranded])

    def stranded_state() -> dict[str, Any]:
        svc = env.cluster.service(ns, "stranded")
        states = {t: ((condition(svc, t) or {}).get("status"), (condition(svc, t) or {}).get("reason"))
                  for t in ("PrefillReady", "DecodeReady", "Ready")}
        assert states == {"PrefillReady": ("True", "AllReplicasReady"), "DecodeReady": ("False", "Unschedulable"),
                          "Ready": ("False", "Unschedulable")}, states
        assert svc is not None
        return svc

    svc = wait_until(stranded_state, RESYNC_S * 4 + 15,
                     "stranded: PrefillReady=True, DecodeReady=False/Unschedulable, Ready=False/Unschedulable",
                     operators.diagnostics())
    decode = condition(svc, "DecodeReady") or {}
    assert "cannot be scheduled" in decode["message"], decode
    assert re.search(r"Insufficient nvidia\.com/gpu|didn't match Pod's node affinity/selector", decode["message"]), (
        f"the scheduler's reason is missing from {decode['message']!r}"
    )
    ready = condition(svc, "Ready") or {}
    assert decode["message"] in ready["message"], ready
    wait_until(lambda: warning_events(env, ns, "stranded", "Unschedulable"), 15,
               "a Warning Event Unschedulable", operators.diagnostics())

    assert op.alive() and op.healthz() == 200, op.log_tail()
    apply_services(env, ns, [healthy])
    wait_ready(env, operators, ns, healthy["metadata"]["name"])
    assert op.alive() and op.healthz() == 200, op.log_tail()
    assert not is_ready(env.cluster.service(ns, "stranded"))


# ----------------------------------------------------------------------------------------------------
# 7. invalid specs: refused by the API server, or InvalidSpec without touching what runs


def _min_above_max(spec: dict[str, Any]) -> None:
    spec["prefill"]["autoscaling"] = {"minReplicas": 5, "maxReplicas": 2}


def _mooncake_unequal_tp(spec: dict[str, Any]) -> None:
    spec["engine"] = {"kind": "sglang"}
    spec["kvTransfer"] = {"connector": "mooncake"}
    spec["prefill"]["parallelism"] = {"tensor": 2}
    spec["decode"]["parallelism"] = {"tensor": 1}


def _unknown_field(spec: dict[str, Any]) -> None:
    spec["prefill"]["gpus"] = 4


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_min_above_max, "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
        (_mooncake_unequal_tp,
         "kvTransfer.connector mooncake needs equal prefill.parallelism.tensor and decode.parallelism.tensor"),
        (_unknown_field, 'unknown field "spec.prefill.gpus"'),
    ],
    ids=["min-above-max", "mooncake-unequal-tp", "unknown-field"],
)
def test_api_server_rejects_invalid_spec(
    env: Env, ns: str, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    (manifest,) = services_of(example_path("01"), ns)
    mutate(manifest["spec"])
    result = env.kubectl("apply", "-f", "-", input=dump([manifest]), check=False)
    assert result.returncode != 0, f"the API server accepted an invalid spec:\n{result.stdout}"
    assert message in result.stderr, f"expected {message!r} in:\n{result.stderr}"
    assert env.cluster.service(ns, manifest["metadata"]["name"]) is None


def test_invalid_spec_is_reported_and_creates_nothing(env: Env, ns: str, operators: Operators) -> None:
    (unknown_type,) = services_of(example_path("01"), ns)
    unknown_type["metadata"]["name"] = "unknown-type"
    unknown_type["spec"]["prefill"]["accelerator"]["type"] = "nvidia-h999"
    (wrong_vendor,) = services_of(example_path("02"), ns)
    wrong_vendor["metadata"]["name"] = "sglang-on-trainium"
    for role in ("prefill", "decode"):
        wrong_vendor["spec"][role]["accelerator"]["type"] = "aws-trainium2"
    operators.start(ns)
    apply_services(env, ns, [unknown_type, wrong_vendor])

    expectations = {
        "unknown-type": ("spec.prefill.accelerator.type", "unknown accelerator type 'nvidia-h999'"),
        "sglang-on-trainium": ("spec.prefill.accelerator.type", "engine sglang does not run on aws accelerators"),
    }
    for name, (field_path, text) in expectations.items():
        svc = wait_condition(env, operators, ns, name, "Ready", "False", "InvalidSpec")
        ready = condition(svc, "Ready") or {}
        assert field_path in ready["message"] and text in ready["message"], ready
        assert ready["observedGeneration"] == svc["metadata"]["generation"], ready
        events = wait_until(partial(warning_events, env, ns, name, "InvalidSpec"), 15,
                            f"a Warning Event InvalidSpec for {name}", operators.diagnostics())
        assert any(field_path in (e.message or "") for e in events), [e.message for e in events]
        assert env.cluster.children(ns, f"{SERVICE_LABEL}={name}") == [], f"{name} got children"


def test_invalid_edit_leaves_running_pools_exactly_as_they_were(env: Env, ns: str, operators: Operators) -> None:
    (manifest,) = services_of(example_path("01"), ns)
    name = manifest["metadata"]["name"]
    operators.start(ns)
    apply_services(env, ns, [manifest])
    wait_ready(env, operators, ns, name)
    wait_available(env, operators, ns, name)
    before = child_versions(env, ns, name)
    pods_before = sorted(p.metadata.name for p in env.cluster.pods(ns, f"{SERVICE_LABEL}={name}"))

    patch = {"spec": {"decode": {"accelerator": {"type": "nvidia-h999"}}}}
    env.kubectl("-n", ns, "patch", "inferenceservice", name, "--type=merge", "-p", yaml.safe_dump(patch))
    svc = wait_condition(env, operators, ns, name, "Ready", "False", "InvalidSpec")
    ready = condition(svc, "Ready") or {}
    assert "spec.decode.accelerator.type" in ready["message"], ready
    assert ready["observedGeneration"] == svc["metadata"]["generation"] == 2, ready
    assert (condition(svc, "DecodeReady") or {}).get("status") == "True", "the running pool is still described"
    wait_until(lambda: warning_events(env, ns, name, "InvalidSpec"), 15, "a Warning Event InvalidSpec",
               operators.diagnostics())
    time.sleep(RESYNC_S + 1.5)  # at least one periodic resync of the invalid spec
    after = child_versions(env, ns, name)
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert after == before, f"children changed under an invalid spec (before, after): {changed}"
    assert sorted(p.metadata.name for p in env.cluster.pods(ns, f"{SERVICE_LABEL}={name}")) == pods_before


# ----------------------------------------------------------------------------------------------------
# 8. RBAC is real: one rule less and the operator cannot converge


def test_operator_without_networkpolicy_permission_cannot_converge(
    cluster: LocalCluster, env: Env, ns: str, operators: Operators
) -> None:
    account = "disagg-operator-nonetpol"
    role_name = f"{env.rbac_name}-nonetpol"
    rbac = disagg_cli("rbac", "--namespace", env.operator_namespace, "--service-account", account)
    docs = renamed_rbac(list(yaml.safe_load_all(rbac.stdout)), role_name, drop_resource="networkpolicies")
    for doc in docs:
        doc["metadata"].setdefault("labels", {})[SESSION_LABEL] = env.session
    env.kubectl("apply", "--server-side", "-f", "-", input=dump(docs))
    try:
        user = env.sa_user(account)
        denied = env.kubectl("auth", "can-i", "create", "networkpolicies.networking.k8s.io", "-n", ns, f"--as={user}",
                             check=False)
        assert denied.stdout.strip() == "no", denied.stdout
        kubeconfig = cluster.sa_kubeconfig(env.operator_namespace, account, env.workdir / f"{account}.kubeconfig")
        op = operators.start(ns, name="nonetpol", kubeconfig=kubeconfig)
        (manifest,) = services_of(example_path("01"), ns)
        name = manifest["metadata"]["name"]
        apply_services(env, ns, [manifest])

        def forbidden_logged() -> bool:
            return bool(re.search(r"networkpolicies.*(: 403 |Forbidden|forbidden)", op.log_text()))

        wait_until(forbidden_logged, 30, "the operator to log that networkpolicies are forbidden to it",
                   operators.diagnostics())
        deadline = time.monotonic() + RESYNC_S + 2  # through a resync: still not converged
        while time.monotonic() < deadline:
            svc = env.cluster.service(ns, name)
            assert not is_ready(svc), f"Ready=True without the NetworkPolicy permission:\n{operators.diagnostics()()}"
            time.sleep(0.5)
        assert env.cluster.net.list_namespaced_network_policy(ns).items == []
    finally:
        env.kubectl("delete", "clusterrolebinding,clusterrole", role_name, "--wait=false", check=False)


# ----------------------------------------------------------------------------------------------------
# 9. a steady operator writes nothing


def test_idle_operator_makes_no_writes(env: Env, ns: str, operators: Operators) -> None:
    (manifest,) = services_of(example_path("01"), ns)
    name = manifest["metadata"]["name"]
    assert manifest["spec"]["prefill"].get("autoscaling"), "an autoscaled service: the autoscaler must stay quiet too"
    op = operators.start(ns)
    apply_services(env, ns, [manifest])
    wait_ready(env, operators, ns, name)
    # converged: the autoscaler has reported too (no Prometheus here: ScalingActive=False, once)
    wait_until(lambda: condition(env.cluster.service(ns, name), "ScalingActive"), 3 * RESYNC_S + 5,
               "the ScalingActive condition", operators.diagnostics())
    assert is_ready(env.cluster.service(ns, name))
    before, reconciles_before = op.request_counts(), op.reconciles()
    time.sleep(15)
    after = op.request_counts()
    writes = {m: after.get(m, 0.0) - before.get(m, 0.0) for m in WRITE_METHODS}
    assert not any(writes.values()), f"writes while idle: {writes}\n{op.log_tail()}"
    assert op.reconciles() - reconciles_before >= 2, f"the resync ({RESYNC_S}s) did not run in 15s\n{op.log_tail()}"
