"""Desired vs observed: which children to apply or delete, and what the status says. No I/O here."""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from disagg import GROUP
from disagg.reconcile.diff import contains

APPLIED_HASH_ANNOTATION = f"{GROUP}/applied-hash"
POOL_KINDS = frozenset({"Deployment", "LeaderWorkerSet"})
"""Kinds a pool is (one-node workers, multi-node worker groups); the autoscaler owns their replicas."""

ChildKey = tuple[str, str, str]  # (apiVersion, kind, name)


def child_key(manifest: dict[str, Any]) -> ChildKey:
    return (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])


def stamp(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with a hash of itself, so a later change to the desired state is always seen."""
    stamped = copy.deepcopy(manifest)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    stamped["metadata"].setdefault("annotations", {})[APPLIED_HASH_ANNOTATION] = digest
    return stamped


def pack(value: Any) -> bytes:
    """A JSON value as compressed bytes: caches that hold thousands of objects keep them this way."""
    return zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 1)


def unpack(packed: bytes) -> Any:
    return json.loads(zlib.decompress(packed))


@dataclass
class Plan:
    """What reconcile will do to the children."""

    apply: list[dict[str, Any]] = field(default_factory=list)
    create_scaled: list[dict[str, Any]] = field(default_factory=list)
    """Autoscaled Deployments that don't exist yet: created with their initial replicas."""
    delete: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)


def plan_children(
    desired: list[dict[str, Any]], live: dict[ChildKey, dict[str, Any]], owner_uid: str | None
) -> Plan:
    """Compares the desired children (already stamped) with the live ones owned by this service.

    A child is re-applied when its desired content changed (hash) or when someone changed it by hand
    (a desired field missing or different in the live object). Live children that are ours and no
    longer desired are deleted.
    """
    plan = Plan()
    wanted = {child_key(m) for m in desired}
    for manifest in desired:
        current = live.get(child_key(manifest))
        if current is None:
            if manifest["kind"] in POOL_KINDS and "replicas" not in manifest["spec"]:
                plan.create_scaled.append(manifest)
            plan.apply.append(manifest)
        elif contains(manifest, current):
            plan.unchanged.append(current)
        else:
            plan.apply.append(manifest)
    for key, current in sorted(live.items()):
        if key in wanted:
            continue
        owners = current.get("metadata", {}).get("ownerReferences", [])
        if owner_uid is not None and any(ref.get("uid") == owner_uid for ref in owners):
            plan.delete.append(current)
    return plan
