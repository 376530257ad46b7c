"""Workers over several nodes on the local cluster, with the real LeaderWorkerSet controller
(sigs.k8s.io/lws v0.10.0, started by hack/cluster.py with its webhooks on loopback).

A DeepSeek-V3-like service (tests/golden/input/multinode-vllm-deepseek.yaml): prefill on one node of
8 H200, decode workers of 16 H200 over 2 nodes (data-parallel attention, expert parallelism). The
operator makes the decode pool a LeaderWorkerSet; the controller and its pod webhook make the groups;
kwok runs the pods. Checked: the group's pods and their LWS environment and engine arguments, the
router's selector matching the leaders only, the autoscaler taking decode from 1 to 2 groups, a killed
worker pod taking its group down and back, every group inside one network domain; and the same spec
under an operator identity that may not manage LeaderWorkerSets: the clear condition and no child.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client as kclient

from support.operators import (
    MANAGED_BY_SELECTOR,
    ROLE_LABEL,
    SERVICE_LABEL,
    SESSION_LABEL,
    Cluster,
    E2ESession,
    Kubectl,
    Operators,
    bin_dir,
    condition,
    disagg_cli,
    dump,
    in_namespace,
    is_ready,
    isolate,
    operator_session,
    operators_of,
    renamed_rbac,
    sa_kubeconfig,
    wait_until,
)
from support.paths import REPO

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

SERVICE = yaml.safe_load((REPO / "tests" / "golden" / "input" / "multinode-vllm-deepseek.yaml").read_text())
# prefill on an H100 node: the 2 decode groups then hold 2 of the 4 two-node H200 domains, and another
# service on the shared cluster (the demo's decode) may hold H200 nodes of the others
SERVICE["spec"]["prefill"]["accelerator"]["type"] = "nvidia-h100"
NAME = SERVICE["metadata"]["name"]
LWS_GROUP, LWS_VERSION, LWS_PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
DOMAIN = "topology.k8s.aws/network-node-layer-3"  # the catalogue's first topology label of nvidia-h200
READY_S = 120


@dataclass(frozen=True)
class MultiNodeEnv(E2ESession):
    no_lws_kubeconfig: Path = Path()
    """An operator identity with every rule but the LeaderWorkerSet ones."""


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, kube_api: kclient.ApiClient, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[MultiNodeEnv]:
    kubectl = Kubectl(bin_dir() / "kubectl", cluster.kubeconfig)
    served = kubectl("get", "crd", f"{LWS_PLURAL}.{LWS_GROUP}", check=False)
    assert served.returncode == 0, "hack/cluster.py up starts the LeaderWorkerSet controller and applies its CRDs"
    workdir = tmp_path_factory.mktemp("multinode-e2e")
    with operator_session(kubectl, Cluster(kube_api), workdir, "mn") as session:
        rbac = disagg_cli("rbac", "--namespace", session.operator_namespace, "--service-account", "no-lws")
        assert rbac.returncode == 0, rbac.stderr
        docs = renamed_rbac(list(yaml.safe_load_all(rbac.stdout)), f"{session.rbac_name}-no-lws",
                            drop_resource="leaderworkersets")
        for doc in docs:
            doc["metadata"].setdefault("labels", {})[SESSION_LABEL] = session.session
        kubectl("apply", "--server-side", "-f", "-", input=dump(docs))
        no_lws = sa_kubeconfig(session.operator_namespace, "no-lws", workdir / "no-lws.kubeconfig")
        yield session.extended(MultiNodeEnv, no_lws_kubeconfig=no_lws)


@pytest.fixture
def ns(env: MultiNodeEnv, e2e_namespace: str) -> str:
    isolate(env.kubectl, env.session, e2e_namespace)
    return e2e_namespace


@pytest.fixture
def operators(env: MultiNodeEnv, ns: str, request: pytest.FixtureRequest) -> Iterator[Operators]:
    with operators_of(env, request.node.name, 5.0) as ops:
        yield ops


def service_in(namespace: str) -> dict[str, Any]:
    body = in_namespace(SERVICE, namespace)
    body["metadata"].pop("uid", None)
    return body


def lws(env: MultiNodeEnv, namespace: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = env.cluster.custom.get_namespaced_custom_object(
            LWS_GROUP, LWS_VERSION, namespace, LWS_PLURAL, f"{NAME}-decode")
        return obj
    except kclient.ApiException as e:
        if e.status == 404:
            return None
        raise


def decode_groups(env: MultiNodeEnv, namespace: str, groups: int) -> dict[str, list[Any]]:
    """The decode pods by group index once `groups` groups of 2 Ready pods exist (else AssertionError)."""
    pods = env.cluster.pods(namespace, f"{SERVICE_LABEL}={NAME},{ROLE_LABEL}=decode")
    by_group: dict[str, list[Any]] = {}
    for pod in pods:
        by_group.setdefault(pod.metadata.labels.get(GROUP_INDEX, "?"), []).append(pod)
    assert sorted(by_group) == [str(i) for i in range(groups)], {g: [p.metadata.name for p in ps]
                                                                  for g, ps in by_group.items()}
    for group, members in by_group.items():
        assert len(members) == 2, (group, [p.metadata.name for p in members])
        for pod in members:
            ready = {c.type: c.status for c in pod.status.conditions or []}.get("Ready")
            assert ready == "True" and pod.spec.node_name, (pod.metadata.name, ready, pod.spec.node_name)
    return by_group


def domains_of(env: MultiNodeEnv, members: list[Any]) -> set[str | None]:
    return {(env.cluster.core.read_node(p.spec.node_name).metadata.labels or {}).get(DOMAIN) for p in members}


def env_of(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env or [] if e.value is not None}


def test_deepseek_decode_runs_as_leaderworkerset_groups_packed_per_domain(
    env: MultiNodeEnv, ns: str, operators: Operators
) -> None:
    diag = operators.diagnostics(lambda: env.kubectl.text("-n", ns, "get", "lws,sts,pods", "-o", "wide"))
    operators.start(ns, flags=("--autoscale-tick", "1"))
    manifest = service_in(ns)
    env.kubectl("apply", "-f", "-", input=dump([manifest]))

    def ready_with(groups: int) -> dict[str, list[Any]]:
        svc = env.cluster.service(ns, NAME)
        assert is_ready(svc), condition(svc, "Ready")
        decode = ((svc or {}).get("status") or {}).get("decode") or {}
        assert (decode.get("replicas"), decode.get("readyReplicas")) == (groups, groups), decode
        return decode_groups(env, ns, groups)

    groups = wait_until(lambda: ready_with(1), READY_S, f"{NAME} Ready with 1 decode group of 2 pods", diag)
    group = lws(env, ns)
    assert group is not None and group["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert group["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert env.cluster.apps.list_namespaced_deployment(ns, label_selector=f"{ROLE_LABEL}=decode").items == []

    # what the engine needs: the LWS environment of each pod, and the flags that read it
    (leader,) = [p for p in groups["0"] if p.metadata.labels[WORKER_INDEX] == "0"]
    (worker,) = [p for p in groups["0"] if p.metadata.labels[WORKER_INDEX] == "1"]
    for pod, index in ((leader, "0"), (worker, "1")):
        assert env_of(pod)["LWS_LEADER_ADDRESS"] == f"{NAME}-decode-0.{NAME}-decode.{ns}"
        assert (env_of(pod)["LWS_GROUP_SIZE"], env_of(pod)["LWS_WORKER_INDEX"]) == ("2", index)
        args = pod.spec.containers[0].args
        assert args[args.index("--data-parallel-address") + 1] == "$(LWS_LEADER_ADDRESS)"
        assert args[args.index("--data-parallel-size") + 1] == "16"
        assert args[args.index("--data-parallel-size-local") + 1] == "8"
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
    assert "--headless" not in leader.spec.containers[0].args and leader.spec.containers[0].readiness_probe
    assert "--headless" in worker.spec.containers[0].args and worker.spec.containers[0].readiness_probe is None
    assert "$((LWS_WORKER_INDEX * DISAGG_DP_SIZE_LOCAL))" in worker.spec.containers[0].command[2]
    assert env_of(worker)["DISAGG_DP_SIZE_LOCAL"] == "8"
    assert len(domains_of(env, groups["0"])) == 1 and None not in domains_of(env, groups["0"])

    # the router discovers leaders only: its decode selector, as a label selector, matches the leaders
    router = env.cluster.apps.read_namespaced_deployment(f"{NAME}-router", ns)
    args = router.spec.template.spec.containers[0].args
    selector = args[args.index("--decode-selector") + 1: args.index("--service-discovery-port")]
    assert f"{WORKER_INDEX}=0" in selector
    matched = {p.metadata.name for p in env.cluster.pods(ns, ",".join(selector))}
    assert matched == {leader.metadata.name}, (matched, shlex.join(selector))

    # the autoscaler takes decode to 2 whole groups (minReplicas 2 forces it without metrics)
    env.kubectl("-n", ns, "patch", "inferenceservice", NAME, "--type=merge",
                "-p", '{"spec": {"decode": {"autoscaling": {"minReplicas": 2}}}}')
    groups = wait_until(lambda: ready_with(2), READY_S, f"{NAME} Ready with 2 decode groups", diag)
    scaled = lws(env, ns)
    assert scaled is not None and scaled["spec"]["replicas"] == 2
    owners = {e["manager"] for e in scaled["metadata"]["managedFields"]
              if "f:replicas" in ((e.get("fieldsV1") or {}).get("f:spec") or {})}
    assert owners == {"disagg-autoscaler"}, owners
    for members in groups.values():
        assert len(domains_of(env, members)) == 1, {p.metadata.name: p.spec.node_name for p in members}

    # a member's failure takes its whole group down and back
    (leader_1,) = [p for p in groups["1"] if p.metadata.labels[WORKER_INDEX] == "0"]
    (worker_1,) = [p for p in groups["1"] if p.metadata.labels[WORKER_INDEX] == "1"]
    env.cluster.core.delete_namespaced_pod(worker_1.metadata.name, ns)

    def recreated() -> dict[str, list[Any]]:
        groups = ready_with(2)
        uids = {p.metadata.name: p.metadata.uid for p in groups["1"]}
        assert uids[leader_1.metadata.name] != leader_1.metadata.uid, "group 1's leader was not recreated"
        assert uids[worker_1.metadata.name] != worker_1.metadata.uid
        return groups

    groups = wait_until(recreated, READY_S, "decode group 1 recreated and Ready", diag)
    untouched = {p.metadata.uid for p in groups["0"]} == {leader.metadata.uid, worker.metadata.uid}
    assert untouched, "group 0 was recreated too"
    for members in groups.values():
        assert len(domains_of(env, members)) == 1, {p.metadata.name: p.spec.node_name for p in members}


def test_an_operator_that_cannot_use_leaderworkersets_reports_it_and_creates_nothing(
    env: MultiNodeEnv, ns: str, operators: Operators
) -> None:
    operators.start(ns, kubeconfig=env.no_lws_kubeconfig)
    manifest = copy.deepcopy(service_in(ns))
    env.kubectl("apply", "-f", "-", input=dump([manifest]))

    def refused() -> dict[str, Any]:
        ready = condition(env.cluster.service(ns, NAME), "Ready")
        assert ready is not None and ready["reason"] == "LeaderWorkerSetUnavailable", ready
        return ready

    ready = wait_until(refused, 60, "Ready=False LeaderWorkerSetUnavailable", operators.diagnostics())
    assert ready["status"] == "False"
    assert "the decode workers span several nodes" in ready["message"]
    assert "may not" in ready["message"] and "leaderworkersets" in ready["message"], ready["message"]
    events = env.cluster.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={NAME}").items
    assert [e.type for e in events if e.reason == "LeaderWorkerSetUnavailable"] == ["Warning"]
    # nothing was created: no child of any kind, no LeaderWorkerSet, no pod
    assert env.cluster.children(ns, MANAGED_BY_SELECTOR) == []
    assert lws(env, ns) is None
    assert env.cluster.pods(ns, f"{SERVICE_LABEL}={NAME}") == []


def routed_decode(env: MultiNodeEnv, namespace: str) -> tuple[list[str], set[str]]:
    """The router Deployment's decode selector and the Ready pods it matches."""
    router = env.cluster.apps.read_namespaced_deployment(f"{NAME}-router", namespace)
    args = router.spec.template.spec.containers[0].args
    start = args.index("--decode-selector") + 1
    selector = args[start:next(i for i in range(start, len(args)) if args[i].startswith("--"))]
    ready = {p.metadata.name for p in env.cluster.pods(namespace, ",".join(selector))
             if {c.type: c.status for c in p.status.conditions or []}.get("Ready") == "True"}
    return selector, ready


def test_a_decode_pool_that_comes_to_span_nodes_rolls_out_beside_the_serving_one(
    env: MultiNodeEnv, ns: str, operators: Operators
) -> None:
    """One-node decode workers (a Deployment) become two-node ones (a LeaderWorkerSet): a new revision, which
    comes up beside the serving Deployment; the routers select Ready decode workers at every moment."""
    diag = operators.diagnostics(lambda: env.kubectl.text("-n", ns, "get", "deploy,lws,pods", "-o", "wide"))
    operators.start(ns)
    two_nodes = service_in(ns)
    two_nodes["spec"]["acceleratorBudget"] = 64  # room for the new pools beside the serving ones
    two_nodes["spec"]["decode"].pop("autoscaling")
    two_nodes["spec"]["decode"]["replicas"] = 1
    one_node = copy.deepcopy(two_nodes)
    one_node["spec"]["decode"]["parallelism"] = {"data": 8, "expert": True}
    env.kubectl("apply", "-f", "-", input=dump([one_node]))

    def serving_on_a_deployment() -> str:
        svc = env.cluster.service(ns, NAME)
        assert is_ready(svc), condition(svc, "Ready")
        assert routed_decode(env, ns)[1], "no Ready decode pod routed"
        assert lws(env, ns) is None
        return str(((svc or {}).get("status") or {}).get("revision"))

    old = wait_until(serving_on_a_deployment, READY_S, f"{NAME} Ready with a decode Deployment", diag)
    env.kubectl("apply", "-f", "-", input=dump([two_nodes]))
    gaps: list[tuple[list[str], str]] = []

    def switched() -> bool:
        selector, ready = routed_decode(env, ns)
        if not ready:
            gaps.append((selector, env.kubectl.text("-n", ns, "get", "deploy,lws", "-o", "wide")))
        svc = env.cluster.service(ns, NAME)
        status = (svc or {}).get("status") or {}
        assert status.get("revision") not in (None, old) and "rollout" not in status, status.get("rollout")
        assert is_ready(svc), condition(svc, "Ready")
        assert env.cluster.apps.list_namespaced_deployment(ns, label_selector=f"{ROLE_LABEL}=decode").items == []
        assert f"{WORKER_INDEX}=0" in selector and ready, (selector, ready)
        return True

    wait_until(switched, READY_S, "decode served by the LeaderWorkerSet, the Deployment gone", diag, interval=0.3)
    assert not gaps, f"{len(gaps)} samples with no Ready decode worker routed; first: {gaps[0]}"
    pods = env.cluster.pods(ns, f"{SERVICE_LABEL}={NAME},{ROLE_LABEL}=decode")
    assert {p.metadata.labels.get(WORKER_INDEX) for p in pods} == {"0", "1"}, "one group of two pods"
