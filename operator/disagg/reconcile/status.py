"""Status of an InferenceService from what its children report (Kubernetes condition conventions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.wellknown import ROLES

CONDITION_TYPES = ("Ready", "PrefillReady", "DecodeReady", "RouterReady", "KVTransferReady")
KV_FROM_TRAFFIC = ("Transferring", "KVTransferDegraded")
"""KVTransferReady reasons the autoscaling loop sets from the engines' counters (`kv_traffic_condition`);
reconcile keeps them while the structure (Services, a ready worker per pool) holds."""
RECOMPUTED_SHARE = 0.1
"""Above this share of the decode's prompt tokens computed locally, the KV path is degraded (a working
hand-off leaves at most the last token or block to the decode)."""


@dataclass(frozen=True)
class Cond:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class PodTrouble:
    """Why a pool's pods are not running, read from the pods' own conditions."""

    unschedulable: int
    pending: int
    message: str


def deployment_counts(deployment: dict[str, Any] | None) -> tuple[int, int, int, bool]:
    """(desired replicas, ready replicas, updated replicas, rollout observed) of a Deployment."""
    if deployment is None:
        return 0, 0, 0, False
    spec_replicas = int(deployment.get("spec", {}).get("replicas", 1))
    status = deployment.get("status", {}) or {}
    observed = status.get("observedGeneration", 0) >= deployment.get("metadata", {}).get("generation", 0)
    return spec_replicas, int(status.get("readyReplicas", 0)), int(status.get("updatedReplicas", 0)), observed


def pod_trouble(pods: list[dict[str, Any]]) -> PodTrouble:
    """Counts pods the scheduler could not place, with the scheduler's own reason."""
    unschedulable = 0
    pending = 0
    message = ""
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        if pod.get("status", {}).get("phase") == "Pending":
            pending += 1
        for cond in pod.get("status", {}).get("conditions", []) or []:
            scheduled = (cond.get("type"), cond.get("status"), cond.get("reason"))
            if scheduled == ("PodScheduled", "False", "Unschedulable"):
                unschedulable += 1
                message = message or str(cond.get("message", ""))
    return PodTrouble(unschedulable, pending, message)


def pool_condition(
    label: str, deployment: dict[str, Any] | None, trouble: PodTrouble | None
) -> Cond:
    ctype = f"{label}Ready"
    if deployment is None:
        return Cond(ctype, "False", "NotCreated", f"the {label.lower()} Deployment does not exist yet")
    desired, ready, updated, observed = deployment_counts(deployment)
    failure = next((c for c in (deployment.get("status") or {}).get("conditions") or []
                    if (c.get("type"), c.get("status")) == ("ReplicaFailure", "True")), None)
    if failure is not None:
        # the API server refuses the pods (Pod Security admission, a quota, a missing ServiceAccount)
        return Cond(ctype, "False", str(failure.get("reason") or "FailedCreate"),
                    f"pods cannot be created: {failure.get('message', '')}")
    if trouble is not None and trouble.unschedulable:
        return Cond(
            ctype, "False", "Unschedulable",
            f"{trouble.unschedulable} of {desired} pods cannot be scheduled: {trouble.message}",
        )
    if desired == 0:
        return Cond(ctype, "False", "ScaledToZero", "0 replicas requested")
    # pods of the previous template still running: the rollout is not over (as `kubectl rollout status`)
    leftover = int((deployment.get("status") or {}).get("replicas", 0)) > desired
    if ready >= desired and updated >= desired and observed and not leftover:
        return Cond(ctype, "True", "AllReplicasReady", f"{ready}/{desired} replicas ready")
    if ready == 0:
        return Cond(ctype, "False", "NoReplicasReady", f"0/{desired} replicas ready")
    if updated < desired or not observed or leftover:
        return Cond(ctype, "False", "RollingOut", f"{updated}/{desired} replicas updated, {ready} ready")
    return Cond(ctype, "False", "ReplicasNotReady", f"{ready}/{desired} replicas ready")


def kv_traffic_condition(handed_off: float, recomputed: float, failed: float) -> Cond | None:
    """KVTransferReady from the decode workers' counters over the rate window (per second); None without
    traffic (nothing to judge: the structural condition stands)."""
    if handed_off <= 0 and recomputed <= 0 and failed <= 0:
        return None
    share = recomputed / (handed_off + recomputed) if handed_off + recomputed > 0 else 0.0
    if failed > 0 or share > RECOMPUTED_SHARE:
        return Cond("KVTransferReady", "False", "KVTransferDegraded",
                    f"decode recomputes {share:.0%} of prompt tokens, {failed:.3g} failed KV transfers/s: prefill "
                    "work is done twice (check the KV-transfer Services, the connector and both pools' revisions)")
    return Cond("KVTransferReady", "True", "Transferring",
                f"decode receives the KV of its prompts from prefill ({handed_off:.3g}/s, {share:.0%} recomputed)")


def compute_conditions(
    deployments: dict[str, dict[str, Any] | None],
    troubles: dict[str, PodTrouble | None],
    kv_services_present: bool,
    kv_from_traffic: dict[str, Any] | None = None,
) -> list[Cond]:
    """Conditions from the children: one per pool, the router, the KV path, and Ready over all.

    `kv_from_traffic` is the KVTransferReady the autoscaling loop last set from traffic: it stands while the
    structure holds. A degraded KV path still serves: Ready stays True and says so."""
    prefill = pool_condition("Prefill", deployments.get("prefill"), troubles.get("prefill"))
    decode = pool_condition("Decode", deployments.get("decode"), troubles.get("decode"))
    router = pool_condition("Router", deployments.get("router"), troubles.get("router"))
    _, prefill_ready, _, _ = deployment_counts(deployments.get("prefill"))
    _, decode_ready, _, _ = deployment_counts(deployments.get("decode"))
    if not kv_services_present:
        kv = Cond("KVTransferReady", "False", "ServicesMissing", "the KV-transfer Services do not exist yet")
    elif prefill_ready and decode_ready and kv_from_traffic and kv_from_traffic.get("reason") in KV_FROM_TRAFFIC:
        kv = Cond("KVTransferReady", str(kv_from_traffic.get("status")), str(kv_from_traffic.get("reason")),
                  str(kv_from_traffic.get("message", "")))
    elif prefill_ready and decode_ready:
        kv = Cond("KVTransferReady", "True", "PeersReady",
                  f"{prefill_ready} prefill and {decode_ready} decode workers ready to exchange KV")
    else:
        kv = Cond("KVTransferReady", "False", "NoPeers", "KV transfer needs at least one ready worker per pool")
    parts = [prefill, decode, router, kv]
    failing = [c for c in parts if c.status != "True" and c.reason != "KVTransferDegraded"]
    if failing:
        first = failing[0]
        ready = Cond("Ready", "False", first.reason, "; ".join(f"{c.type}: {c.message}" for c in failing))
    elif kv.status != "True":
        ready = Cond("Ready", "True", "Serving", f"serving, but the KV path is degraded: {kv.message}")
    else:
        ready = Cond("Ready", "True", "Serving", "prefill, decode, router and KV transfer are ready")
    return [ready, *parts]


def pod_security_condition(spec: InferenceServiceSpec, rdma_reason: str) -> Cond:
    """Which Pod Security level the service's pods meet: informational, it never makes Ready False (a
    namespace that enforces a level shows in the pools' FailedCreate instead)."""
    if spec.kv_transfer.rdma is not None:
        return Cond("PodSecurity", "False", "RDMANeedsIPCLock", rdma_reason)
    return Cond("PodSecurity", "True", "Restricted",
                "engine and router pods meet Pod Security restricted (non-root, no capabilities, no privilege "
                "escalation, RuntimeDefault seccomp)")


def merge_conditions(
    old: list[dict[str, Any]], new: list[Cond], generation: int | None, now: str
) -> list[dict[str, Any]]:
    """New conditions, keeping lastTransitionTime where a condition's status did not change.

    Conditions of other types (e.g. ScalingActive, owned by the autoscaler) are kept as they were.
    The list keeps its order (new types go last), so the reconciler and the autoscaler, each merging
    its own types, produce the same list and never rewrite status just to reorder it.
    """
    by_type = {c.get("type"): c for c in old}
    out: list[dict[str, Any]] = []
    for cond in new:
        previous = by_type.get(cond.type)
        since = now
        if previous is not None and previous.get("status") == cond.status and previous.get("lastTransitionTime"):
            since = previous["lastTransitionTime"]
        out.append({
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": since,
        })
    merged = {c["type"]: c for c in out}
    kept = [merged.pop(c.get("type")) if c.get("type") in merged else c for c in old]
    return kept + list(merged.values())


def invalid_conditions(
    old: list[dict[str, Any]], message: str, generation: int | None, now: str
) -> list[dict[str, Any]]:
    """Ready=False/InvalidSpec; the other conditions keep describing the children that still run."""
    return merge_conditions(old, [Cond("Ready", "False", "InvalidSpec", message)], generation, now)


def pool_status(
    spec: InferenceServiceSpec | None, role: str, deployment: dict[str, Any] | None, old: dict[str, Any] | None
) -> dict[str, Any]:
    desired, ready, _, _ = deployment_counts(deployment)
    status: dict[str, Any] = dict(old or {})
    status["replicas"] = desired
    status["readyReplicas"] = ready
    status["summary"] = f"{ready}/{desired}"
    return status


def endpoint(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc:{port}"


ROUTER_WORKERS = "RouterWorkers"
"""Condition set from the routers' own worker lists (`disagg.runtime.pods.RouterWorkers`), not from the children."""


def router_workers_condition(healthy: Mapping[str, Mapping[str, int]], ready_pods: Mapping[str, int]) -> Cond:
    """Whether every Ready router lists a healthy worker of each role: `healthy` is router pod -> role -> the
    workers it lists as healthy, `ready_pods` role -> the pool's Ready pods (a router that keeps every one of
    them out is the router's doing; with none Ready, PrefillReady or DecodeReady says why)."""
    missing = [(router, role) for router, counts in sorted(healthy.items()) for role in ROLES if not counts.get(role)]
    if not missing:
        return Cond(ROUTER_WORKERS, "True", "WorkersHealthy",
                    f"{len(healthy)} router(s) each list a healthy prefill and decode worker")
    roles = routers_missing_roles(healthy)
    reason = f"NoHealthy{roles[0].capitalize()}" if len(roles) == 1 else "NoHealthyWorkers"
    parts = [f"router {router} lists no healthy {role} worker ({ready_pods.get(role, 0)} {role} pods Ready)"
             for router, role in missing]
    return Cond(ROUTER_WORKERS, "False", reason, "; ".join(parts) + ": requests through it fail")


def routers_missing_roles(healthy: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The roles some router lists no healthy worker of."""
    return [role for role in ROLES if any(not counts.get(role) for counts in healthy.values())]


__all__ = [
    "CONDITION_TYPES",
    "ROLES",
    "ROUTER_WORKERS",
    "Cond",
    "PodTrouble",
    "compute_conditions",
    "endpoint",
    "invalid_conditions",
    "merge_conditions",
    "pod_security_condition",
    "pod_trouble",
    "pool_status",
    "router_workers_condition",
    "routers_missing_roles",
]

