"""Credentials from Secrets, ConfigMaps and ServiceAccounts, without the operator ever holding a
Secret: env valueFrom (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), envFrom, a
ServiceAccount per pool, validated as the API server would; no rule of the operator's RBAC (its
rules, the chart's in both modes, the router's Role) reaches Secrets.
"""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest
import yaml

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.kube.client import CHILD_KINDS
from disagg.rbac import RULES
from disagg.render import render_service
from support.paths import REPO, helm_binary

EXAMPLE = REPO / "examples" / "01-vllm-nixl-llama70b.yaml"
CHART = REPO / "charts" / "disagg-operator"


def service(change: dict[str, Any] | None = None, pool: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["spec"]["engine"].update(change or {})
    body["spec"]["decode"].update(pool or {})
    return body


def engines(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in render_service(body, DEFAULT_CATALOG)
            if d["kind"] == "Deployment" and not d["metadata"]["name"].endswith("-router")}


def test_the_gated_example_takes_its_token_from_a_secret() -> None:
    for name, pod in engines(service()).items():
        (engine,) = pod["containers"]
        token = {e["name"]: e for e in engine["env"]}["HF_TOKEN"]
        assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
        assert "value" not in token, name


def test_env_from_and_a_service_account_per_pool() -> None:
    env_from = [{"secretRef": {"name": "s3-keys"}}, {"prefix": "CFG_", "configMapRef": {"name": "c"}}]
    body = service({"envFrom": env_from,
                    "env": [{"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]},
                   {"serviceAccountName": "bucket-reader"})
    pods = engines(body)
    decode, prefill = pods["llama-70b-decode"], pods["llama-70b-prefill"]
    assert decode["serviceAccountName"] == "bucket-reader" and "serviceAccountName" not in prefill
    for pod in (decode, prefill):
        assert pod["automountServiceAccountToken"] is False, "the engines never get an API token"
        (engine,) = pod["containers"]
        assert engine["envFrom"] == env_from
        assert {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in engine["env"]


@pytest.mark.parametrize(
    ("engine", "pool", "field"),
    [
        ({"env": [{"name": "T", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}, None,
         "env[0]"),
        ({"env": [{"name": "T", "valueFrom": {}}]}, None, "valueFrom"),
        ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                                              "fieldRef": {"fieldPath": "metadata.name"}}}]}, None, "valueFrom"),
        ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "Hf_Token", "key": "k"}}}]}, None,
         "secretKeyRef.name"),
        ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}}]}, None,
         "secretKeyRef.key"),
        ({"env": [{"name": "T", "valueFrom": {"configMapKeyRef": {"name": "c", "key": ".."}}}]}, None,
         "configMapKeyRef"),
        ({"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}, None, "secretKeyRef.key"),
        ({"env": [{"name": "T", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]}, None,
         "fieldRef.fieldPath"),
        ({"env": [{"name": "T", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}}]}, None,
         "resourceFieldRef.resource"),
        ({"env": [{"name": "T", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu",
                                                                   "containerName": "sidecar"}}}]}, None,
         "resourceFieldRef.containerName"),
        ({"env": [{"name": "T", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "x"}}}]},
         None, "resourceFieldRef.divisor"),
        ({"envFrom": [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]}, None, "envFrom[0]"),
        ({"envFrom": [{"prefix": "1X"}]}, None, "envFrom[0]"),
        ({"envFrom": [{"secretRef": {"name": "s" * 254}}]}, None, "secretRef.name"),
        (None, {"serviceAccountName": "Bucket_Reader"}, "decode.serviceAccountName"),
        (None, {"serviceAccountName": ""}, "decode.serviceAccountName"),
    ],
)
def test_bad_references_are_refused_naming_the_field(
    engine: dict[str, Any] | None, pool: dict[str, Any] | None, field: str
) -> None:
    with pytest.raises(InvalidSpec) as refused:
        validate_service(service(engine, pool), DEFAULT_CATALOG)
    assert any(field in e.field for e in refused.value.errors), [str(e) for e in refused.value.errors]


def _grants_secrets(rule: dict[str, Any]) -> bool:
    groups, resources, verbs = (rule.get(k) or [] for k in ("apiGroups", "resources", "verbs"))
    return ("" in groups or "*" in groups) and bool({"secrets", "*"} & set(resources)) and bool(verbs)


def test_the_operator_holds_no_permission_on_secrets() -> None:
    assert not [r for r in RULES if _grants_secrets(r)]
    assert not [r for r in RULES if "*" in (r.get("resources") or []) + (r.get("verbs") or [])], "no wildcards"
    assert "secrets" not in {kind.plural for kind in CHILD_KINDS}, "the operator lists or watches no Secret"
    roles = [d for d in render_service(service(), DEFAULT_CATALOG) if d["kind"] == "Role"]
    assert roles and not [r for role in roles for r in role["rules"] if _grants_secrets(r)]


@pytest.mark.parametrize("mode", [(), ("--set", "rbac.namespaced=true", "--set", "watchNamespaces={a,b}")])
def test_the_charts_rbac_holds_no_permission_on_secrets(mode: tuple[str, ...]) -> None:
    helm = helm_binary()
    if helm is None:
        pytest.skip("helm binary not found")
    out = subprocess.run([helm, "template", "r", str(CHART), *mode], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    roles = [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("ClusterRole", "Role")]
    assert roles
    bad = [json.dumps(r) for role in roles for r in role["rules"] if _grants_secrets(r)]
    assert not bad, bad


def test_the_router_reads_pods_with_list_and_watch_only() -> None:
    # vllm-router and sglang-router run a kube-rs watcher on pods: LIST, then WATCH; never GET
    for source in sorted((REPO / "examples").glob("*.yaml")):
        (role,) = [d for d in render_service(yaml.safe_load(source.read_text()), DEFAULT_CATALOG)
                   if d["kind"] == "Role"]
        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}], source.name
