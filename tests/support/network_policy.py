"""A small evaluator of Kubernetes NetworkPolicy ingress rules, for tests (the local cluster has no CNI,
so nothing there enforces policies).

The semantics, as the NetworkPolicy API documents them: a pod that no policy with Ingress in its
policyTypes selects admits everything; a selected pod admits a connection when any rule of any
selecting policy admits it (policies and rules are ORed). A rule admits when one of its `from` peers
matches the source (no `from`: every source) and one of its `ports` matches the destination port (no
`ports`: every port). A peer with podSelector alone selects pods in the policy's namespace; with
namespaceSelector alone, every pod in the namespaces it selects; with both, pods matching both (AND);
ipBlock matches the source IP. Named ports resolve against the destination pod's container ports;
a port's protocol defaults to TCP; `endPort` makes a range.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    """A pod as a policy sees it."""

    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    """Its containers' named ports (for named ports in a policy)."""
    ip: str = "10.0.0.1"


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a label selector matches (an empty selector matches everything)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {operator!r}")
    return True


def peer_matches(peer: dict[str, Any], policy_namespace: str, source: Pod,
                 namespace_labels: dict[str, dict[str, str]]) -> bool:
    if "ipBlock" in peer:
        address = ipaddress.ip_address(source.ip)
        block = peer["ipBlock"]
        inside = address in ipaddress.ip_network(block["cidr"])
        return inside and not any(address in ipaddress.ip_network(c) for c in block.get("except") or [])
    pod_selector, namespace_selector = peer.get("podSelector"), peer.get("namespaceSelector")
    if namespace_selector is not None:
        # the API server labels every namespace with its name
        labels = {**namespace_labels.get(source.namespace, {}), "kubernetes.io/metadata.name": source.namespace}
        if not selects(namespace_selector, labels):
            return False
    elif source.namespace != policy_namespace:
        return False
    return pod_selector is None or selects(pod_selector, source.labels)


def port_matches(entry: dict[str, Any], destination: Pod, port: int, protocol: str) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str) and not wanted.isdigit():
        return destination.ports.get(wanted) == port
    low = int(wanted)
    return low <= port <= int(entry.get("endPort", low))


def ingress_types(policy: dict[str, Any]) -> bool:
    types = policy["spec"].get("policyTypes")
    return "Ingress" in types if types else True  # unset: Ingress always applies


def admitted(policies: list[dict[str, Any]], source: Pod, destination: Pod, port: int, protocol: str = "TCP",
             namespace_labels: dict[str, dict[str, str]] | None = None) -> bool:
    """Whether the policies let `source` open a connection to `destination` on `port`."""
    namespaces = namespace_labels or {}
    selecting = [p for p in policies
                 if p["metadata"].get("namespace", "default") == destination.namespace and ingress_types(p)
                 and selects(p["spec"].get("podSelector", {}), destination.labels)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            if peers and not any(peer_matches(peer, destination.namespace, source, namespaces) for peer in peers):
                continue
            entries = rule.get("ports")
            if entries and not any(port_matches(e, destination, port, protocol) for e in entries):
                continue
            return True
    return False
