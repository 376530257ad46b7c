"""Version-safe rollouts: the pools of a new revision next to the serving ones, the routers switched when both
are ready, the old ones deleted once no router selects them. No I/O: reconcile hands in the live children and
applies what this decides.

One level-triggered rule over what is live, with the spec's revision R (render/revision.py), the serving
revision S (the label of the router Deployment: the revision its routers select) and the slots `a`, `b`:

- no pools yet: R in slot a;
- one slot holds pools: when their revision is R (or they carry none, from before revisions) the spec applies
  to them in place (a compatible change); otherwise R's pools are created in the other slot, starting at the
  serving pools' size (within `acceleratorBudget`), while the routers keep selecting S (Starting);
- both slots hold pools: the serving slot is S's. When S is R, the other slot is left over (the old revision
  after a switch, or an abandoned rollout): it is deleted once every router selects R (the router Deployment
  rolled out, no router pod of the old template left, terminating ones included: they still stream from the
  old workers) (Draining). Otherwise the other slot takes the spec (Starting), and once both its pools are
  ready the routers switch to R (Switching): a router Deployment rollout, each router pod selecting one
  revision, so no request meets both.

A pool that changes kind (a Deployment's workers now span nodes as a LeaderWorkerSet, or the reverse) is a new
revision like any other: the serving slot's pools are found whatever their kind, kept while the other kind comes
up in the other slot, and the routers go on selecting them as they are (leaders only for a LeaderWorkerSet) until
they switch.

During a rollout the autoscaler holds both slots (`status.rollout` is set) and scales the serving one after
(`status.<role>.workload`). A rollout that cannot go on (no room in the budget) says why and the routers stay on
S; one whose pods cannot be scheduled says so too (reconcile/run.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.kube.client import DEPLOYMENT, LEADER_WORKER_SET
from disagg.reconcile import ChildKey
from disagg.reconcile.status import deployment_counts, pool_condition
from disagg.render.revision import ANY_REVISION, SLOTS, Placement, other_slot, pool_name
from disagg.wellknown import REVISION_LABEL, ROUTER
from disagg.wellknown import ROLES as _ROLES

ROLES: tuple[str, ...] = _ROLES
ROUTER_KIND = ("apps/v1", "Deployment")
PoolKinds = Mapping[str, tuple[str, str]]
"""Each role's pool (apiVersion, kind): a Deployment, or a LeaderWorkerSet for multi-node workers."""
POOL_KINDS: tuple[tuple[str, str], ...] = (
    (DEPLOYMENT.api_version, DEPLOYMENT.kind), (LEADER_WORKER_SET.api_version, LEADER_WORKER_SET.kind))


@dataclass(frozen=True)
class RolloutPlan:
    """What reconcile renders (placement), keeps and reports."""

    placement: Placement
    serving_slot: str
    serving_revision: str
    """The revision the routers select (what serves)."""
    keep: frozenset[ChildKey] = frozenset()
    """Live pools outside the placement that stay as they are (neither applied nor deleted)."""
    target: str | None = None
    """The revision being rolled out (None: none)."""
    phase: str = "Complete"
    """Complete | Starting | Switching | Draining | Blocked (see RolloutStatus.phase)."""
    message: str = ""
    blocked: str | None = None
    """Why the rollout cannot go on (a CamelCase reason), said in `message`."""
    target_pools: dict[str, ChildKey] = field(default_factory=dict)
    """The new revision's pools, by role, while they come up."""
    serving_kinds: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """The serving pools' kinds where they are not the spec's (a rollout that changes a pool's kind)."""

    def serving_pools(self, kinds: PoolKinds, name: str) -> dict[str, ChildKey]:
        return {role: (*self.serving_kinds.get(role, kinds[role]), pool_name(name, role, self.serving_slot))
                for role in ROLES}


def revision_label(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
    return str(value) if value is not None else None


def _replicas(obj: Mapping[str, Any] | None) -> int:
    return int(((obj or {}).get("spec") or {}).get("replicas", 1))


def _ready(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and pool_condition("Pool", dict(obj), None).status == "True"


def routers_settled(router: Mapping[str, Any] | None, revision: str) -> bool:
    """Every router pod selects `revision`: the Deployment rolled out and no pod of an older template is left,
    terminating ones included (`status.terminatingReplicas`: a terminating router still streams answers from the
    workers it had)."""
    if router is None or revision_label(router) != revision:
        return False
    desired, ready, updated, observed = deployment_counts(dict(router))
    status = router.get("status") or {}
    return (observed and ready >= desired and updated >= desired and int(status.get("replicas", 0)) == desired
            and not int(status.get("terminatingReplicas") or 0))


def budget_replicas(spec: InferenceServiceSpec, serving: Mapping[str, int]) -> tuple[dict[str, int], str | None]:
    """How many workers per role the new revision starts with: the serving pools' sizes (a fixed pool: the
    spec's), an autoscaled pool's shrunk to fit what `acceleratorBudget` leaves next to the serving ones (each at
    least one); why it cannot start, if it cannot."""
    fixed = {role: getattr(spec, role).autoscaling is None for role in ROLES}
    wanted = {role: getattr(spec, role).replicas if fixed[role] else max(1, serving.get(role, 1)) for role in ROLES}
    budget = spec.accelerator_budget
    if budget is None:
        return wanted, None
    per = {role: getattr(spec, role).worker_accelerators for role in ROLES}
    held = sum(serving.get(role, 0) * per[role] for role in ROLES)
    room = budget - held
    floor = sum((wanted[role] if fixed[role] else 1) * per[role] for role in ROLES)
    if room < floor:
        return wanted, (f"acceleratorBudget is {budget}: the serving revision holds {held} accelerators, and the "
                        f"new revision's pools need at least {floor} more next to them")
    need = sum(wanted[role] * per[role] for role in ROLES)
    if need <= room:
        return wanted, None
    spare = room - sum(wanted[role] * per[role] for role in ROLES if fixed[role])
    scaled_need = sum(wanted[role] * per[role] for role in ROLES if not fixed[role])
    scale = spare / scaled_need
    return {role: wanted[role] if fixed[role] else max(1, math.floor(wanted[role] * scale)) for role in ROLES}, None


def plan_rollout(
    name: str, spec: InferenceServiceSpec, revision: str, live: Mapping[ChildKey, Mapping[str, Any]], kinds: PoolKinds,
) -> RolloutPlan:
    """The rollout step toward the spec's `revision`, from the live children."""
    found = {slot: {role: _live_pool(name, role, slot, live, kinds[role]) for role in ROLES} for slot in SLOTS}
    slots = {slot: {role: obj for role, (_, obj) in found[slot].items()} for slot in SLOTS}
    present = [slot for slot in SLOTS if any(slots[slot].values())]
    router = live.get((*ROUTER_KIND, f"{name}-{ROUTER}"))

    def slot_revision(slot: str) -> str | None:
        return next((r for r in (revision_label(obj) for obj in slots[slot].values()) if r is not None), None)

    def keys(slot: str) -> frozenset[ChildKey]:
        return frozenset(key for key, obj in found[slot].values() if obj is not None)

    def other_kinds(slot: str) -> dict[str, tuple[str, str]]:
        return {role: (key[0], key[1]) for role, (key, obj) in found[slot].items()
                if obj is not None and (key[0], key[1]) != tuple(kinds[role])}

    if not present:
        return RolloutPlan(Placement("a"), "a", revision)
    if len(present) == 1:
        serving = present[0]
        current = slot_revision(serving)
        if (current is None or current == revision) and not other_kinds(serving):
            return RolloutPlan(Placement(serving), serving, revision)
        return _start(name, spec, revision, serving, current or "", slots, keys(serving), kinds,
                      other_kinds(serving))
    routed = revision_label(router)
    serving = next((slot for slot in SLOTS if routed is not None and slot_revision(slot) == routed), "a")
    current = slot_revision(serving) or revision
    other = other_slot(serving)
    if current == revision and not other_kinds(serving):
        if routers_settled(router, revision):
            return RolloutPlan(Placement(serving), serving, revision)  # the other slot is not desired: deleted
        return RolloutPlan(Placement(serving), serving, revision, keep=keys(other), target=None, phase="Draining",
                           message=f"the routers moved to revision {revision}; the pools of revision "
                                   f"{slot_revision(other)} go when no router selects them")
    if slot_revision(other) != revision and not routers_settled(router, current):
        # the routers are still moving off the other slot: it takes the new spec once none selects it
        leaders = _router_leaders(kinds, other_kinds(serving))
        return RolloutPlan(Placement(serving, router_revision=current, router_leaders=leaders), serving, current,
                           keep=keys(serving) | keys(other), target=revision, phase="Draining",
                           message=f"revision {revision} waits for the routers of revision {slot_revision(other)} "
                                   "to finish their streams", serving_kinds=other_kinds(serving))
    return _start(name, spec, revision, serving, current, slots, keys(serving), kinds, other_kinds(serving))


def _live_pool(name: str, role: str, slot: str, live: Mapping[ChildKey, Mapping[str, Any]],
               kind: tuple[str, str]) -> tuple[ChildKey, Mapping[str, Any] | None]:
    """A slot's pool of `role`: of the spec's kind, else of the other pool kind (the spec changed it)."""
    for api_version, pool_kind in (tuple(kind), *(k for k in POOL_KINDS if k != tuple(kind))):
        key = (api_version, pool_kind, pool_name(name, role, slot))
        if key in live:
            return key, live[key]
    return (*kind, pool_name(name, role, slot)), None


def _router_leaders(kinds: PoolKinds, serving_kinds: Mapping[str, tuple[str, str]]) -> tuple[str, ...] | None:
    """While a rollout changes a pool's kind, the roles whose serving pools are LeaderWorkerSets (the routers
    select their leaders only until they switch); None otherwise (the spec says)."""
    if not serving_kinds:
        return None
    return tuple(role for role in ROLES if serving_kinds.get(role, kinds[role])[1] == LEADER_WORKER_SET.kind)


def plan_in_place(
    name: str, revision: str, live: Mapping[ChildKey, Mapping[str, Any]], kinds: PoolKinds,
) -> RolloutPlan:
    """`--rollouts in-place`: the spec applies to the pools where they are, the routers select any revision."""
    slot = next((s for s in SLOTS for role in ROLES if (*kinds[role], pool_name(name, role, s)) in live), "a")
    return RolloutPlan(Placement(slot, router_revision=ANY_REVISION), slot, revision)


def _start(name: str, spec: InferenceServiceSpec, revision: str, serving: str, current: str,
           slots: Mapping[str, Mapping[str, Mapping[str, Any] | None]], keep: frozenset[ChildKey],
           kinds: PoolKinds, serving_kinds: Mapping[str, tuple[str, str]]) -> RolloutPlan:
    """Rolling `revision` out next to the serving slot: the target comes up, then the routers switch."""
    target = other_slot(serving)
    sizes = {role: _replicas(slots[serving][role]) for role in ROLES if slots[serving][role]}
    initial, blocked = budget_replicas(spec, sizes)
    target_keys = {role: (*kinds[role], pool_name(name, role, target)) for role in ROLES}
    placement_initial = tuple(sorted(initial.items()))
    leaders = _router_leaders(kinds, serving_kinds)
    if blocked is not None and not any(slots[target].values()):
        return RolloutPlan(Placement(serving, router_revision=current, router_leaders=leaders), serving, current,
                           keep=keep, target=revision, phase="Blocked", blocked="InsufficientBudget",
                           message=f"{blocked}; revision {current} goes on serving", serving_kinds=serving_kinds)
    ready = all(revision_label(slots[target][role]) == revision and _ready(slots[target][role]) for role in ROLES)
    counts = "; ".join(f"{role} {deployment_counts(dict(slots[target][role] or {}))[1]}/"
                       f"{_replicas(slots[target][role]) if slots[target][role] else initial[role]} ready"
                       for role in ROLES)
    if ready:
        return RolloutPlan(Placement(target, router_revision=revision, initial_replicas=placement_initial), serving,
                           current, keep=keep, target=revision, phase="Switching", target_pools=target_keys,
                           message=f"the pools of revision {revision} are ready ({counts}): the routers switch to "
                                   f"them from revision {current}", serving_kinds=serving_kinds)
    return RolloutPlan(Placement(target, router_revision=current, initial_replicas=placement_initial,
                                 router_leaders=leaders), serving, current, keep=keep, target=revision,
                       phase="Starting", target_pools=target_keys, serving_kinds=serving_kinds,
                       message=f"revision {revision} comes up next to revision {current} ({counts}); the routers "
                               f"stay on revision {current} until both pools are ready")
