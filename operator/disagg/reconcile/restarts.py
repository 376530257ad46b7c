"""An engine restarted in place is replaced by a new pod before it serves again.

When an engine process dies (a crash, an OOM kill, SIGKILL), the kubelet restarts its container in the same
pod: same IP, same ports, a new engine with a new identity. The pinned engines' KV connectors do not survive
a peer coming back like that: a vLLM decode that pulled from a prefill segfaults in NIXL `loadRemoteMD` on
its first pull from the restarted one (vllm#49238), an SGLang prefill that sent to a decode segfaults in
`add_remote_agent` when the restarted decode registers (smg#2503); and each crashed peer takes its own
requests down with it. A new pod has a new address, which the peers see as a new peer (a fresh handshake).

So, while the restarted engine is still loading (its pod NotReady, out of every router's rotation), its pod
is deleted and its Deployment makes a new one. An engine that is Ready again was missed (the operator was
down): replacing it then would only cut its streams, so it is left alone. Multi-node workers are left to the
LeaderWorkerSet's own restart policy (it recreates the whole group).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disagg.wellknown import LWS_WORKER_INDEX_LABEL, ROLE_LABEL, ROLES, SERVICE_LABEL

ENGINE_CONTAINER = "engine"
"""The engine container's name in a pool's pod template."""


@dataclass(frozen=True)
class Replacement:
    """A pod to delete: its engine restarted in place."""

    namespace: str
    name: str
    uid: str
    service: str
    role: str
    restarts: int
    reason: str
    """Why the container last ended (the kubelet's lastState.terminated.reason), if it says."""

    def message(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.role} worker {self.name}: its engine restarted in place{why}, restart {self.restarts}; "
                "replacing the pod so that its peers meet the new engine at a new address (the KV connectors "
                "of the peers crash on an engine that comes back at the same one)")


def _engine_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == ENGINE_CONTAINER:
            return status  # type: ignore[no-any-return]
    return {}


def _owned_by_replica_set(meta: Mapping[str, Any]) -> bool:
    return any(ref.get("kind") == "ReplicaSet" and ref.get("controller") for ref in meta.get("ownerReferences") or [])


def restarted_engine(pod: Mapping[str, Any]) -> Replacement | None:
    """The replacement `pod` needs: its engine container restarted and is not ready again; else None."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    role = labels.get(ROLE_LABEL)
    if role not in ROLES or meta.get("deletionTimestamp") or LWS_WORKER_INDEX_LABEL in labels:
        return None
    if not _owned_by_replica_set(meta):
        return None
    status = _engine_status(pod)
    restarts = int(status.get("restartCount") or 0)
    if restarts <= 0 or status.get("ready"):
        return None
    terminated = (status.get("lastState") or {}).get("terminated") or {}
    return Replacement(namespace=str(meta.get("namespace") or "default"), name=str(meta.get("name")),
                       uid=str(meta.get("uid") or ""), service=str(labels.get(SERVICE_LABEL) or ""), role=str(role),
                       restarts=restarts, reason=str(terminated.get("reason") or ""))


BURST = 4
"""Replacements per service within `WINDOW_S` at most: an engine that crashes again and again (a bad image, a
model that does not fit) is left to the kubelet's back-off rather than replaced in a loop."""
WINDOW_S = 600.0


class ReplacementBudget:
    """How many replacements each service may still have; time comes from the caller."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S) -> None:
        self.burst, self.window_s = burst, window_s
        self._spent: dict[tuple[str, str], list[float]] = {}

    def take(self, namespace: str, service: str, now: float) -> bool:
        """Whether one more replacement is allowed now (and counts it if so)."""
        recent = [t for t in self._spent.get((namespace, service), []) if now - t < self.window_s]
        allowed = len(recent) < self.burst
        if allowed:
            recent.append(now)
        self._spent[(namespace, service)] = recent
        return allowed
