"""Smoke tests of the local cluster itself: fake accelerator nodes, GPU scheduling through kwok, Prometheus,
and RBAC with a minted ServiceAccount token."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from kubernetes import client as kclient

from support.paths import REPO

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

CATALOG = yaml.safe_load((REPO / "operator" / "disagg" / "catalog" / "accelerators.yaml").read_text())["accelerators"]
# accelerator type -> how many fake nodes hack/cluster.py creates
EXPECTED_POOLS = {"nvidia-h100": 4, "nvidia-h200": 8, "nvidia-b200": 2, "amd-mi300x": 2, "aws-trainium2": 2}


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _selects(node: Any, labels: dict[str, str]) -> bool:
    have = node.metadata.labels or {}
    return all(have.get(k) == v for k, v in labels.items())


def test_up_is_idempotent(cluster: LocalCluster) -> None:
    proc = cluster.run("up", timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == f"export KUBECONFIG={cluster.kubeconfig}"
    assert "already up and healthy" in proc.stderr
    assert cluster.run("status").returncode == 0


def test_fake_accelerator_nodes(kube_api: kclient.ApiClient) -> None:
    core: Any = kclient.CoreV1Api(kube_api)
    # nodes a benchmark adds (bench/scale.py labels them) are not the cluster tool's
    nodes = [n for n in core.list_node().items if "disagg.dev/bench" not in (n.metadata.labels or {})]
    for node in nodes:
        assert "disagg.dev/accelerator" not in (node.metadata.labels or {}), node.metadata.name
    for acc_type, count in EXPECTED_POOLS.items():
        entry = CATALOG[acc_type]
        matching = [
            n
            for n in nodes
            if _selects(n, entry["nodeLabels"]) and entry["resourceName"] in (n.status.allocatable or {})
        ]
        assert len(matching) == count, (acc_type, [n.metadata.name for n in matching])
        for node in matching:
            labels = node.metadata.labels
            assert labels["node.kubernetes.io/instance-type"] == entry["instanceTypes"][0]
            assert node.status.allocatable[entry["resourceName"]] == str(entry["perNode"])
            assert node.status.capacity[entry["resourceName"]] == str(entry["perNode"])
            assert node.status.allocatable["pods"] == "110"
            if entry["vendor"] == "nvidia":
                assert labels["nvidia.com/gpu.present"] == "true"
                assert labels["nvidia.com/gpu.count"] == str(entry["perNode"])
            ready = [c for c in node.status.conditions if c.type == "Ready"]
            assert ready and ready[0].status == "True", node.metadata.name
    cpu_only = [
        n
        for n in nodes
        if not any(
            k in (n.status.allocatable or {}) for k in ("nvidia.com/gpu", "amd.com/gpu", "aws.amazon.com/neuron")
        )
    ]
    assert len(cpu_only) >= 2


def test_gpu_pod_is_scheduled_on_h200_and_ready(kube_api: kclient.ApiClient, e2e_namespace: str) -> None:
    core: Any = kclient.CoreV1Api(kube_api)
    pod = kclient.V1Pod(
        metadata=kclient.V1ObjectMeta(name="h200-probe"),
        spec=kclient.V1PodSpec(
            node_selector={"nvidia.com/gpu.product": "NVIDIA-H200"},
            containers=[
                kclient.V1Container(
                    name="engine",
                    image="pause:3.10",  # never pulled: kwok runs no containers
                    resources=kclient.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                )
            ],
        ),
    )
    core.create_namespaced_pod(e2e_namespace, pod)
    deadline = time.monotonic() + 90
    current = core.read_namespaced_pod("h200-probe", e2e_namespace)
    while time.monotonic() < deadline:
        current = core.read_namespaced_pod("h200-probe", e2e_namespace)
        conditions = {c.type: c.status for c in (current.status.conditions or [])}
        if conditions.get("Ready") == "True" and current.status.pod_ip:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"pod not Ready in 90s: {current.status}")
    node = core.read_node(current.spec.node_name)
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert node.metadata.labels["node.kubernetes.io/instance-type"] == "p5en.48xlarge"
    assert current.status.phase == "Running"
    assert current.status.pod_ip.startswith("127."), current.status.pod_ip


def test_prometheus_answers(cluster: LocalCluster) -> None:
    with urllib.request.urlopen(f"{cluster.prometheus_url}/-/ready", timeout=10) as resp:
        assert resp.status == 200
    result = _http_json(f"{cluster.prometheus_url}/api/v1/query?query=vector(1)")
    assert result["status"] == "success"
    assert result["data"]["result"][0]["value"][1] == "1"
    config = yaml.safe_load(_http_json(f"{cluster.prometheus_url}/api/v1/status/config")["data"]["yaml"])
    assert config["global"]["scrape_interval"] == "2s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "disagg-engines"]
    assert job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == [str(cluster.engines_file)]
    assert cluster.engines_file.exists()


def test_service_account_token_without_bindings_is_forbidden(
    cluster: LocalCluster, kube_api: kclient.ApiClient, e2e_namespace: str, tmp_path: Path
) -> None:
    core: Any = kclient.CoreV1Api(kube_api)
    core.create_namespaced_service_account(
        e2e_namespace, kclient.V1ServiceAccount(metadata=kclient.V1ObjectMeta(name="nobody"))
    )
    kubeconfig = cluster.sa_kubeconfig(e2e_namespace, "nobody", tmp_path / "sa.kubeconfig")
    sa_api: Any = cluster.api_client(kubeconfig)
    try:
        # the token authenticates as the ServiceAccount ...
        auth: Any = kclient.AuthenticationV1Api(sa_api)
        review = auth.create_self_subject_review(kclient.V1SelfSubjectReview())
        assert review.status.user_info.username == f"system:serviceaccount:{e2e_namespace}:nobody"
        # ... which RBAC gives no right to list pods
        with pytest.raises(kclient.ApiException) as err:
            sa_core: Any = kclient.CoreV1Api(sa_api)
            sa_core.list_namespaced_pod(e2e_namespace)
        assert err.value.status == 403
    finally:
        sa_api.close()
