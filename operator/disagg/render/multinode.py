"""Workers over several nodes as LeaderWorkerSet groups, and placement by network topology. Pure.

A multi-node pool becomes one LeaderWorkerSet (sigs.k8s.io/lws): each replica is a group of `nodes` pods,
a leader (worker index 0, which serves HTTP) and workers. The LWS pod webhook gives every pod of a group
`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE` and `LWS_WORKER_INDEX`; each engine's adapter (`disagg.engines`)
turns them into its own flags through Kubernetes' `$(VAR)` expansion (`EngineAdapter.group`).
"""

from __future__ import annotations

from typing import Any

from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec
from disagg.catalog.accelerators import Accelerator
from disagg.engines.base import (  # the engines' LWS flags (re-exported: tests read them here)
    DIST_PORT as DIST_PORT,
)
from disagg.engines.base import (
    DP_RPC_PORT as DP_RPC_PORT,
)
from disagg.engines.base import (
    DP_SIZE_LOCAL_ENV as DP_SIZE_LOCAL_ENV,
)
from disagg.engines.base import (
    LEADER_ADDRESS as LEADER_ADDRESS,
)
from disagg.engines.base import (
    START_RANK_SCRIPT as START_RANK_SCRIPT,
)
from disagg.engines.base import (
    WORKER_INDEX as WORKER_INDEX,
)
from disagg.engines.base import (
    Group as Group,
)
from disagg.wellknown import ROLE_LABEL, SERVICE_LABEL

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"


def topology_key(spec: InferenceServiceSpec, accelerator: Accelerator | None) -> str | None:
    if spec.topology is not None and spec.topology.key is not None:
        return spec.topology.key
    if accelerator is not None and accelerator.topology_labels:
        return accelerator.topology_labels[0]
    return None


def placement(
    service: str, role: str, spec: InferenceServiceSpec, pool: PoolSpec, accelerator: Accelerator | None,
    user_affinity: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The pool's affinity: the user's, plus packing a group into one domain and pairing decode with prefill."""
    key = topology_key(spec, accelerator)
    topology = spec.topology
    terms: list[tuple[str, dict[str, Any]]] = []  # (Required|Preferred, podAffinityTerm)
    if pool.multi_node and key is not None:
        mode = topology.packing if topology is not None else "Required"
        terms.append((mode, {
            "labelSelector": {"matchLabels": {SERVICE_LABEL: service, ROLE_LABEL: role}},
            # the LWS webhook labels every pod of a group with its group key: the term then selects the
            # pod's own group (the leader, first of its group, satisfies it anywhere)
            "matchLabelKeys": [GROUP_KEY_LABEL],
            "topologyKey": key,
        }))
    if role == "decode" and topology is not None and topology.pairing is not None and key is not None:
        terms.append((topology.pairing, {
            "labelSelector": {"matchLabels": {SERVICE_LABEL: service, ROLE_LABEL: "prefill"}},
            "topologyKey": key,
        }))
    if not terms:
        return user_affinity
    affinity: dict[str, Any] = {k: v for k, v in (user_affinity or {}).items()}
    pod_affinity: dict[str, Any] = dict(affinity.get("podAffinity") or {})
    required = list(pod_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    preferred = list(pod_affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or [])
    for how, term in terms:
        if how == "Required":
            required.append(term)
        else:
            preferred.append({"weight": 100, "podAffinityTerm": term})
    if required:
        pod_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    if preferred:
        pod_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    affinity["podAffinity"] = pod_affinity
    return affinity
