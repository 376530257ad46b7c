"""Revisions and slots: how the pools of two engine versions stand side by side without one request meeting both.

A service's *revision* is a hash of what the engines of both pools run and must agree on to hand KV over: each
engine container's image, command, arguments and environment (model, model revision, engine version, KV dtype,
parallel layout, connector and block size all end up there). It leaves out what a worker can change without its
peers noticing: resources, tolerations, node selection, affinity, labels, replicas, and how a worker leaves
(the drain flags, `OPERATIONAL_FLAGS`). Every pool and its pods carry their revision (`disagg.dev/revision`),
and the routers select the workers of one revision only, so no request pairs two.

A change of revision does not roll the pools in place: the new revision's pools are created in the other
*slot* (slot `a` is `<name>-<role>`, slot `b` is `<name>--<role>-b`), the routers switch to them once both are
ready, and the old ones go when no router of the old revision is left (`reconcile/rollout.py`). A change
within a revision rolls the serving slot in place.

Rendering stays as it is (`render/context.py` and the templates know nothing of slots): `place` rewrites the
rendered pools and router for a slot and a router revision.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from disagg.api.v1alpha1 import CHILD_SEPARATOR
from disagg.wellknown import (
    INITIAL_REPLICAS_ANNOTATION,
    LWS_WORKER_INDEX_LABEL,
    REVISION_LABEL,
    ROLE_LABEL,
    ROLES,
    ROUTER,
    SLOT_LABEL,
)

SLOTS = ("a", "b")
ANY_REVISION = "*"
"""A router revision: routers that select workers of any revision (`disagg run --rollouts in-place`)."""
POOL_KINDS = frozenset({"Deployment", "LeaderWorkerSet"})
OPERATIONAL_FLAGS = frozenset({"--shutdown-timeout"})
"""Engine flags outside the revision: how a worker leaves, not what it computes."""
ROUTER_SELECTOR_FLAGS = ("--prefill-selector", "--decode-selector")


def pool_name(service: str, role: str, slot: str) -> str:
    """The Deployment (or LeaderWorkerSet) of one pool in one slot."""
    return f"{service}-{role}" if slot == "a" else f"{service}{CHILD_SEPARATOR}{role}-{slot}"


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class Placement:
    """Where a spec's pools go and which revision the routers select (reconcile/rollout.py decides; `disagg
    render` prints a first rollout: slot a, the routers on the spec's own revision)."""

    slot: str = "a"
    router_revision: str | None = None
    """The revision the routers select (None: the spec's own; ANY_REVISION: any)."""
    initial_replicas: tuple[tuple[str, int], ...] = ()
    """(role, replicas) a new autoscaled pool starts with when not the spec's: a new revision's pools start at
    the size of the serving ones."""
    router_leaders: tuple[str, ...] | None = None
    """The roles whose routed pools are LeaderWorkerSets, the routers selecting their leaders only (None: as the
    spec says; the serving pools' kinds while a rollout changes a pool's kind)."""


def _without_operational(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in OPERATIONAL_FLAGS:
            skip = True  # its value too
        elif arg.split("=", 1)[0] not in OPERATIONAL_FLAGS:
            out.append(arg)
    return out


def _pod_templates(pool: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """A pool's pod templates: a Deployment's one, a LeaderWorkerSet's leader and worker templates."""
    spec = pool.get("spec") or {}
    if "template" in spec:
        yield spec["template"]
    lws = spec.get("leaderWorkerTemplate") or {}
    for key in ("leaderTemplate", "workerTemplate"):
        if key in lws:
            yield lws[key]


def engine_contract(pool: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a pool's engines run, as far as their KV peers depend on it (every container of every template)."""
    return [
        {"image": c.get("image"), "command": c.get("command") or [], "args": _without_operational(c.get("args") or []),
         "env": c.get("env") or []}
        for template in _pod_templates(pool) for c in (template.get("spec") or {}).get("containers") or []
    ]


def _role(manifest: Mapping[str, Any]) -> str | None:
    return ((manifest.get("metadata") or {}).get("labels") or {}).get(ROLE_LABEL)


def _pools(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(_role(d)): d for d in docs if d.get("kind") in POOL_KINDS and _role(d) in ROLES}


def revision_of(docs: list[dict[str, Any]]) -> str:
    """The revision of a service's rendered children: a hash of both pools' engine contracts."""
    contracts = {role: engine_contract(pool) for role, pool in sorted(_pools(docs).items())}
    text = json.dumps(contracts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _pin_selector(args: list[str], revision: str, leaders: tuple[str, ...] | None) -> list[str]:
    """The router's arguments with the revision added to each worker selector (a flag's values run to the next
    flag), and with `leaders`, the leader label on exactly those roles' selectors."""
    out: list[str] = []
    selector: str | None = None
    leader = f"{LWS_WORKER_INDEX_LABEL}=0"

    def close(flag: str) -> None:
        if leaders is not None and flag.removeprefix("--").removesuffix("-selector") in leaders:
            out.append(leader)
        out.append(f"{REVISION_LABEL}={revision}")

    for arg in args:
        if selector is not None and arg.startswith("--"):
            close(selector)
            selector = None
        if not (selector is not None and leaders is not None and arg == leader):
            out.append(arg)
        if arg in ROUTER_SELECTOR_FLAGS:
            selector = arg
    if selector is not None:
        close(selector)
    return out


def place(service: str, docs: list[dict[str, Any]], placement: Placement) -> list[dict[str, Any]]:
    """The rendered children (not changed) as `placement` puts them: the pools in its slot with their revision
    label, the routers selecting the workers of `placement.router_revision` (or the pools' own). With
    ANY_REVISION nothing carries a revision, as before revisions: a revision label on the pods would roll both pools
    whenever one pool's engine changes."""
    revision = revision_of(docs)
    revision_labels = {} if placement.router_revision == ANY_REVISION else {REVISION_LABEL: revision}
    router_revision = placement.router_revision or revision
    initial = dict(placement.initial_replicas)
    placed = copy.deepcopy(docs)
    for doc in placed:
        meta = doc["metadata"]
        role = _role(doc)
        if doc.get("kind") in POOL_KINDS and role in ROLES:
            slot_labels = {} if placement.slot == "a" else {SLOT_LABEL: placement.slot}
            meta["name"] = pool_name(service, role, placement.slot)
            meta["labels"] = {**meta.get("labels", {}), **revision_labels, **slot_labels}
            if role in initial and "replicas" not in doc["spec"]:
                meta.setdefault("annotations", {})[INITIAL_REPLICAS_ANNOTATION] = str(initial[role])
            if "selector" in doc["spec"]:
                # slot a keeps the selector its Deployment always had (a selector cannot change); b adds its slot
                doc["spec"]["selector"]["matchLabels"] = {**doc["spec"]["selector"]["matchLabels"], **slot_labels}
            for template in _pod_templates(doc):
                tmeta = template.setdefault("metadata", {})
                tmeta["labels"] = {**tmeta.get("labels", {}), **revision_labels, **slot_labels}
        elif doc.get("kind") == "Deployment" and role == ROUTER and router_revision != ANY_REVISION:
            meta["labels"] = {**meta.get("labels", {}), REVISION_LABEL: router_revision}
            template = doc["spec"]["template"]
            template["metadata"]["labels"] = {**template["metadata"].get("labels", {}), REVISION_LABEL: router_revision}
            for container in template["spec"]["containers"]:
                container["args"] = _pin_selector(container.get("args") or [], router_revision,
                                                  placement.router_leaders)
    return placed
