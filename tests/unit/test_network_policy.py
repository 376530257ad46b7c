"""The engines' NetworkPolicy, by its semantics: a table of (source pod, its namespace, destination
port) -> admitted, evaluated with tests/support/network_policy.py (tested first on known cases).

Only this service's router and the metrics scrapers reach an engine's HTTP port (the OpenAI API,
/metrics, SGLang's admin endpoints); the KV ports, and any other, only this service's own engine pods;
the router's ports are left to clients (no policy selects the router).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import parse_scrapers, render_service
from support.network_policy import Pod, admitted, selects
from support.paths import REPO

INPUTS = sorted((REPO / "examples").glob("*.yaml")) + sorted((REPO / "tests" / "golden" / "input").glob("*.yaml"))


def policy(spec: dict[str, Any], namespace: str = "ns") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": namespace}, "spec": spec}


# --- the evaluator on known cases -----------------------------------------------------------------

DB = Pod("ns", {"role": "db"}, {"redis": 6379})
# the NetworkPolicy concept page's example, ingress part
DOCS_EXAMPLE = policy({
    "podSelector": {"matchLabels": {"role": "db"}},
    "policyTypes": ["Ingress", "Egress"],
    "ingress": [{
        "from": [
            {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
            {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
            {"podSelector": {"matchLabels": {"role": "frontend"}}},
        ],
        "ports": [{"protocol": "TCP", "port": 6379}],
    }],
})
NAMESPACES = {"mine": {"project": "myproject"}}


@pytest.mark.parametrize(
    ("source", "port", "protocol", "expected"),
    [
        (Pod("ns", {"role": "frontend"}), 6379, "TCP", True),
        (Pod("ns", {"role": "frontend"}), 80, "TCP", False),
        (Pod("ns", {"role": "frontend"}), 6379, "UDP", False),
        (Pod("other", {"role": "frontend"}), 6379, "TCP", False),  # podSelector alone: the policy's namespace
        (Pod("mine", {}), 6379, "TCP", True),  # namespaceSelector alone: any pod there
        (Pod("x", {}, ip="172.17.0.5"), 6379, "TCP", True),
        (Pod("x", {}, ip="172.17.1.5"), 6379, "TCP", False),  # except
        (Pod("ns", {"role": "backend"}), 6379, "TCP", False),
    ],
)
def test_the_documented_example(source: Pod, port: int, protocol: str, expected: bool) -> None:
    assert admitted([DOCS_EXAMPLE], source, DB, port, protocol, NAMESPACES) is expected


def test_unselected_pods_admit_everything_and_policies_are_ored() -> None:
    anyone = Pod("elsewhere", {"x": "y"})
    assert admitted([], anyone, DB, 1)
    assert admitted([DOCS_EXAMPLE], anyone, Pod("ns", {"role": "web"}), 1), "not selected"
    assert admitted([DOCS_EXAMPLE], anyone, Pod("other", {"role": "db"}), 1), "a policy selects its namespace only"
    deny_all = policy({"podSelector": {}, "policyTypes": ["Ingress"]})
    assert not admitted([deny_all], anyone, DB, 6379)
    allow_all = policy({"podSelector": {}, "ingress": [{}]})
    assert admitted([deny_all, allow_all], anyone, DB, 6379), "any policy's rule admits"
    egress_only = policy({"podSelector": {}, "policyTypes": ["Egress"]})
    assert admitted([egress_only], anyone, DB, 6379)
    empty_from = policy({"podSelector": {}, "ingress": [{"from": [], "ports": [{"port": 6379}]}]})
    assert admitted([empty_from], anyone, DB, 6379), "an empty `from` admits every source"


def test_selector_peers_and_and_or() -> None:
    both = policy({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "p"}}}]}]})
    either = policy({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}}, {"podSelector": {"matchLabels": {"app": "p"}}}]}]})
    spaces = {"t": {"team": "a"}}
    assert admitted([both], Pod("t", {"app": "p"}), DB, 1, namespace_labels=spaces)
    assert not admitted([both], Pod("t", {"app": "q"}), DB, 1, namespace_labels=spaces)
    assert not admitted([both], Pod("ns", {"app": "p"}), DB, 1, namespace_labels=spaces)
    assert admitted([either], Pod("t", {"app": "q"}), DB, 1, namespace_labels=spaces)
    assert admitted([either], Pod("ns", {"app": "p"}), DB, 1, namespace_labels=spaces)
    all_namespaces = policy({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert admitted([all_namespaces], Pod("anywhere"), DB, 1)
    by_name = policy({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}]})
    assert admitted([by_name], Pod("monitoring"), DB, 1) and not admitted([by_name], Pod("ns"), DB, 1)


def test_named_ports_ranges_and_expressions() -> None:
    named = policy({"podSelector": {}, "ingress": [{"ports": [{"port": "redis"}]}]})
    assert admitted([named], Pod("ns"), DB, 6379) and not admitted([named], Pod("ns"), DB, 6380)
    assert not admitted([named], Pod("ns"), Pod("ns", {}, {}), 6379), "a port name the pod lacks matches nothing"
    ranged = policy({"podSelector": {}, "ingress": [{"ports": [{"port": 5600, "endPort": 5607}]}]})
    assert admitted([ranged], Pod("ns"), DB, 5607) and not admitted([ranged], Pod("ns"), DB, 5608)
    assert selects({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["a"]}]}, {})
    assert not selects({"matchExpressions": [{"key": "k", "operator": "In", "values": ["a"]}]}, {})
    assert selects({"matchExpressions": [{"key": "k", "operator": "Exists"}]}, {"k": ""})
    assert not selects({"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]}, {"k": "v"})
    assert selects({}, {"any": "thing"})


# --- the rendered policy --------------------------------------------------------------------------

NS = "serving"
SPACES = {"monitoring": {"kubernetes.io/metadata.name": "monitoring"}, NS: {}, "other": {}}


def rendered(source: Path, change: dict[str, Any] | None = None, scrapers: str | None = None
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    body = copy.deepcopy(yaml.safe_load(source.read_text()))
    body["metadata"]["namespace"] = NS
    body["spec"].update(change or {})
    args = () if scrapers is None else (parse_scrapers(scrapers),)
    docs = render_service(body, DEFAULT_CATALOG, *args)
    return [d for d in docs if d["kind"] == "NetworkPolicy"], body


def pods_of(docs: list[dict[str, Any]], name: str) -> dict[str, Pod]:
    """The service's pods as the policy sees them: labels and named ports from their templates."""
    out: dict[str, Pod] = {}
    for doc in docs:
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
        elif doc["kind"] == "LeaderWorkerSet":  # a multi-node pool: its leaders serve HTTP
            template = doc["spec"]["leaderWorkerTemplate"]["leaderTemplate"]
        else:
            continue
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        out[template["metadata"]["labels"]["disagg.dev/role"]] = Pod(NS, template["metadata"]["labels"], ports)
    return out


def table(source: Path) -> list[tuple[str, Pod, str, bool]]:
    """(who, source pod, destination port name, admitted?) for a prefill engine of the service."""
    body = yaml.safe_load(source.read_text())
    name = body["metadata"]["name"]
    own = {"disagg.dev/service": name, "app.kubernetes.io/managed-by": "disagg"}
    other = {"disagg.dev/service": "other", "app.kubernetes.io/managed-by": "disagg"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    return [
        ("own router", Pod(NS, {**own, "disagg.dev/role": "router"}), "http", True),
        ("own router", Pod(NS, {**own, "disagg.dev/role": "router"}), "kv", False),
        ("another service's router", Pod(NS, {**other, "disagg.dev/role": "router"}), "http", False),
        ("own router label in another namespace", Pod("other", {**own, "disagg.dev/role": "router"}), "http", False),
        ("prometheus in monitoring", Pod("monitoring", prometheus), "http", True),
        ("prometheus in monitoring", Pod("monitoring", prometheus), "kv", False),
        ("prometheus elsewhere", Pod(NS, prometheus), "http", False),
        ("another pod in monitoring", Pod("monitoring", {"app": "grafana"}), "http", False),
        ("own decode", Pod(NS, {**own, "disagg.dev/role": "decode"}), "kv", True),
        ("own decode", Pod(NS, {**own, "disagg.dev/role": "decode"}), "dynamic", True),
        ("own prefill", Pod(NS, {**own, "disagg.dev/role": "prefill"}), "kv", True),
        ("another service's decode", Pod(NS, {**other, "disagg.dev/role": "decode"}), "kv", False),
        ("another service's decode", Pod(NS, {**other, "disagg.dev/role": "decode"}), "http", False),
        ("own decode labels in another namespace", Pod("other", {**own, "disagg.dev/role": "decode"}), "kv", False),
        ("any pod of the namespace", Pod(NS, {"app": "curl"}), "http", False),
        ("any pod of the namespace", Pod(NS, {"app": "curl"}), "kv", False),
    ]


def port_of(destination: Pod, name: str, kv: int) -> int:
    return {"http": destination.ports["http"], "kv": kv, "dynamic": 47123}[name]


@pytest.mark.parametrize("source", INPUTS, ids=[p.stem for p in INPUTS])
def test_who_reaches_the_engines(source: Path) -> None:
    policies, body = rendered(source)
    docs = render_service(body, DEFAULT_CATALOG)
    pods = pods_of(docs, body["metadata"]["name"])
    for role in ("prefill", "decode"):
        destination = pods[role]
        kv = next((p for n, p in destination.ports.items() if n.startswith("kv-")), 5600)
        wrong = [(who, port, expected) for who, pod, port, expected in table(source)
                 if admitted(policies, pod, destination, port_of(destination, port, kv), namespace_labels=SPACES)
                 is not expected]
        assert not wrong, f"{role}: (source, port, expected) that came out otherwise: {wrong}"
    # the router is for clients: no policy of the service selects it
    router = pods["router"]
    assert admitted(policies, Pod("anywhere", {"app": "client"}), router, router.ports["http"],
                    namespace_labels=SPACES)


def test_the_spec_and_the_operator_flag_choose_the_scrapers() -> None:
    source = REPO / "examples" / "01-vllm-nixl-llama70b.yaml"
    body = yaml.safe_load(source.read_text())
    name = body["metadata"]["name"]
    prefill = Pod(NS, {"disagg.dev/service": name, "disagg.dev/role": "prefill"}, {"http": 8000})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    agent = Pod("observability", {"app": "otel-agent"})
    spaces = {**SPACES, "observability": {"team": "obs"}}

    def reaches(policies: list[dict[str, Any]], who: Pod) -> bool:
        return admitted(policies, who, prefill, 8000, namespace_labels=spaces)

    default, _ = rendered(source)
    assert reaches(default, prometheus) and not reaches(default, agent)
    none, _ = rendered(source, {"networkPolicy": {"metricsScrapers": []}})
    assert not reaches(none, prometheus) and not reaches(none, agent), "an empty list admits no scraper"
    assert len(none[0]["spec"]["ingress"]) == 2, "no rule with an empty `from` (that would admit everyone)"
    custom = {"networkPolicy": {"metricsScrapers": [{"namespaceSelector": {"matchLabels": {"team": "obs"}},
                                                     "podSelector": {"matchLabels": {"app": "otel-agent"}}}]}}
    mine, _ = rendered(source, custom)
    assert reaches(mine, agent) and not reaches(mine, prometheus)
    flag = '[{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]'
    flagged, _ = rendered(source, scrapers=flag)
    assert reaches(flagged, agent) and not reaches(flagged, prometheus)
    spec_wins, _ = rendered(source, custom, scrapers='[{"namespaceSelector": {}}]')
    assert not reaches(spec_wins, prometheus), "the spec's scrapers win over the operator's default"


@pytest.mark.parametrize(
    "text", ['{"podSelector": {}}', "[1]", '[{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]',
             '[{"podSelector": {"matchLabels": {"-bad": "x"}}}]',
             '[{"podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}}]', "not json"])
def test_bad_scraper_peers_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_scrapers(text)
