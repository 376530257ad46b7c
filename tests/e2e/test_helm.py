"""The Helm chart on the local cluster: lint, server-side dry runs, and a release's whole life.

There is no container runtime (kwok shows the chart's pods Running but runs nothing), so the operator
the chart configures runs as a local process: with a TokenRequest token of the chart's ServiceAccount
and the arguments of the installed Deployment (only --listen-host and the two ports are changed to
free loopback ones). It must reconcile an InferenceService to Ready=True with exactly the chart's
RBAC. With two such processes (the chart's `replicaCount: 2` + peering) only one acts, and the other
takes over when it stops.

Isolation from other operators on the shared cluster (e.g. `make demo`'s, cluster-wide, as a
ServiceAccount): a ValidatingAdmissionPolicy of this test denies writes to the operator's kinds in
the test's namespace by any ServiceAccount but those of the release namespace (and kube-system).
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
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import pytest
import yaml
from kubernetes import client as kclient

from disagg.rbac import RULES
from support.paths import REPO, free_port

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

CHART = REPO / "charts" / "disagg-operator"
DISAGG = Path(sys.executable).parent / "disagg"
GROUP, VERSION, PLURAL = "disagg.dev", "v1alpha1", "inferenceservices"
ISOLATION_LABEL = "disagg.dev/e2e-helm"
OPERATOR_FAMILIES = (
    "disagg_reconciles_total",
    "disagg_reconcile_duration_seconds",
    "disagg_api_requests_total",
    "disagg_api_errors_total",
    "disagg_scaling_decisions_total",
    "disagg_prometheus_query_duration_seconds",
    "disagg_prometheus_query_failures_total",
)
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# helpers


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90, every: float = 0.5,
             details: Callable[[], str] = lambda: "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details()[-8000:]}")
        time.sleep(every)




def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path
    kubeconfig: Path

    def run(self, tool: Path, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        proc = subprocess.run([str(tool), *args], input=input, capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool.name} {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def helm_(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(self.helm, *args, **kw)

    def kubectl_(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run(self.kubectl, *args, **kw)


@pytest.fixture(scope="module")
def tools(cluster: LocalCluster) -> Tools:
    bindir = Path(cluster.run("bin-dir").stdout.strip().splitlines()[-1])
    helm, kubectl = bindir / "helm", bindir / "kubectl"
    assert helm.exists() and kubectl.exists(), f"helm/kubectl missing in {bindir}"
    return Tools(helm, kubectl, cluster.kubeconfig)


def values_args(values: dict[str, Any], tmp_path: Path, name: str = "values.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return ["--values", str(path)]


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@dataclass
class Operator:
    """`disagg run` as a local process: the chart's arguments, a ServiceAccount token, loopback ports."""

    name: str
    args: list[str]
    kubeconfig: Path
    log_path: Path
    liveness_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> Operator:
        overrides = ["--listen-host=127.0.0.1", f"--liveness-port={self.liveness_port}",
                     f"--metrics-port={self.metrics_port}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "DISAGG_"))}
        env.update(KUBECONFIG=str(self.kubeconfig), POD_ID=self.name, PYTHONUNBUFFERED="1")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([str(DISAGG), "run", *self.args, *overrides], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.log_path.parent)
        wait_for(f"{self.name}'s /healthz", lambda: self.healthz() == 200 or self.exited(), timeout=60,
                 details=self.log)
        assert not self.exited(), f"{self.name} exited:\n{self.log()}"
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def healthz(self) -> int:
        return http_get(f"http://127.0.0.1:{self.liveness_port}/healthz")[0]

    def metrics_text(self) -> str:
        status, text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200, f"/metrics of {self.name}: {status}"
        return text

    def sample(self, name: str, **labels: str) -> float:
        """Sum of the samples of one series name whose labels include `labels`."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            if not match or match.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(match.group(3))
        return total

    def reconciles(self) -> float:
        return self.sample("disagg_reconciles_total")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def isolation_policy(name: str, session: str, release_namespace: str) -> list[dict[str, Any]]:
    """Only ServiceAccounts of the release namespace (and kube-system's controllers) write the operator's
    kinds in namespaces labelled with this session; people (helm, the test) are not ServiceAccounts."""
    expression = (
        "!request.userInfo.username.startsWith('system:serviceaccount:') || "
        "request.userInfo.username.startsWith('system:serviceaccount:kube-system:') || "
        f"request.userInfo.username.startsWith('system:serviceaccount:{release_namespace}:')"
    )
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name, "labels": {ISOLATION_LABEL: session}},
         "spec": {
             "failurePolicy": "Fail",
             "matchConstraints": {
                 "namespaceSelector": {"matchLabels": {ISOLATION_LABEL: session}},
                 "resourceRules": [{
                     "apiGroups": ["", "apps", "policy", "networking.k8s.io", "rbac.authorization.k8s.io", GROUP,
                                   "events.k8s.io", "kopf.dev"],
                     "apiVersions": ["*"],
                     "operations": ["CREATE", "UPDATE", "DELETE"],
                     "resources": ["deployments", "services", "serviceaccounts", "roles", "rolebindings",
                                   "poddisruptionbudgets", "networkpolicies", PLURAL, f"{PLURAL}/status", "events",
                                   "kopfpeerings"],
                 }],
             },
             "validations": [{"expression": expression,
                              "message": f"e2e helm session {session}: only its own operator writes here"}],
         }},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": name, "labels": {ISOLATION_LABEL: session}},
         "spec": {"policyName": name, "validationActions": ["Deny"]}},
    ]


def small_service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "tiny", "uri": "hf://example/tiny"},
            "prefill": {"accelerator": {"type": "nvidia-h100", "count": 1}},
            # autoscaled (bounds 1..1): the operator's autoscaler queries Prometheus for it
            "decode": {"accelerator": {"type": "nvidia-h200", "count": 1},
                       "autoscaling": {"minReplicas": 1, "maxReplicas": 1}},
        },
    }


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            found: dict[str, Any] = cond
            return found
    return None


def access_allowed(api: kclient.ApiClient, group: str, resource: str, verb: str, namespace: str | None) -> bool:
    authz: Any = kclient.AuthorizationV1Api(api)
    name, _, subresource = resource.partition("/")
    review = authz.create_self_subject_access_review(kclient.V1SelfSubjectAccessReview(
        spec=kclient.V1SelfSubjectAccessReviewSpec(resource_attributes=kclient.V1ResourceAttributes(
            group=group, resource=name, subresource=subresource or None, verb=verb, namespace=namespace))))
    return bool(review.status.allowed)


def leftovers(tools: Tools, release: str, namespaces: list[str]) -> list[str]:
    """Objects that still carry the release's instance label (or are its Helm release records)."""
    selector = f"app.kubernetes.io/instance={release}"
    found: list[str] = []
    namespaced = "deployments,replicasets,pods,services,serviceaccounts,configmaps,secrets,roles,rolebindings," \
                 "kopfpeerings"
    for ns in namespaces:
        out = tools.kubectl_("get", namespaced, "-n", ns, "-l", selector, "-o", "name").stdout.split()
        found += [f"{ns}/{o}" for o in out]
        found += [f"{ns}/{o}" for o in tools.kubectl_("get", "secrets", "-n", ns, "-l", f"owner=helm,name={release}",
                                                      "-o", "name").stdout.split()]
    found += tools.kubectl_("get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-l", selector,
                            "-o", "name").stdout.split()
    return found


# ----------------------------------------------------------------------------------------------------
# lint and dry runs


@pytest.mark.parametrize("mode", ["default", "namespaced", "ha"])
def test_helm_lint_is_clean(tools: Tools, mode: str) -> None:
    extra = {
        "default": [],
        "namespaced": ["--set", "rbac.namespaced=true", "--set", "watchNamespaces={team-a}"],
        "ha": ["--set", "peering.enabled=true", "--set", "replicaCount=2", "--set", "serviceMonitor.enabled=true",
               "--set", "podMonitor.enabled=true", "--set", "prometheusRule.enabled=true"],
    }[mode]
    proc = tools.helm_("lint", "--strict", str(CHART), *extra)
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def _ensure_peering_crds(tools: Tools) -> None:
    """What `helm install` does with crds/ when the kopf peering CRDs are missing (it never updates them)."""
    have = tools.kubectl_("get", "crd", "-o", "name").stdout.split()
    for doc in docs_of((CHART / "crds" / "kopf.dev_peerings.yaml").read_text()):
        if f"customresourcedefinition.apiextensions.k8s.io/{doc['metadata']['name']}" not in have:
            proc = tools.kubectl_("create", "-f", "-", input=yaml.safe_dump(doc), check=False)
            assert proc.returncode == 0 or "AlreadyExists" in proc.stderr, proc.stderr
    tools.kubectl_("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev",
                   "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")


@pytest.mark.parametrize("mode", ["default", "namespaced", "namespaced-ha"])
def test_template_passes_server_dry_run(tools: Tools, e2e_namespace: str, tmp_path: Path, mode: str) -> None:
    values: dict[str, Any] = {}
    if mode.startswith("namespaced"):
        values.update(rbac={"namespaced": True}, watchNamespaces=[e2e_namespace])
    if mode.endswith("ha"):
        values.update(peering={"enabled": True}, replicaCount=2, prometheus={"url": "http://prometheus:9090"},
                      acceleratorCatalog={"accelerators": {"my-gpu": {"resourceName": "example.com/gpu"}}})
        _ensure_peering_crds(tools)
    rendered = tools.helm_("template", f"dry-{secrets.token_hex(3)}", str(CHART), "--namespace", e2e_namespace,
                           "--include-crds", *values_args(values, tmp_path)).stdout
    docs = docs_of(rendered)
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "Service"} <= kinds
    if mode.startswith("namespaced"):
        assert {"Role", "RoleBinding"} <= kinds
    if mode.endswith("ha"):
        assert "KopfPeering" in kinds
    proc = tools.kubectl_("apply", "--dry-run=server", "-f", "-", input=rendered)
    accepted = [ln for ln in proc.stdout.splitlines() if ln.endswith("(server dry run)")]
    assert len(accepted) == len(docs), proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------
# PromQL of the dashboard and the chart's rules, parsed by the real Prometheus

SAMPLE_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "${datasource}": "prometheus",
                    "$namespace": "serving", "$service": "llama-70b"}


def substitute(expr: str) -> str:
    for var, value in SAMPLE_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def prometheus_query(url: str, expr: str) -> dict[str, Any]:
    data = urllib.parse.urlencode({"query": expr}).encode()
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query", data=data, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        result = json.loads(e.read())
    return result


def test_dashboard_and_rules_promql_parse(cluster: LocalCluster, tools: Tools) -> None:
    rendered = docs_of(tools.helm_("template", "promql", str(CHART), "--set", "prometheusRule.enabled=true").stdout)
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    (text,) = cm["data"].values()
    dashboard = json.loads(text)  # valid JSON
    exprs: dict[str, str] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            exprs[f"annotation {annotation['name']!r}"] = annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            exprs[f"variable {variable['name']}"] = match.group(1)
    (rule,) = [d for d in rendered if d["kind"] == "PrometheusRule"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            exprs[f"rule {r['alert']}"] = r["expr"]
    assert len(exprs) >= 20
    # the check can fail: a broken expression is bad_data
    broken = prometheus_query(cluster.prometheus_url, "sum by (le (rate(x[1m]))")
    assert broken["status"] == "error" and broken["errorType"] == "bad_data", broken
    failures = {}
    for where, expr in exprs.items():
        answer = prometheus_query(cluster.prometheus_url, substitute(expr))
        if answer.get("status") != "success":
            failures[where] = f"{answer.get('errorType')}: {answer.get('error')}\n    {expr}"
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())


# ----------------------------------------------------------------------------------------------------
# a release's life


@pytest.fixture
def apps_namespace(kube_api: kclient.ApiClient, e2e_namespace: str) -> Iterator[tuple[str, str]]:
    """A second namespace, watched by the namespaced operator; isolated from other operators."""
    session = "s" + secrets.token_hex(4)  # a letter first: all-digit or 1e5-like ids parse as YAML numbers
    name = f"{e2e_namespace[:50]}-apps"
    core: Any = kclient.CoreV1Api(kube_api)
    core.create_namespace(kclient.V1Namespace(metadata=kclient.V1ObjectMeta(
        name=name, labels={"e2e": "true", ISOLATION_LABEL: session})))
    yield name, session
    custom: Any = kclient.CustomObjectsApi(kube_api)
    with contextlib.suppress(kclient.ApiException):  # an operator gone: drop its finalizer
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
            custom.patch_namespaced_custom_object(GROUP, VERSION, name, PLURAL, item["metadata"]["name"],
                                                  {"metadata": {"finalizers": None}})
    with contextlib.suppress(kclient.ApiException):
        core.delete_namespace(name)


def test_install_run_upgrade_uninstall(
    cluster: LocalCluster, tools: Tools, kube_api: kclient.ApiClient, e2e_namespace: str,
    apps_namespace: tuple[str, str], tmp_path: Path,
) -> None:
    apps, session = apps_namespace
    release = f"dop-{secrets.token_hex(3)}"
    timings: dict[str, float] = {}
    operators: list[Operator] = []
    policy = isolation_policy(f"disagg-e2e-helm-{session}", session, e2e_namespace)
    tools.kubectl_("apply", "-f", "-", input=yaml.safe_dump_all(policy))
    custom: Any = kclient.CustomObjectsApi(kube_api)
    apps_v1: Any = kclient.AppsV1Api(kube_api)
    installed = False
    try:
        # --- install: namespaced RBAC, two replicas peering, Prometheus configured
        t0 = time.monotonic()
        values = {"rbac": {"namespaced": True}, "watchNamespaces": [apps], "replicaCount": 2,
                  "peering": {"enabled": True}, "prometheus": {"url": cluster.prometheus_url}}
        tools.helm_("install", release, str(CHART), "--namespace", e2e_namespace, "--wait", "--timeout", "3m",
                    *values_args(values, tmp_path))
        installed = True
        timings["install"] = time.monotonic() - t0
        crds = tools.kubectl_("get", "crd", "-o", "name").stdout
        for crd in ("inferenceservices.disagg.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
            assert crd in crds  # installed now, or kept from before (helm skips existing CRDs)
        deployments = apps_v1.list_namespaced_deployment(e2e_namespace,
                                                         label_selector=f"app.kubernetes.io/instance={release}")
        (deployment,) = deployments.items
        assert deployment.status.ready_replicas == 2
        pod_spec = deployment.spec.template.spec
        (ctr,) = pod_spec.containers
        args: list[str] = list(ctr.args)
        assert f"--namespace={apps}" in args and "--all-namespaces" not in args
        peering_name = next(a.split("=", 1)[1] for a in args if a.startswith("--peering="))
        assert f"--prometheus-url={cluster.prometheus_url}" in args
        assert ctr.security_context.read_only_root_filesystem and ctr.security_context.run_as_non_root
        assert ctr.liveness_probe.http_get.path == "/healthz"

        # --- the chart's ServiceAccount: exactly what its RBAC grants
        sa_kubeconfig = cluster.sa_kubeconfig(e2e_namespace, pod_spec.service_account_name, tmp_path / "sa.kubeconfig")
        sa_api = cluster.api_client(sa_kubeconfig)
        try:
            assert access_allowed(sa_api, "apps", "deployments", "create", apps)
            assert access_allowed(sa_api, GROUP, f"{PLURAL}/status", "patch", apps)
            assert access_allowed(sa_api, "kopf.dev", "kopfpeerings", "patch", apps)
            assert access_allowed(sa_api, "apiextensions.k8s.io", "customresourcedefinitions", "watch", None)
            assert access_allowed(sa_api, "", "namespaces", "list", None)
            assert not access_allowed(sa_api, "apps", "deployments", "create", "default"), "only watched namespaces"
            assert not access_allowed(sa_api, GROUP, PLURAL, "list", None), "no cluster-wide access in this mode"
            assert not access_allowed(sa_api, "", "secrets", "get", apps)
        finally:
            closer: Any = sa_api.close
            closer()

        # --- the operator process, as the Deployment would run it
        t0 = time.monotonic()
        first = Operator("op-a", args, sa_kubeconfig, tmp_path / "op-a.log").start()
        operators.append(first)
        custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, small_service("tiny", apps))

        def ready() -> dict[str, Any] | None:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny")
            cond = condition(obj, "Ready")
            return obj if cond and cond["status"] == "True" else None

        obj = wait_for("tiny Ready=True", ready, timeout=120,
                       details=lambda: json.dumps(custom.get_namespaced_custom_object(
                           GROUP, VERSION, apps, PLURAL, "tiny").get("status"), indent=1) + "\n" + first.log())
        timings["reconcile to Ready"] = time.monotonic() - t0
        assert condition(obj, "Ready")["observedGeneration"] == obj["metadata"]["generation"]  # type: ignore[index]
        children = apps_v1.list_namespaced_deployment(apps, label_selector="disagg.dev/service=tiny").items
        assert sorted(d.metadata.name for d in children) == ["tiny-decode", "tiny-prefill", "tiny-router"]
        assert first.sample("disagg_reconciles_total", result="changed") >= 1, "this operator created them"

        # its /metrics: every operator series (labelled counters show their family before a first sample)
        wait_for("a PromQL query of the autoscaler",
                 lambda: first.sample("disagg_prometheus_query_duration_seconds_count") > 0, timeout=60,
                 details=first.log)
        text = first.metrics_text()
        for family in OPERATOR_FAMILIES:
            assert f"# HELP {family} " in text or f"# HELP {family.removesuffix('_total')} " in text, family
        assert first.sample("disagg_api_requests_total", method="PATCH") > 0
        assert first.sample("disagg_reconcile_duration_seconds_count") > 0
        assert first.healthz() == 200
        peering = custom.get_namespaced_custom_object("kopf.dev", "v1", apps, "kopfpeerings", peering_name)
        assert "op-a" in (peering.get("status") or {}), peering

        # --- high availability: a second replica stands by; only one of them acts
        second = Operator("op-b", args, sa_kubeconfig, tmp_path / "op-b.log").start()
        operators.append(second)

        def peers() -> dict[str, Any] | None:
            status = custom.get_namespaced_custom_object("kopf.dev", "v1", apps, "kopfpeerings",
                                                         peering_name).get("status") or {}
            return status if {"op-a", "op-b"} <= set(status) else None

        status = wait_for("both peers in the KopfPeering", peers, timeout=30)
        active, standby = (first, second) if status["op-a"]["priority"] > status["op-b"]["priority"] else (
            second, first)
        time.sleep(3)  # the standby has seen the higher priority and paused
        before = {op.name: op.reconciles() for op in (active, standby)}
        custom.patch_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny",
                                              {"spec": {"router": {"replicas": 2}}})
        wait_for("the router scaled to 2", lambda: apps_v1.read_namespaced_deployment(
            "tiny-router", apps).spec.replicas == 2, timeout=60, details=lambda: active.log() + standby.log())
        wait_for("the active operator's reconcile", lambda: active.reconciles() > before[active.name], timeout=30)
        time.sleep(2)
        assert standby.reconciles() == before[standby.name], f"the standby reconciled:\n{standby.log()}"
        # kopf paused the standby: it was running and saw a higher priority, or it started paused
        log = standby.log()
        assert "Pausing operations in favour of" in log or "Resuming operations" not in log, log
        # the active one stops (a rollout, a node drain): the standby takes over
        t0 = time.monotonic()
        active.stop()
        custom.patch_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny",
                                              {"spec": {"router": {"replicas": 3}}})
        wait_for("the standby taking over", lambda: apps_v1.read_namespaced_deployment(
            "tiny-router", apps).spec.replicas == 3, timeout=60, details=standby.log)
        timings["failover"] = time.monotonic() - t0
        assert standby.reconciles() > before[standby.name]
        for op in operators:
            # 403 as a status, not as the milliseconds of a timestamp ("18:04:38,403 INFO")
            assert not re.search(r"Forbidden|(?<![,.:\d])403(?!\d)|Not enough permissions", op.log()), (
                f"{op.name}:\n{op.log()}")

        # the service goes while an operator still runs (its finalizer)
        custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny")

        def gone() -> bool:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny")
            except kclient.ApiException as e:
                return bool(e.status == 404)
            return False

        wait_for("tiny deleted", gone, timeout=60, details=standby.log)
        for op in operators:
            op.stop()

        # --- upgrade with changed values: the Deployment follows
        t0 = time.monotonic()
        generation = deployment.metadata.generation
        tools.helm_("upgrade", release, str(CHART), "--namespace", e2e_namespace, "--reuse-values", "--wait",
                    "--timeout", "3m", "--set", "operator.resyncSeconds=120", "--set", "resources.limits.memory=768Mi",
                    "--set", "resources.requests.cpu=200m")
        timings["upgrade"] = time.monotonic() - t0
        upgraded = apps_v1.read_namespaced_deployment(deployment.metadata.name, e2e_namespace)
        assert upgraded.metadata.generation > generation
        (ctr,) = upgraded.spec.template.spec.containers
        assert "--resync-seconds=120" in ctr.args and "--resync-seconds=300" not in ctr.args
        assert f"--namespace={apps}" in ctr.args, "--reuse-values kept the namespaced mode"
        assert ctr.resources.limits["memory"] == "768Mi" and ctr.resources.requests["cpu"] == "200m"
        history = json.loads(tools.helm_("history", release, "--namespace", e2e_namespace, "-o", "json").stdout)
        assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"

        # --- uninstall: everything of the release goes, the CRDs stay
        t0 = time.monotonic()
        tools.helm_("uninstall", release, "--namespace", e2e_namespace, "--wait", "--timeout", "3m")
        installed = False
        left = wait_for("the release's objects to go",
                        lambda: not leftovers(tools, release, [e2e_namespace, apps]) or None, timeout=90,
                        details=lambda: "\n".join(leftovers(tools, release, [e2e_namespace, apps])))
        assert left
        timings["uninstall"] = time.monotonic() - t0
        crds = tools.kubectl_("get", "crd", "-o", "name").stdout
        for crd in ("inferenceservices.disagg.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
            assert crd in crds, f"{crd} must survive helm uninstall"
        print("\nhelm e2e timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    finally:
        for op in operators:
            op.stop()
        if installed:
            tools.helm_("uninstall", release, "--namespace", e2e_namespace, check=False)
        tools.kubectl_("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", "-l",
                       f"{ISOLATION_LABEL}={session}", "--ignore-not-found", check=False)


def test_cluster_wide_install_grants_exactly_the_rules(
    cluster: LocalCluster, tools: Tools, kube_api: kclient.ApiClient, e2e_namespace: str, tmp_path: Path,
) -> None:
    """The default (cluster-wide) release: its ServiceAccount may do what RULES say, in any namespace.

    No operator process runs in this mode here: cluster-wide, it would act on other tests' services."""
    release = f"dcw-{secrets.token_hex(3)}"
    tools.helm_("install", release, str(CHART), "--namespace", e2e_namespace, "--wait", "--timeout", "3m")
    try:
        apps_v1: Any = kclient.AppsV1Api(kube_api)
        deployment = apps_v1.read_namespaced_deployment(f"{release}-disagg-operator", e2e_namespace)
        args = deployment.spec.template.spec.containers[0].args
        assert "--all-namespaces" in args and not [a for a in args if a.startswith("--namespace")]
        kubeconfig = cluster.sa_kubeconfig(e2e_namespace, deployment.spec.template.spec.service_account_name,
                                           tmp_path / "sa.kubeconfig")
        sa_api = cluster.api_client(kubeconfig)
        try:
            for rule in RULES:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        for verb in rule["verbs"]:
                            assert access_allowed(sa_api, group, resource, verb, None), (group, resource, verb)
            for group, resource, verb in [("", "secrets", "get"), ("", "configmaps", "create"), ("", "nodes", "list"),
                                          ("apps", "daemonsets", "create"), (GROUP, PLURAL, "delete"),
                                          ("rbac.authorization.k8s.io", "clusterroles", "create")]:
                assert not access_allowed(sa_api, group, resource, verb, None), (group, resource, verb)
        finally:
            closer: Any = sa_api.close
            closer()
    finally:
        tools.helm_("uninstall", release, "--namespace", e2e_namespace, "--wait", "--timeout", "3m")
    wait_for("the release's objects to go", lambda: not leftovers(tools, release, [e2e_namespace]) or None,
             timeout=90, details=lambda: "\n".join(leftovers(tools, release, [e2e_namespace])))


# ----------------------------------------------------------------------------------------------------
# the admission policy that confines the operator's ServiceAccount to its own objects


def test_admission_policy_confines_the_operator_and_it_still_works(
    cluster: LocalCluster, tools: Tools, kube_api: kclient.ApiClient, e2e_namespace: str,
    apps_namespace: tuple[str, str], tmp_path: Path,
) -> None:
    apps, session = apps_namespace
    release = f"dap-{secrets.token_hex(3)}"
    policy = isolation_policy(f"disagg-e2e-helm-{session}", session, e2e_namespace)
    tools.kubectl_("apply", "-f", "-", input=yaml.safe_dump_all(policy))
    custom: Any = kclient.CustomObjectsApi(kube_api)
    core: Any = kclient.CoreV1Api(kube_api)
    operator: Operator | None = None
    # the CRD of this checkout (another branch's run may have installed its own; helm never upgrades it)
    tools.kubectl_("apply", "--server-side", "--force-conflicts", "-f",
                   str(REPO / "crds" / "disagg.dev_inferenceservices.yaml"))
    tools.kubectl_("wait", "--for=condition=Established", "crd/inferenceservices.disagg.dev", "--timeout=60s")
    try:
        # namespaced RBAC keeps this release's operator to the test's namespace; the policy is cluster-wide
        values = {"rbac": {"namespaced": True}, "watchNamespaces": [apps]}
        tools.helm_("install", release, str(CHART), "--namespace", e2e_namespace, "--wait", "--timeout", "3m",
                    *values_args(values, tmp_path))
        kinds = tools.kubectl_("get", "validatingadmissionpolicy,validatingadmissionpolicybinding", "-l",
                               f"app.kubernetes.io/instance={release}", "-o", "name").stdout.split()
        assert len(kinds) == 2, f"the chart made no policy on a cluster that serves the API: {kinds}"
        deployment = kclient.AppsV1Api(kube_api).read_namespaced_deployment(f"{release}-disagg-operator",
                                                                            e2e_namespace)
        pod_spec = deployment.spec.template.spec
        assert pod_spec is not None and pod_spec.service_account_name and pod_spec.containers[0].args
        sa_config = cluster.sa_kubeconfig(e2e_namespace, pod_spec.service_account_name, tmp_path / "sa.kubeconfig")

        def as_operator(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
            return tools.kubectl_("--kubeconfig", str(sa_config), "-n", apps, *args, input=input, check=False)

        def service_doc(name: str, labelled: bool) -> str:
            labels = {"app.kubernetes.io/managed-by": "disagg"} if labelled else {"team": "payments"}
            return yaml.safe_dump({"apiVersion": "v1", "kind": "Service",
                                   "metadata": {"name": name, "namespace": apps, "labels": labels},
                                   "spec": {"ports": [{"port": 80}], "selector": {"app": name}}})

        def refused(proc: subprocess.CompletedProcess[str]) -> bool:
            return proc.returncode != 0 and "ValidatingAdmissionPolicy" in proc.stderr and "managed-by" in proc.stderr

        # the policy takes a moment to be enforced after it is created
        wait_for("the policy to refuse the operator an unlabelled Service",
                 lambda: refused(as_operator("create", "--dry-run=server", "-f", "-",
                                             input=service_doc("probe", labelled=False))), timeout=30)
        assert refused(as_operator("create", "-f", "-", input=service_doc("theirs", labelled=False)))

        tools.kubectl_("-n", apps, "create", "-f", "-", input=service_doc("payments", labelled=False))  # as admin
        before = core.read_namespaced_service("payments", apps)
        assert refused(as_operator("patch", "service", "payments", "--type=merge",
                                   "-p", '{"metadata": {"labels": {"app.kubernetes.io/managed-by": "disagg"}}}'))
        assert refused(as_operator("apply", "--server-side", "--force-conflicts", "--field-manager=disagg", "-f", "-",
                                   input=service_doc("payments", labelled=True)))
        assert refused(as_operator("delete", "service", "payments"))
        after = core.read_namespaced_service("payments", apps)
        assert (after.metadata.resource_version, after.metadata.labels) == (
            before.metadata.resource_version, before.metadata.labels)

        # its own objects: created, changed and deleted as before, and never unlabelled
        assert as_operator("create", "-f", "-", input=service_doc("mine", labelled=True)).returncode == 0
        assert as_operator("patch", "service", "mine", "--type=merge",
                           "-p", '{"metadata": {"labels": {"x": "y"}}}').returncode == 0
        assert refused(as_operator("patch", "service", "mine", "--type=json", "-p",
                                   '[{"op": "remove", "path": "/metadata/labels/app.kubernetes.io~1managed-by"}]'))
        assert as_operator("delete", "service", "mine").returncode == 0
        # the policy matches this ServiceAccount only: the admin is not confined
        tools.kubectl_("-n", apps, "label", "service", "payments", "checked=yes")

        # and the operator works under it: a service to Ready with every child
        operator = Operator("op", list(pod_spec.containers[0].args), sa_config, tmp_path / "op.log").start()
        custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, small_service("tiny", apps))

        def ready() -> bool:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny")
            return (condition(obj, "Ready") or {}).get("status") == "True"

        def details() -> str:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny")
            return json.dumps(obj.get("status"), indent=1) + "\n" + (operator.log() if operator else "")

        wait_for("tiny Ready=True under the admission policy", ready, timeout=120, details=details)
        assert not re.search(r"ValidatingAdmissionPolicy|denied the request", operator.log()), operator.log()
        # an edit (applies, and the claim of created fields) goes through too
        custom.patch_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "tiny",
                                              {"spec": {"engine": {"extraArgs": ["--max-num-seqs", "64"]}}})
        def edited() -> bool:  # an engine change comes up as the next revision's pool (tiny--decode-b)
            pools = kclient.AppsV1Api(kube_api).list_namespaced_deployment(
                apps, label_selector="disagg.dev/service=tiny,disagg.dev/role=decode").items
            specs = [d.spec.template.spec for d in pools]
            return any(spec is not None and (spec.containers[0].args or [""])[-1] == "64" for spec in specs)

        wait_for("the edit applied", edited, timeout=60, details=operator.log)
        assert not re.search(r"ValidatingAdmissionPolicy|denied the request", operator.log()), operator.log()
    finally:
        if operator is not None:
            operator.stop()
        tools.helm_("uninstall", release, "--namespace", e2e_namespace, "--wait", "--timeout", "3m", check=False)
        tools.kubectl_("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", "-l",
                       f"{ISOLATION_LABEL}={session}", "--ignore-not-found", check=False)
