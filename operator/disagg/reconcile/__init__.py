"""Desired vs observed: which children to apply or delete, and what the status says. No I/O here."""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from disagg.reconcile.diff import contains
from disagg.wellknown import APPLIED_HASH_ANNOTATION

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


def owned_by(obj: dict[str, Any], owner_uid: str | None) -> bool:
    """Whether `obj` has an owner reference to the InferenceService with this uid."""
    owners = obj.get("metadata", {}).get("ownerReferences") or []
    return owner_uid is not None and any(ref.get("uid") == owner_uid for ref in owners)


@dataclass
class Plan:
    """What reconcile will do to the children."""

    create: list[dict[str, Any]] = field(default_factory=list)
    """Desired children no object of this service has the name of: created, never applied over."""
    apply: list[dict[str, Any]] = field(default_factory=list)
    """Children this service owns whose live content differs from the desired."""
    create_scaled: list[dict[str, Any]] = field(default_factory=list)
    """Autoscaled Deployments that don't exist yet: created with their initial replicas."""
    delete: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    """Live objects with a desired child's name that this service does not own: left untouched."""


def plan_children(
    desired: list[dict[str, Any]], live: dict[ChildKey, dict[str, Any]], owner_uid: str | None,
    keep: frozenset[ChildKey] = frozenset(),
) -> Plan:
    """Compares the desired children (already stamped) with the live ones labelled for this service.

    A missing child is created. A child this service owns is re-applied when its desired content
    changed (hash) or when someone changed it by hand (a desired field missing or different in the
    live object); one it does not own is a conflict. Live children that are ours and no longer
    desired are deleted, but those in `keep` (a rollout's serving pools) stay as they are.
    """
    plan = Plan()
    wanted = {child_key(m) for m in desired}
    for manifest in desired:
        current = live.get(child_key(manifest))
        if current is None:
            if manifest["kind"] in POOL_KINDS and "replicas" not in manifest["spec"]:
                plan.create_scaled.append(manifest)
            plan.create.append(manifest)
        elif not owned_by(current, owner_uid):
            plan.conflicts.append(current)
        elif contains(manifest, current):
            plan.unchanged.append(current)
        else:
            plan.apply.append(manifest)
    for key, current in sorted(live.items()):
        if key not in wanted and key not in keep and owned_by(current, owner_uid):
            plan.delete.append(current)
    return plan
