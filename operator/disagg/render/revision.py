"""Revisions and slots: how pools of two engine versions live side by side without one request meeting both.

A pool's *revision* is a hash of what the engines of both pools run and must agree on to exchange KV: the
container image, command, arguments and environment of the prefill and the decode engine (model, revision,
engine version, KV dtype, parallel layout, connector, block size all end up there). It leaves out what a
worker can change without its peers noticing: resources, tolerations, node selection, affinity, labels,
replicas, and the drain bounds. Every pod carries its revision (`disagg.dev/revision`), and the routers select
the workers of one revision only, so a request never pairs two.

A change of revision does not roll the pools in place: the new revision's pools are created next to the old
ones, in the other *slot* (slot `a` is `<name>-<role>`, slot `b` is `<name>--<role>-b`), the routers switch
to them once both are ready, and the old ones go when no router of the old revision is left
(`reconcile/rollout.py`). A change within a revision rolls the serving slot in place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from disagg import GROUP
from disagg.api.v1alpha1 import CHILD_SEPARATOR

REVISION_LABEL = f"{GROUP}/revision"
SLOT_LABEL = f"{GROUP}/slot"
SERVING_REVISION_ANNOTATION = f"{GROUP}/serving-revision"
"""On the router Deployment: the revision its routers select."""
SLOTS = ("a", "b")
OPERATIONAL_FLAGS = frozenset({"--shutdown-timeout"})
"""Engine flags outside the revision: how a worker leaves, not what it computes."""


def pool_name(service: str, role: str, slot: str) -> str:
    """The Deployment (or LeaderWorkerSet) of one pool in one slot."""
    return f"{service}-{role}" if slot == "a" else f"{service}{CHILD_SEPARATOR}{role}-{slot}"


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


def _without_operational(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in OPERATIONAL_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in OPERATIONAL_FLAGS:
            continue
        out.append(arg)
    return out


def engine_contract(image: str, command: list[str], args: list[str], env: list[dict[str, Any]]) -> dict[str, Any]:
    """What one engine runs, as far as its KV peers depend on it."""
    return {"image": image, "command": command, "args": _without_operational(args), "env": env}


def revision_of(contracts: Mapping[str, Mapping[str, Any]]) -> str:
    """The revision of a service's engines (both roles' contracts)."""
    text = json.dumps({role: contracts[role] for role in sorted(contracts)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Placement:
    """Where the pools of a spec go and which revision the routers serve (reconcile/rollout.py decides;
    `disagg render` prints the first rollout: slot a, routers on the spec's own revision)."""

    slot: str = "a"
    router_revision: str | None = None
    """The revision the routers select (None: the spec's own)."""
    initial_replicas: Mapping[str, int] = field(default_factory=dict)
    """Per role, the replicas a new pool starts with when they are not the spec's (a new revision's pools
    start at the size of the serving ones)."""
