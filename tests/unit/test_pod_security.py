"""Engine and router pods against the Pod Security Standards (tests/support/pod_security.py, a checker of
the documented rules, itself tested first on known pods).

Every example and golden input: the router's pods and the engines' pods pass `restricted`, except an
engine pool with RDMA, which needs IPC_LOCK (baseline refuses it) and so runs as root (restricted refuses
that too); the rendered Deployment says so in its `disagg.dev/pod-security` annotation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagg.api.validate import parse_spec
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.reconcile.status import pod_security_condition
from disagg.render import render_service
from disagg.render.context import ENGINE_HOME, RDMA_POD_SECURITY
from support.paths import REPO
from support.pod_security import baseline, restricted

INPUTS = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "tests" / "golden" / "input").glob("*.yaml"))

GOOD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "c", "image": "x", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "v", "emptyDir": {}}],
}


def changed(change: dict[str, Any], container: dict[str, Any] | None = None) -> dict[str, Any]:
    pod = copy.deepcopy(GOOD)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(pod.get(key), dict):
            pod[key] = {**pod[key], **value}
        else:
            pod[key] = value
    if container is not None:
        ctr = pod["containers"][0]
        for key, value in container.items():
            ctr[key] = {**ctr[key], **value} if isinstance(value, dict) and isinstance(ctr.get(key), dict) else value
    return pod


# --- the checker on known pods --------------------------------------------------------------------


def test_a_restricted_pod_passes_both_levels() -> None:
    assert restricted(GOOD) == [] and baseline(GOOD) == []
    # the container-level form of the same settings is as good
    moved = changed({"securityContext": {}}, {"securityContext": {
        "runAsNonRoot": True, "seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}})
    moved["securityContext"] = {}
    assert restricted(moved) == []
    # NET_BIND_SERVICE is the one capability restricted lets a container add
    bind = {"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}
    assert restricted(changed({}, {"securityContext": bind})) == []


@pytest.mark.parametrize(
    ("pod", "rule"),
    [
        (changed({"hostNetwork": True}), "Host Namespaces"),
        (changed({"hostPID": True}), "Host Namespaces"),
        (changed({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}), "HostPath Volumes"),
        (changed({}, {"securityContext": {"privileged": True}}), "Privileged Containers"),
        (changed({}, {"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}}), "Capabilities"),
        (changed({}, {"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}), "Capabilities"),
        (changed({}, {"ports": [{"containerPort": 80, "hostPort": 80}]}), "Host Ports"),
        (changed({}, {"readinessProbe": {"httpGet": {"path": "/", "port": 80, "host": "10.0.0.1"}}}),
         "Host Probes"),
        (changed({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}), "Seccomp"),
        (changed({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}), "SELinux"),
        (changed({}, {"securityContext": {"procMount": "Unmasked"}}), "/proc Mount Type"),
        (changed({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}), "Sysctls"),
        (changed({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}), "AppArmor"),
    ],
)
def test_baseline_refusals(pod: dict[str, Any], rule: str) -> None:
    assert any(v.startswith(rule) for v in baseline(pod)), baseline(pod)
    assert any(v.startswith(rule) for v in restricted(pod)), "restricted includes baseline"


@pytest.mark.parametrize(
    ("pod", "rule"),
    [
        (changed({}, {"securityContext": {"allowPrivilegeEscalation": True}}), "Privilege Escalation"),
        (changed({}, {"securityContext": {"capabilities": {"drop": ["ALL"]}}}) | {"containers": [
            {"name": "c", "image": "x", "securityContext": {"capabilities": {"drop": ["ALL"]}}}]},
         "Privilege Escalation"),  # unset is not false
        (changed({"securityContext": {"runAsNonRoot": False}}), "Running as Non-root"),
        (changed({}, {"securityContext": {"runAsNonRoot": False}}), "Running as Non-root"),
        (changed({"securityContext": {"runAsUser": 0}}), "Running as Non-root user"),
        (changed({"securityContext": {"seccompProfile": None}}), "Seccomp"),
        (changed({}, {"securityContext": {"capabilities": {"drop": ["NET_RAW"]}}}), "Capabilities"),
        (changed({}, {"securityContext": {"capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}}}), "Capabilities"),
        (changed({"volumes": [{"name": "n", "nfs": {"server": "s", "path": "/"}}]}), "Volume Types"),
    ],
)
def test_restricted_refusals_that_baseline_allows(pod: dict[str, Any], rule: str) -> None:
    assert baseline(pod) == [], baseline(pod)
    assert any(v.startswith(rule) for v in restricted(pod)), restricted(pod)


def test_init_and_ephemeral_containers_are_checked_too() -> None:
    pod = changed({"initContainers": [{"name": "init", "image": "x"}]})
    assert any("initContainers[init]" in v for v in restricted(pod))


# --- the rendered pods --------------------------------------------------------------------------


def pods(source: Path) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Deployment name -> (Deployment, pod spec) of one input."""
    body = yaml.safe_load(source.read_text())
    return {d["metadata"]["name"]: (d, d["spec"]["template"]["spec"])
            for d in render_service(body, DEFAULT_CATALOG) if d["kind"] == "Deployment"}


@pytest.mark.parametrize("source", INPUTS, ids=[p.stem for p in INPUTS])
def test_rendered_pods_meet_restricted_except_what_rdma_needs(source: Path) -> None:
    body = yaml.safe_load(source.read_text())
    rdma = (body["spec"].get("kvTransfer") or {}).get("rdma") is not None
    for name, (deployment, pod) in pods(source).items():
        annotations = deployment["spec"]["template"]["metadata"].get("annotations")
        if name.endswith("-router") or not rdma:
            assert restricted(pod, annotations) == [], (name, restricted(pod, annotations))
            if not name.endswith("-router"):
                assert deployment["metadata"]["annotations"]["disagg.dev/pod-security"] == "restricted"
            continue
        assert baseline(pod) == ["Capabilities: containers[engine] adds ['IPC_LOCK']"], (name, baseline(pod))
        assert restricted(pod) == [
            *baseline(pod),
            "Running as Non-root user: spec.securityContext.runAsUser 0",
            "Running as Non-root: containers[engine] (runAsNonRoot must be true, on the pod or the container)",
            "Capabilities: containers[engine] may add only NET_BIND_SERVICE",
        ], restricted(pod)
        assert deployment["metadata"]["annotations"]["disagg.dev/pod-security"] == RDMA_POD_SECURITY
        assert "IPC_LOCK" in RDMA_POD_SECURITY and "baseline" in RDMA_POD_SECURITY


@pytest.mark.parametrize("source", INPUTS, ids=[p.stem for p in INPUTS])
def test_engines_have_a_writable_home_whatever_their_uid(source: Path) -> None:
    # vLLM, Triton, Inductor and FlashInfer write caches under $HOME; a uid /etc/passwd lacks has HOME=/
    for name, (_, pod) in pods(source).items():
        if name.endswith("-router"):
            continue
        (engine,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in engine["env"]}
        assert env["HOME"] == ENGINE_HOME and env["USER"]
        mounts = {m["mountPath"]: m["name"] for m in engine["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts[ENGINE_HOME]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}


def test_the_service_status_says_when_its_pods_cannot_meet_restricted() -> None:
    spec = yaml.safe_load((REPO / "examples" / "02-sglang-mooncake.yaml").read_text())["spec"]
    cond = pod_security_condition(parse_spec(spec), RDMA_POD_SECURITY)
    assert (cond.type, cond.status, cond.reason) == ("PodSecurity", "False", "RDMANeedsIPCLock")
    assert "IPC_LOCK" in cond.message
    spec.get("kvTransfer", {}).pop("rdma")
    assert pod_security_condition(parse_spec(spec), RDMA_POD_SECURITY).status == "True"
