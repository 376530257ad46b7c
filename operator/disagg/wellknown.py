"""Names every layer shares: the pool roles, the labels and annotations on the operator's objects, its
field managers. The bottom of the import layers, so nothing else defines or copies them."""

from __future__ import annotations

from typing import Literal

from disagg import GROUP

Role = Literal["prefill", "decode"]
"""A pool of engine workers: prefill builds the KV cache from the prompt, decode generates from it."""
ROLES: tuple[Role, Role] = ("prefill", "decode")
ROUTER = "router"
"""The component value of the router's objects (it is no pool)."""

MANAGED_BY = "disagg"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
"""A label selector of every object the operator creates."""
SERVICE_LABEL = f"{GROUP}/service"
"""The InferenceService an object belongs to (its name; the namespace is the object's)."""
ROLE_LABEL = f"{GROUP}/role"
"""prefill, decode or router."""
REVISION_LABEL = f"{GROUP}/revision"
"""On a pool and its pods: the revision of what the engines run (render/revision.py); on the router Deployment
and its pods: the revision of the workers they select."""
SLOT_LABEL = f"{GROUP}/slot"
"""On the pools of slot b of a rollout (and in their selector); slot a's carry none (render/revision.py)."""

INITIAL_REPLICAS_ANNOTATION = f"{GROUP}/initial-replicas"
"""On an autoscaled pool: the replicas it is created with (the autoscaler owns the field afterwards)."""
APPLIED_HASH_ANNOTATION = f"{GROUP}/applied-hash"
"""A hash of the manifest last applied, so a change of the desired state is always seen."""
AUTOSCALED_ANNOTATION = f"{GROUP}/autoscaled"
"""On an autoscaled pool: "true"."""
POD_SECURITY_ANNOTATION = f"{GROUP}/pod-security"
"""Why a pool's pods need more than Pod Security `restricted`, where they do."""
LEGACY_FINALIZER = f"{GROUP}/finalizer"
"""Put on services by an earlier version's kopf timers; removed on sight."""

LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
"""A multi-node worker's pod's index in its group (0: the leader, which serves HTTP and metrics)."""

FIELD_MANAGER = "disagg"
"""The server-side apply field manager of everything reconcile writes."""
AUTOSCALER_FIELD_MANAGER = "disagg-autoscaler"
"""The field manager of the autoscaled pools' spec.replicas (reconcile never writes that field)."""
