"""Helpers for the e2e tests: the real operator as a subprocess, kubectl, bounded waits that fail with
diagnostics, listing a service's children, storage some examples need, and a test session's operator
identity and isolation (`operator_session`, `isolate`).

Isolation from other operators on the shared cluster (e.g. the one `make demo` leaves running with
`--all-namespaces`): every test namespace carries the label `disagg.dev/e2e-session=<id>`, and a
ValidatingAdmissionPolicy of this session denies writes to the operator's kinds there by any
ServiceAccount except this session's operator identities (and kube-system's controllers). The other
operator keeps running untouched; in these namespaces its writes are refused, so what a test observes
is the work of its own operator process. (An operator run with the admin kubeconfig rather than a
ServiceAccount token is not recognisable this way and would still interfere.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client as kclient
from prometheus_client.parser import text_string_to_metric_families

from support.paths import REPO, free_port

CLUSTER_PY = REPO / "hack" / "cluster.py"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

GROUP, VERSION, PLURAL = "disagg.dev", "v1alpha1", "inferenceservices"
SERVICE_LABEL = "disagg.dev/service"
ROLE_LABEL = "disagg.dev/role"
MANAGED_BY_SELECTOR = "app.kubernetes.io/managed-by=disagg"
SESSION_LABEL = "disagg.dev/e2e-session"
WRITE_METHODS = ("PATCH", "POST", "PUT", "DELETE")
CONDITION_TYPES = ("Ready", "PrefillReady", "DecodeReady", "RouterReady", "KVTransferReady")

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------
# processes and kubectl




def bin_dir() -> Path:
    out = subprocess.run(
        [sys.executable, str(CLUSTER_PY), "bin-dir"], capture_output=True, text=True, check=True, timeout=60
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Kubectl:
    """kubectl of the local cluster, as the admin (or `--as` someone when asked)."""

    binary: Path
    kubeconfig: Path

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"kubectl {' '.join(args)} did not finish in {timeout}s") from e
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed with code {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def text(self, *args: str, timeout: float = 30) -> str:
        """stdout (or the error) of a diagnostic command; never raises."""
        try:
            proc = self(*args, check=False, timeout=timeout)
        except AssertionError as e:
            return str(e)
        return (proc.stdout + proc.stderr).rstrip()


def disagg_cli(*args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `disagg` command of this checkout."""
    return subprocess.run(
        [sys.executable, "-m", "disagg.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class OperatorProcess:
    """One `disagg run` process with its own loopback ports and log file."""

    name: str
    namespaces: tuple[str, ...]
    kubeconfig: Path
    log_path: Path
    resync_seconds: float
    liveness_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()
    """More `disagg run` flags (e.g. `--prometheus-url URL --autoscale-tick 2`)."""

    def start(self) -> OperatorProcess:
        self.liveness_port, self.metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "disagg.cli", "run"]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        cmd += [
            "--kubeconfig", str(self.kubeconfig),
            "--listen-host", "127.0.0.1",
            "--liveness-port", str(self.liveness_port),
            "--metrics-port", str(self.metrics_port),
            "--resync-seconds", str(self.resync_seconds),
            "--workers", "8",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            log.write(f"===== start {self.name}: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "operator not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthz(self) -> int | None:
        """HTTP status of /healthz, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=3) as resp:
                status: int = resp.status
                return status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, urllib.error.URLError):
            return None

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"operator {self.name} exited with {self.proc and self.proc.returncode}:\n"
                                     f"{self.log_tail()}")
            if self.healthz() == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"operator {self.name} not healthy in {timeout}s:\n{self.log_tail()}")

    def metric(self, name: str, label: str) -> dict[str, float]:
        """One counter of the operator's /metrics, summed by one label."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        counts: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name:
                    counts[sample.labels[label]] = counts.get(sample.labels[label], 0.0) + sample.value
        return counts

    def request_counts(self) -> dict[str, float]:
        """disagg_api_requests_total by HTTP method."""
        return self.metric("disagg_api_requests_total", "method")

    def reconciles(self) -> float:
        """disagg_reconciles_total over all results."""
        return sum(self.metric("disagg_reconciles_total", "result").values())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- operator {self.name} (pid {self.proc and self.proc.pid}) log, last {len(tail)} lines ---\n" + (
            "\n".join(line[:600] for line in tail)
        )

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class LabProcesses:
    """The lab's processes for one namespace: `disagg-lab fleet` (the engines) and `disagg-lab routers` (the
    real routers of the router pods)."""

    namespace: str
    workdir: Path
    kubeconfig: Path
    targets_file: Path | None = None
    """Prometheus' targets file (None: none written)."""
    control_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> LabProcesses:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")}
        env["PYTHONUNBUFFERED"] = "1"
        commands = {
            "fleet": ["fleet", "-n", self.namespace, "--kubeconfig", str(self.kubeconfig), "--control-port",
                      str(self.control_port), "--targets-file", str(self.targets_file or "none"),
                      "--traces-dir", str(REPO.parent / "shared" / "traces")],
            "routers": ["routers", "-n", self.namespace, "--kubeconfig", str(self.kubeconfig), "--state-dir",
                        str(self.workdir / "routers")],
        }
        for name, args in commands.items():
            with (self.workdir / f"{name}.log").open("ab") as log:
                self.processes[name] = subprocess.Popen([sys.executable, "-m", "disagg_lab.cli", *args], stdout=log,
                                                        stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                                        start_new_session=True)

        def control_api() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"disagg-lab {name} exited with {process.returncode}\n{self.log_tail()}")
            try:
                return bool(self.get("/healthz")["ok"])
            except (OSError, urllib.error.URLError):
                return False

        try:
            wait_until(control_api, 30, "the fleet's control API", self.log_tail)
        except BaseException:
            self.stop()
            raise
        return self

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control_port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def put(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.control_port}{path}", data=json.dumps(body).encode(),
                                         method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())

    def pods(self, service: str) -> list[dict[str, Any]]:
        return [p for p in self.get("/state")["pods"] if p["service"] == service]

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for name in self.processes:
            try:
                text = (self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = []
            parts.append(f"--- {name} log, last {len(text)} lines ---\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def routers_ready(pods: list[Any]) -> bool:
    """Ready as the lab's prober set it (the container started by the lab, not kwok's instant Ready)."""
    return bool(pods) and all(
        any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        and p.status.container_statuses and p.status.container_statuses[0].started for p in pods)


# ----------------------------------------------------------------------------------------------------
# waiting with diagnostics


def diagnose(kubectl: Kubectl, namespaces: Iterable[str], operators: Iterable[OperatorProcess] = ()) -> str:
    """What a person debugging a failure wants to see: operator logs and the namespace's objects."""
    parts = [op.log_tail() for op in operators]
    kinds = "inferenceservices,deploy,rs,pods,svc,pdb,netpol,sa,role,rolebinding"
    for ns in namespaces:
        parts.append(f"--- kubectl -n {ns} get {kinds} -o wide ---")
        parts.append(kubectl.text("-n", ns, "get", kinds, "-o", "wide"))
        parts.append(f"--- kubectl -n {ns} describe inferenceservices ---")
        parts.append(kubectl.text("-n", ns, "describe", "inferenceservices"))
        parts.append(f"--- kubectl -n {ns} get events ---")
        events = kubectl.text("-n", ns, "get", "events", "--sort-by=.lastTimestamp").splitlines()
        parts.append("\n".join(events[:1] + events[-25:]))
    return "\n".join(parts)


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str],
    interval: float = 0.25,
) -> T:
    """Polls `check` until it returns something truthy (returned); else fails naming `what`.

    `check` may also raise AssertionError: that counts as "not yet" and its message is the last
    observation shown on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except AssertionError as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}\nlast observation: {last}\n{diagnostics()}"
            )
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------------
# objects


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads `70.6e9` as a string (YAML 1.1); kubectl, like YAML 1.2, as a number."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Yaml12Loader) if isinstance(d, dict)]


def in_namespace(doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(doc))  # a deep copy
    out.setdefault("metadata", {})["namespace"] = namespace
    assert isinstance(out, dict)
    return out


def dump(docs: Iterable[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


@dataclass(frozen=True)
class Cluster:
    """Typed API handles over one admin ApiClient."""

    api: kclient.ApiClient
    core: Any = field(init=False)
    apps: Any = field(init=False)
    rbac: Any = field(init=False)
    policy: Any = field(init=False)
    net: Any = field(init=False)
    custom: Any = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "core", kclient.CoreV1Api(self.api))
        object.__setattr__(self, "apps", kclient.AppsV1Api(self.api))
        object.__setattr__(self, "rbac", kclient.RbacAuthorizationV1Api(self.api))
        object.__setattr__(self, "policy", kclient.PolicyV1Api(self.api))
        object.__setattr__(self, "net", kclient.NetworkingV1Api(self.api))
        object.__setattr__(self, "custom", kclient.CustomObjectsApi(self.api))

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return obj
        except kclient.ApiException as e:
            if e.status == 404:
                return None
            raise

    def services(self, namespace: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]
        return items

    def _listers(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [
            ("v1", "ServiceAccount", self.core.list_namespaced_service_account),
            ("rbac.authorization.k8s.io/v1", "Role", self.rbac.list_namespaced_role),
            ("rbac.authorization.k8s.io/v1", "RoleBinding", self.rbac.list_namespaced_role_binding),
            ("apps/v1", "Deployment", self.apps.list_namespaced_deployment),
            ("v1", "Service", self.core.list_namespaced_service),
            ("policy/v1", "PodDisruptionBudget", self.policy.list_namespaced_pod_disruption_budget),
            ("networking.k8s.io/v1", "NetworkPolicy", self.net.list_namespaced_network_policy),
        ]

    def children(self, namespace: str, selector: str = MANAGED_BY_SELECTOR) -> list[dict[str, Any]]:
        """Objects of every kind a service's children can have (not ReplicaSets/Pods), as dicts."""
        out: list[dict[str, Any]] = []
        sanitize: Any = self.api.sanitize_for_serialization
        for api_version, kind, lister in self._listers():
            for item in lister(namespace, label_selector=selector).items:
                obj: dict[str, Any] = sanitize(item)
                obj["apiVersion"], obj["kind"] = api_version, kind
                out.append(obj)
        return out

    def pods(self, namespace: str, selector: str) -> list[Any]:
        return [p for p in self.core.list_namespaced_pod(namespace, label_selector=selector).items
                if p.metadata.deletion_timestamp is None]


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def condition(service: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((service or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return None


def is_ready(service: dict[str, Any] | None) -> bool:
    cond = condition(service, "Ready")
    return bool(cond and cond.get("status") == "True")


def expected_replicas(pool: dict[str, Any]) -> int:
    """What the operator creates a pool with: spec replicas, clamped into the autoscaling bounds."""
    replicas = int(pool.get("replicas", 1))
    bounds = pool.get("autoscaling")
    if bounds:
        replicas = min(max(replicas, int(bounds.get("minReplicas", 1))), int(bounds["maxReplicas"]))
    return replicas


# ----------------------------------------------------------------------------------------------------
# session isolation and identities


def isolation_policy(session: str, allowed_sa_namespace: str) -> list[dict[str, Any]]:
    """Admission policy: in this session's namespaces, only this session's operators (and the control
    plane) may write the operator's kinds, the services' status and Events."""
    name = f"disagg-e2e-{session}"
    expression = (
        "!request.userInfo.username.startsWith('system:serviceaccount:') || "
        "request.userInfo.username.startsWith('system:serviceaccount:kube-system:') || "
        f"request.userInfo.username.startsWith('system:serviceaccount:{allowed_sa_namespace}:')"
    )
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name, "labels": {SESSION_LABEL: session}},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "namespaceSelector": {"matchLabels": {SESSION_LABEL: session}},
                    "resourceRules": [{
                        "apiGroups": ["", "apps", "policy", "networking.k8s.io", "rbac.authorization.k8s.io",
                                      GROUP, "events.k8s.io", "leaderworkerset.x-k8s.io"],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE", "DELETE"],
                        "resources": ["deployments", "services", "serviceaccounts", "roles", "rolebindings",
                                      "poddisruptionbudgets", "networkpolicies", "leaderworkersets", PLURAL,
                                      f"{PLURAL}/status", "events"],
                    }],
                },
                "validations": [{
                    "expression": expression,
                    "message": f"disagg e2e session {session}: only this session's test operators write here",
                }],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name, "labels": {SESSION_LABEL: session}},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        },
    ]


def renamed_rbac(docs: list[dict[str, Any]], name: str, drop_resource: str | None = None) -> list[dict[str, Any]]:
    """`disagg rbac` output with the cluster-scoped objects renamed (so the shipped `disagg-operator`
    binding of a running demo is left alone), optionally without the rules for one resource."""
    out: list[dict[str, Any]] = []
    for doc in docs:
        doc = yaml.safe_load(yaml.safe_dump(doc))
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] = name
        if doc["kind"] == "ClusterRoleBinding":
            doc["roleRef"]["name"] = name
        if doc["kind"] == "ClusterRole" and drop_resource is not None:
            rules = []
            for rule in doc["rules"]:
                resources = [r for r in rule["resources"] if r != drop_resource]
                if resources:
                    rules.append({**rule, "resources": resources})
            assert rules != doc["rules"], f"no rule grants {drop_resource}"
            doc["rules"] = rules
        out.append(doc)
    return out


def storage_for(session: str, namespace: str, services: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """What services need a cluster to provide before their pods can be scheduled (examples/04): the
    PVC of a `pvc://` model, bound to a pre-made volume, and the StorageClass of `kvCache.disk` with
    statically provisioned local volumes for the ephemeral KV disks (bound when a pod is scheduled, as
    with the local static provisioner). Empty when none of the services needs storage."""
    labels = {SESSION_LABEL: session, "disagg.dev/e2e-namespace": namespace}
    docs: list[dict[str, Any]] = []
    claims: set[str] = set()
    disks: dict[str, int] = {}
    for service in services:
        spec = service["spec"]
        uri = str(spec["model"]["uri"])
        if uri.startswith("pvc://"):
            claims.add(uri.removeprefix("pvc://").split("/", 1)[0])
        disk = (spec.get("kvCache") or {}).get("disk") or {}
        if disk.get("storageClassName"):
            # one volume per pod of both pools, plus a rollout's surge pod per pool
            count = sum(expected_replicas(spec[role]) + 1 for role in ("prefill", "decode"))
            disks[disk["storageClassName"]] = disks.get(disk["storageClassName"], 0) + count
    for claim in sorted(claims):
        volume = f"e2e-{claim}-{namespace}"[:253]
        docs.append({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": labels},
            "spec": {
                "capacity": {"storage": "1Ti"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": f"/srv/models/{claim}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        })
        docs.append({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Ti"}},
            },
        })
    for storage_class, count in sorted(disks.items()):
        docs.append({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": storage_class},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain",
        })
        for i in range(count):
            docs.append({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": f"e2e-{storage_class}-{namespace}-{i}"[:253], "labels": labels},
                "spec": {
                    "capacity": {"storage": "1Ti"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": storage_class,
                    "hostPath": {"path": f"/mnt/{storage_class}/{i}"},
                },
            })
    return docs


def remove_finalizers(cluster: Cluster, namespace: str) -> None:
    """Lets a namespace be deleted after its operator is gone (kopf's timers put a finalizer on each
    InferenceService, which only a running operator removes)."""
    try:
        services = cluster.services(namespace)
    except kclient.ApiException as e:
        if e.status == 404:
            return
        raise
    for svc in services:
        if svc["metadata"].get("finalizers"):
            try:
                cluster.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, svc["metadata"]["name"], {"metadata": {"finalizers": None}},
                    _content_type="application/merge-patch+json",
                )
            except kclient.ApiException as e:
                if e.status != 404:
                    raise


# ----------------------------------------------------------------------------------------------------
# a test session: the operator's identity, the isolation policy, the namespaces it covers


def install_crd(kubectl: Kubectl) -> None:
    """The InferenceService CRD as `disagg crd` prints it, applied and Established."""
    crd = disagg_cli("crd")
    assert crd.returncode == 0, crd.stderr
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=crd.stdout)
    kubectl("wait", "--for=condition=Established", "crd/inferenceservices.disagg.dev", "--timeout=60s", timeout=90)


def sa_kubeconfig(namespace: str, service_account: str, out: Path, duration: int = 7200) -> Path:
    """A kubeconfig with a TokenRequest token of a ServiceAccount (`hack/cluster.py sa-kubeconfig`)."""
    proc = subprocess.run(
        [sys.executable, str(CLUSTER_PY), "sa-kubeconfig", "--namespace", namespace, "--service-account",
         service_account, "--out", str(out), "--duration", str(duration)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, f"sa-kubeconfig failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@dataclass(frozen=True)
class E2ESession:
    """One test session's share of the cluster: its operator identity (a namespace with the
    ServiceAccount `disagg-operator`, bound to the shipped RBAC rules under session-specific names, and
    a TokenRequest kubeconfig), whose admission policy lets only identities from that namespace write in
    the namespaces `isolate` covers."""

    session: str
    kubectl: Kubectl
    cluster: Cluster
    operator_namespace: str
    operator_kubeconfig: Path
    rbac_name: str
    workdir: Path

    def sa_user(self, service_account: str = "disagg-operator") -> str:
        return f"system:serviceaccount:{self.operator_namespace}:{service_account}"

    def extended(self, cls: type[S], **more: Any) -> S:
        """This session as a subclass with more fields."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(E2ESession)}, **more)


S = TypeVar("S", bound=E2ESession)


@contextlib.contextmanager
def operator_session(kubectl: Kubectl, cluster: Cluster, workdir: Path, label: str) -> Iterator[E2ESession]:
    """CRD installed, the session's operator identity and isolation policy; removed afterwards with
    everything else carrying the session's label (ClusterRoles and their bindings, PersistentVolumes)."""
    session = "s" + secrets.token_hex(3)  # a letter first: an all-digit or 1e5-like id is a YAML number
    namespace, rbac_name = f"disagg-{label}-{session}", f"disagg-operator-{label}-{session}"
    install_crd(kubectl)
    try:
        kubectl("create", "namespace", namespace)
        rbac = disagg_cli("rbac", "--namespace", namespace, "--service-account", "disagg-operator")
        assert rbac.returncode == 0, rbac.stderr
        docs = renamed_rbac(list(yaml.safe_load_all(rbac.stdout)), rbac_name)
        for doc in docs:
            doc["metadata"].setdefault("labels", {})[SESSION_LABEL] = session
        kubectl("apply", "--server-side", "-f", "-", input=dump(docs))
        kubeconfig = sa_kubeconfig(namespace, "disagg-operator", workdir / "operator.kubeconfig")
        kubectl("apply", "--server-side", "-f", "-", input=dump(isolation_policy(session, namespace)))
        yield E2ESession(session, kubectl, cluster, namespace, kubeconfig, rbac_name, workdir)
    finally:
        selector = f"{SESSION_LABEL}={session}"
        kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy,clusterrolebinding,clusterrole",
                "-l", selector, "--wait=false", check=False)
        kubectl("delete", "persistentvolume", "-l", selector, "--wait=false", check=False)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def isolate(kubectl: Kubectl, session: str, namespace: str) -> None:
    """Puts a namespace under the session's admission policy and waits until it is enforced there (a
    write by another operator's identity is refused)."""
    kubectl("label", "namespace", namespace, f"{SESSION_LABEL}={session}", "--overwrite")

    def denied() -> bool:
        probe = kubectl(
            "-n", namespace, "create", "service", "clusterip", "isolation-probe", "--tcp=80", "--dry-run=server",
            "--as=system:serviceaccount:some-other-operator:disagg-operator", "--as-group=system:masters",
            check=False,
        )
        return probe.returncode != 0 and "ValidatingAdmissionPolicy" in probe.stderr

    wait_until(denied, 20, f"the isolation policy to cover namespace {namespace}",
               lambda: kubectl.text("get", "validatingadmissionpolicy", "-o", "yaml"))


@dataclass
class Operators:
    """The operator processes of one test; stopped (and their namespaces freed of finalizers) afterwards."""

    session: E2ESession
    test_name: str
    resync: float
    started: list[OperatorProcess] = field(default_factory=list)

    def start(self, *namespaces: str, name: str = "operator", kubeconfig: Path | None = None,
              resync: float | None = None, flags: tuple[str, ...] = ()) -> OperatorProcess:
        log = self.session.workdir / f"{self.test_name}-{name}.log"
        op = OperatorProcess(name, tuple(namespaces), kubeconfig or self.session.operator_kubeconfig, log,
                             self.resync if resync is None else resync, extra_args=flags)
        self.started.append(op.start())
        op.wait_healthy(timeout=30)
        return op

    def namespaces(self) -> list[str]:
        return sorted({n for op in self.started for n in op.namespaces})

    def diagnostics(self, extra: Callable[[], str] | None = None) -> Callable[[], str]:
        def text() -> str:
            out = diagnose(self.session.kubectl, self.namespaces(), self.started)
            return out + ("\n" + extra() if extra is not None else "")

        return text

    def stop_all(self) -> None:
        for op in self.started:
            op.stop()
        for namespace in self.namespaces():
            remove_finalizers(self.session.cluster, namespace)


@contextlib.contextmanager
def operators_of(session: E2ESession, test_name: str, resync: float) -> Iterator[Operators]:
    """Operators of one test (a pytest node name is made a file name for their logs)."""
    ops = Operators(session, re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name), resync)
    try:
        yield ops
    finally:
        ops.stop_all()
