"""The Helm chart, rendered with `helm template` (no cluster): RBAC equals disagg.rbac.RULES in both modes,
the Deployment's security context, probes and arguments (parsed by `disagg run`'s own parser), the
monitoring objects, the dashboard, and values.schema.json rejecting bad values.

Skipped when the helm binary is missing; `make test` builds it (hack/cluster.py up) before the unit tests,
which runs the same chart against the local cluster (tests/e2e/test_helm.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagg.cli import build_parser
from disagg.engines import ENGINES
from disagg.rbac import RULES
from disagg.scaling.signals import BY
from disagg.wellknown import SERVICE_LABEL
from support.paths import REPO, helm_binary

CHART = REPO / "charts" / "disagg-operator"
RELEASE, NAMESPACE = "rel", "disagg-system"
# resources of RULES that are cluster-scoped (namespaced mode grants them through a ClusterRole)
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}
ROLE_LABEL = "disagg.dev/role"


HELM = helm_binary()
pytestmark = pytest.mark.skipif(
    HELM is None,
    reason="helm binary not found (PATH, ~/.cache/disagg/bin): `make test` or `hack/cluster.py up` builds it",
)


def template(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    proc = subprocess.run(
        [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True, text=True, timeout=60,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(*args: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(*args).stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = c
    return found


def canonical(rules: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True) for r in yaml.safe_load(yaml.safe_dump(rules)))


NAMESPACED = ("--set", "rbac.namespaced=true", "--set", "watchNamespaces={team-a,team-b}")
HA = ("--set", "peering.enabled=true", "--set", "replicaCount=2")


# ----------------------------------------------------------------------------------------------------
# RBAC


def test_cluster_wide_rbac_is_exactly_the_operator_rules() -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    assert role["rules"] == RULES, "the chart's ClusterRole differs from disagg.rbac.RULES"
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_namespaced_rbac_splits_the_operator_rules() -> None:
    docs = render(*NAMESPACED)
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    cluster_role = one(docs, "ClusterRole")
    for role in roles:
        # every rule, in the Role of the namespace or in the ClusterRole: together exactly RULES
        assert canonical(role["rules"]) + canonical(cluster_role["rules"]) == canonical(RULES)
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == CLUSTER_SCOPED
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in cluster_role["rules"]), "reads only"
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    for binding in [*bindings, one(docs, "ClusterRoleBinding")]:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    assert all(b["roleRef"]["kind"] == "Role" for b in bindings)


def test_rbac_create_false_renders_no_rbac() -> None:
    docs = render("--set", "rbac.create=false")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]


# ----------------------------------------------------------------------------------------------------
# the Deployment


@pytest.mark.parametrize("mode", [(), NAMESPACED, (*NAMESPACED, *HA), HA])
def test_pod_security(mode: tuple[str, ...]) -> None:
    docs = render(*mode)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(docs)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on the read-only root filesystem"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert container(docs)["resources"]["requests"] and container(docs)["resources"]["limits"]["memory"]


def test_probes_hit_the_liveness_endpoint() -> None:
    docs = render("--set", "operator.livenessPort=8181")
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = build_parser().parse_args(["run", *c["args"]])
    assert args.liveness_port == ports["healthz"] == 8181
    assert args.metrics_port == ports["metrics"]
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}


def parsed_args(docs: list[dict[str, Any]]) -> Any:
    return build_parser().parse_args(["run", *container(docs)["args"]])


def test_args_cluster_wide_by_default() -> None:
    docs = render()
    args = parsed_args(docs)
    assert args.all_namespaces and not args.namespace
    assert args.peering is None and args.prometheus_url is None and args.accelerator_catalog is None
    assert args.resync_seconds == 300 and args.workers == 16
    assert args.rollouts == "versioned"
    assert args.listen_host == "0.0.0.0" and (args.liveness_port, args.metrics_port) == (8080, 9100)
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}, "never two standalone operators"
    assert not [d for d in docs if d["kind"] in ("ClusterKopfPeering", "KopfPeering")]


def test_args_namespaced_mode() -> None:
    args = parsed_args(render(*NAMESPACED))
    assert not args.all_namespaces and args.namespace == ["team-a", "team-b"]


def test_args_from_values(tmp_path: Path) -> None:
    values = {
        "operator": {"resyncSeconds": 120, "workers": 4, "verbose": True, "rollouts": "in-place",
                     "extraArgs": ["--metrics-staleness=45"]},
        "autoscaling": {"tickSeconds": 2.5, "scaleDownWindowSeconds": 900, "metricsStalenessSeconds": 30,
                        "rateWindow": "1m", "scrapeIntervalSeconds": 20},
        "prometheus": {"url": "https://prom.monitoring.svc:9091", "timeoutSeconds": 3,
                       "tokenSecret": {"name": "prom-token"}, "caConfigMap": {"name": "prom-ca"}},
        "acceleratorCatalog": {"accelerators": {"my-gpu": {"resourceName": "example.com/gpu"}}},
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    docs = render("--values", str(tmp_path / "values.yaml"))
    args = parsed_args(docs)
    assert (args.resync_seconds, args.workers, args.verbose, args.rollouts) == (120, 4, True, "in-place")
    assert (args.autoscale_tick, args.scale_down_window) == (2.5, 900)
    assert args.metrics_staleness == 45, "extraArgs come last and win"
    assert args.prometheus_rate_window == "1m"
    assert args.scrape_interval == 20
    assert (args.prometheus_url, args.prometheus_timeout) == ("https://prom.monitoring.svc:9091", 3)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert args.prometheus_token_file == f"{mounts['prometheus-token']}/token"
    assert volumes["prometheus-token"]["secret"]["secretName"] == "prom-token"
    assert args.prometheus_ca_file == f"{mounts['prometheus-ca']}/ca.crt"
    assert volumes["prometheus-ca"]["configMap"]["name"] == "prom-ca"
    assert args.accelerator_catalog == f"{mounts['accelerator-catalog']}/accelerators.yaml"
    catalog = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-accelerators")]
    assert volumes["accelerator-catalog"]["configMap"]["name"] == catalog[0]["metadata"]["name"]
    entries = yaml.safe_load(catalog[0]["data"]["accelerators.yaml"])
    assert entries == {"accelerators": {"my-gpu": {"resourceName": "example.com/gpu"}}}


def test_ha_peering_cluster_wide_and_namespaced() -> None:
    docs = render(*HA)
    args = parsed_args(docs)
    peering = one(docs, "ClusterKopfPeering")
    assert args.peering == peering["metadata"]["name"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "kopf's peer identity"

    docs = render(*NAMESPACED, *HA, "--set", "peering.name=ha")
    assert parsed_args(docs).peering == "ha"
    peerings = [d for d in docs if d["kind"] == "KopfPeering"]
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("team-a", "ha"), ("team-b", "ha")]
    assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]


def test_image_reference() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(render())["image"] == f"disagg/disagg-operator:{chart['appVersion']}"
    digest = "sha256:" + "a" * 64
    assert container(render("--set", f"image.digest={digest}"))["image"] == f"disagg/disagg-operator@{digest}"


# ----------------------------------------------------------------------------------------------------
# CRDs


def test_chart_ships_the_crds() -> None:
    crds = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (CHART / "crds").glob("*.yaml")}
    assert (CHART / "crds" / "disagg.dev_inferenceservices.yaml").read_text() == (
        REPO / "crds" / "disagg.dev_inferenceservices.yaml").read_text(), "run `make crd`"
    (peering_file,) = [docs for name, docs in crds.items() if name.startswith("kopf.dev")]
    by_kind = {d["spec"]["names"]["kind"]: d for d in peering_file}
    assert by_kind["ClusterKopfPeering"]["spec"]["scope"] == "Cluster"
    assert by_kind["KopfPeering"]["spec"]["scope"] == "Namespaced"
    for kind, doc in by_kind.items():
        # the resources kopf peers through (kopf._cogs.structs.references: kopf.dev/v1)
        assert doc["spec"]["group"] == "kopf.dev" and doc["metadata"]["name"] == f"{kind.lower()}s.kopf.dev"
        (version,) = doc["spec"]["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True


# ----------------------------------------------------------------------------------------------------
# monitoring


def test_metrics_service_and_service_monitor() -> None:
    docs = render("--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.labels.release=kps")
    service = one(docs, "Service")
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def _prometheus_label(pod_label: str) -> str:
    """The meta label Prometheus' Kubernetes discovery gives a pod label."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)


def test_pod_monitor_gives_engine_metrics_the_operator_labels() -> None:
    docs = render("--set", "podMonitor.enabled=true")
    monitor = one(docs, "PodMonitor")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "disagg"}
    assert spec["selector"]["matchExpressions"] == [
        {"key": ROLE_LABEL, "operator": "In", "values": ["prefill", "decode"]}]
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    relabel = {tuple(r["sourceLabels"]): r["targetLabel"] for r in endpoint["relabelings"]}
    assert all(r.get("action", "replace") == "replace" for r in endpoint["relabelings"])
    # exactly the labels the operator's PromQL aggregates by
    assert relabel == {
        (_prometheus_label(SERVICE_LABEL),): "disagg_service",
        (_prometheus_label(ROLE_LABEL),): "disagg_role",
        ("__meta_kubernetes_namespace",): "namespace",
        ("__meta_kubernetes_pod_name",): "pod",
    }
    assert set(relabel.values()) >= {label.strip() for label in BY.split(",")}
    scoped = one(render("--set", "podMonitor.enabled=true", *NAMESPACED), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_pod_monitor_scrapes_at_the_interval_the_operator_is_told() -> None:
    # The operator's rates span the rate window less one scrape interval: the PodMonitor and the
    # --scrape-interval flag come from one value, so they cannot disagree.
    docs = render("--set", "podMonitor.enabled=true", "--set", "autoscaling.scrapeIntervalSeconds=10")
    (endpoint,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == "10s"
    assert parsed_args(docs).scrape_interval == 10


def test_engine_pods_match_the_pod_monitor() -> None:
    """The pods the operator renders carry the labels and the port the PodMonitor selects."""
    from disagg.catalog.accelerators import load_catalog
    from disagg.render import render_service

    body = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
    pools = [d for d in render_service(body, load_catalog(None))
             if d["kind"] == "Deployment" and d["metadata"]["name"].endswith(("-prefill", "-decode"))]
    assert len(pools) == 2
    for pool in pools:
        template_ = pool["spec"]["template"]
        labels = template_["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "disagg" and labels[ROLE_LABEL] in ("prefill", "decode")
        assert labels[SERVICE_LABEL] == body["metadata"]["name"]
        assert "http" in {p["name"] for p in template_["spec"]["containers"][0]["ports"]}


def test_prometheus_rule_alerts_on_operator_metrics() -> None:
    rule = one(render("--set", "prometheusRule.enabled=true"), "PrometheusRule")
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert rules and all(r["alert"] and r["expr"] and r["labels"]["severity"] for r in rules)
    exprs = " ".join(r["expr"] for r in rules)
    for metric in ("disagg_reconciles_total", "disagg_api_errors_total", "disagg_prometheus_query_failures_total",
                   "disagg_reconcile_duration_seconds_bucket"):
        assert metric in exprs


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert kinds == {"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"}


def dashboard_from(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def test_dashboard() -> None:
    dashboard = dashboard_from(render())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "service"}
    assert "disagg_service" in variables["service"]["definition"]
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in ("Replicas per pool: ready and desired", "Scale events", "Time to first token (TTFT)",
                   "Inter-token latency (ITL)", "KV-cache usage", "Queue depth"):
        assert needed in titles
    exprs = dashboard_exprs(dashboard)
    text = "\n".join(exprs)
    for metric in ("kube_deployment_spec_replicas", "kube_deployment_status_replicas_ready",
                   "disagg_scaling_decisions_total"):
        assert metric in text
    assert 'deployment=~"$service-(prefill|decode)"' in text
    # the engines' metric names, as the operator queries them (every engine, every name)
    for engine in ENGINES.values():
        m = engine.metrics
        for name in (*m.waiting_requests, *m.kv_cache_usage, m.ttft_histogram + "_bucket",
                     *(h + "_bucket" for h in m.itl_histogram)):
            assert name in text, name
    engine_exprs = [e for e in exprs if "disagg_service" in e]
    assert engine_exprs and all('disagg_service="$service"' in e for e in engine_exprs)
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "kube-state-metrics" in notes


def test_dashboard_namespace_override() -> None:
    docs = render("--set", "dashboard.namespace=monitoring")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert not [d for d in render("--set", "dashboard.enabled=false") if d["kind"] == "ConfigMap"]


# ----------------------------------------------------------------------------------------------------
# values.schema.json


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "replicaCount=two"), "replicaCount"),
        (("--set", "operator.resyncSeconds=-1"), "resyncSeconds"),
        (("--set", "operator.noSuchKey=1"), "noSuchKey"),
        (("--set", "operator.rollouts=blue-green"), "rollouts"),
        (("--set", "noSuchTopLevel=1"), "noSuchTopLevel"),
        (("--set", "watchNamespaces={Not_A_Namespace}"), "watchNamespaces"),
        (("--set", "image.pullPolicy=Sometimes"), "pullPolicy"),
        (("--set", "autoscaling.rateWindow=30"), "rateWindow"),
        (("--set", "prometheus.url=prometheus:9090"), "url"),
        (("--set", "rbac.namespaced=true"), "watchNamespaces"),
        (("--set", "replicaCount=2"), "peering"),
    ],
)
def test_schema_rejects_bad_values(args: tuple[str, ...], message: str) -> None:
    proc = template(*args, check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_default_values_satisfy_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"]), "every top-level value is in the schema"
    assert schema["additionalProperties"] is False


# ----------------------------------------------------------------------------------------------------
# the engines' NetworkPolicy


def test_metrics_scrapers_default_is_the_operators_and_values_override_it(tmp_path: Path) -> None:
    from disagg.render import parse_scrapers
    from disagg.render.context import DEFAULT_METRICS_SCRAPERS

    assert parse_scrapers(parsed_args(render()).metrics_scrapers) == DEFAULT_METRICS_SCRAPERS
    values = {"networkPolicy": {"metricsScrapers": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    peers = parse_scrapers(parsed_args(render("--values", str(tmp_path / "values.yaml"))).metrics_scrapers)
    assert [p.manifest() for p in peers] == values["networkPolicy"]["metricsScrapers"]
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"networkPolicy": {"metricsScrapers": []}}))
    assert parse_scrapers(parsed_args(render("--values", str(tmp_path / "none.yaml"))).metrics_scrapers) == ()


# ----------------------------------------------------------------------------------------------------
# the admission policy confining the operator


VAP = ("--api-versions", "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy")


def test_admission_policy_matches_only_the_operators_service_account() -> None:
    docs = render(*VAP)
    policy, binding = one(docs, "ValidatingAdmissionPolicy"), one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == 'system:serviceaccount:{NAMESPACE}:{sa}'"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert sorted(rule["operations"]) == ["CREATE", "DELETE", "UPDATE"]
    # every kind the operator may write (RULES) except its own InferenceServices and Events
    writable = {r for rule_ in RULES if "delete" in rule_["verbs"] or "create" in rule_["verbs"]
                for r in rule_["resources"]} - {"events"}
    assert set(rule["resources"]) == writable
    assert policy["spec"]["failurePolicy"] == "Fail"
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "object.metadata.labels" in expressions and "oldObject.metadata.labels" in expressions
    assert "'app.kubernetes.io/managed-by'" in expressions and "'disagg'" in expressions


def test_admission_policy_is_skipped_where_the_api_is_missing_or_it_is_off() -> None:
    assert not [d for d in render() if d["kind"].startswith("ValidatingAdmissionPolicy")], "no such API offline"
    off = render(*VAP, "--set", "admissionPolicy.enabled=false")
    assert not [d for d in off if d["kind"].startswith("ValidatingAdmissionPolicy")]
