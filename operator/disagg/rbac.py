"""The permissions the operator needs, as one list both `disagg rbac` and the Helm chart print.

Least privilege: the kinds it manages, pods (read, for scheduling status: the routers it creates are
granted list and watch, and RBAC only lets a subject grant what it holds; patch and delete, for the
deletion cost of a scale-down and to replace a restarted engine or a stuck router), events, and the
InferenceServices themselves. tests/packaging/test_chart.py checks the chart's rules equal these.
"""

from __future__ import annotations

from typing import Any

from disagg import GROUP, PLURAL

MANAGE = ["get", "list", "watch", "create", "update", "patch", "delete"]
READ = ["get", "list", "watch"]

RULES: list[dict[str, Any]] = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch", "update"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": MANAGE},
    # pools whose workers span nodes, where the LeaderWorkerSet CRD is installed
    {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets"], "verbs": MANAGE},
    {"apiGroups": [""], "resources": ["services", "serviceaccounts"], "verbs": MANAGE},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": MANAGE},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": MANAGE},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": MANAGE},
    # pods: read for scheduling status; patch for the scale-down's pod-deletion-cost; delete to replace an
    # engine restarted in place (its peers would break on its new identity) and a router that keeps a
    # recovered worker out
    {"apiGroups": [""], "resources": ["pods"], "verbs": [*READ, "patch", "delete"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
    # kopf discovers resources and, with peering, coordinates replicas through its peering objects
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["get", "list", "watch", "patch"]},
]


def rbac_manifests(namespace: str, service_account: str, name: str = "disagg-operator") -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole and ClusterRoleBinding for a cluster-wide operator."""
    labels = {"app.kubernetes.io/name": "disagg-operator", "app.kubernetes.io/part-of": "disagg"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": service_account, "namespace": namespace, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name, "labels": labels}, "rules": RULES},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]},
    ]
