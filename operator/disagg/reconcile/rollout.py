"""Version-safe rollouts: pools of a new revision next to the serving ones, the routers switched when both are
ready, the old ones removed once no router serves them. No I/O: reconcile gives the live children (and, when
asked, the revisions of the live router pods) and applies what this decides.

One level-triggered rule over what is live, with the spec's revision D (render/revision.py):

- one slot (`a` or `b`) holds the pools: when their revision is D (or they carry none, from before revisions)
  the spec applies to them in place; otherwise the pools of D are created in the other slot, starting at the
  serving pools' size (within `acceleratorBudget`), while the routers keep selecting the serving revision;
- both slots hold pools: the serving slot is the one whose revision the routers select (the router
  Deployment's `disagg.dev/serving-revision`). If that is D, the other slot is left over (the old revision
  after a switch, or an abandoned rollout): it goes once the routers are all on D (the router Deployment
  rolled out, no router pod terminating: their streams still use the old workers). Otherwise the other slot
  takes the spec, and when both its pools are ready the routers switch to D (a router rollout: each router
  pod serves one revision, so no request meets both).

During a rollout the autoscaler holds both slots (`status.rollout` is set). A rollout that cannot go on (no
room in the budget, pods the scheduler cannot place) says why and the routers stay on the serving revision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from disagg.api.v1alpha1 import ROLES as _API_ROLES
from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.reconcile import ChildKey
from disagg.reconcile.status import deployment_counts, pool_condition
from disagg.render.revision import REVISION_LABEL, SERVING_REVISION_ANNOTATION, SLOTS, Placement, other_slot, pool_name

ROUTER_API = ("apps/v1", "Deployment")
ROLES: tuple[str, ...] = tuple(_API_ROLES)


@dataclass(frozen=True)
class RolloutPlan:
    """What reconcile renders, keeps and reports."""

    placement: Placement
    serving_slot: str
    serving_revision: str
    """The revision the routers select (what serves)."""
    keep: frozenset[ChildKey] = frozenset()
    """Live pools of the other slot that stay as they are (not applied, not deleted)."""
    target: str | None = None
    """The revision being rolled out (None: none)."""
    phase: str = "Complete"
    """Complete | Starting (the new pools come up) | Switching (the routers move) | Draining (the old routers
    finish their streams) | Blocked."""
    message: str = ""
    blocked: str | None = None
    """Why the rollout cannot go on (a CamelCase reason), with `message`."""
    target_pools: dict[str, ChildKey] = field(default_factory=dict)

    def serving_pools(self, kinds: Mapping[str, tuple[str, str]], name: str) -> dict[str, ChildKey]:
        return {role: (*kinds[role], pool_name(name, role, self.serving_slot)) for role in ROLES}


def _revision(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    return ((obj.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)


def _serving_revision(router: Mapping[str, Any] | None) -> str | None:
    if router is None:
        return None
    return ((router.get("metadata") or {}).get("annotations") or {}).get(SERVING_REVISION_ANNOTATION)


def _replicas(obj: Mapping[str, Any] | None) -> int:
    return int(((obj or {}).get("spec") or {}).get("replicas", 1))


def _ready(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and pool_condition("Pool", dict(obj), None).status == "True"


def routers_settled(router: Mapping[str, Any] | None, revision: str) -> bool:
    """Every router pod serves `revision`: the Deployment rolled out and no pod of an older template is left,
    terminating ones included (`status.terminatingReplicas`, Kubernetes 1.35+: a terminating router still
    streams answers from the workers it had)."""
    if router is None or _serving_revision(router) != revision:
        return False
    desired, ready, updated, observed = deployment_counts(dict(router))
    status = router.get("status") or {}
    return (observed and ready >= desired and updated >= desired and int(status.get("replicas", 0)) == desired
            and not int(status.get("terminatingReplicas") or 0))


def budget_replicas(spec: InferenceServiceSpec, serving: Mapping[str, int]) -> tuple[dict[str, int], str | None]:
    """How many workers per role the new revision starts with: the serving pools' sizes, shrunk to fit what
    `acceleratorBudget` leaves next to them (each at least one); why it cannot start, if it cannot."""
    wanted = {role: max(1, serving.get(role, 1)) for role in ROLES}
    budget = spec.accelerator_budget
    if budget is None:
        return wanted, None
    per = {role: getattr(spec, role).worker_accelerators for role in ROLES}
    held = sum(serving.get(role, 0) * per[role] for role in ROLES)
    room = budget - held
    if room < sum(per.values()):
        return wanted, (f"acceleratorBudget is {budget}: the serving revision holds {held} accelerators, and one "
                        f"prefill and one decode worker of the new revision need {sum(per.values())} more")
    need = sum(wanted[role] * per[role] for role in ROLES)
    if need <= room:
        return wanted, None
    scale = room / need
    fitted = {role: max(1, math.floor(wanted[role] * scale)) for role in ROLES}
    return fitted, None


def plan_rollout(
    name: str,
    spec: InferenceServiceSpec,
    revision: str,
    live: Mapping[ChildKey, Mapping[str, Any]],
    kinds: Mapping[str, tuple[str, str]],
) -> RolloutPlan:
    """The rollout step for the spec's `revision`; `kinds` is each role's pool (apiVersion, kind)."""
    slots = {slot: {role: live.get((*kinds[role], pool_name(name, role, slot))) for role in ROLES} for slot in SLOTS}
    present = [slot for slot in SLOTS if any(slots[slot].values())]
    router = live.get((*ROUTER_API, f"{name}-router"))

    def slot_revision(slot: str) -> str | None:
        return next((r for r in (_revision(obj) for obj in slots[slot].values()) if r is not None), None)

    def keys(slot: str) -> frozenset[ChildKey]:
        return frozenset((*kinds[role], pool_name(name, role, slot)) for role in ROLES if slots[slot][role])

    if not present:
        return RolloutPlan(Placement("a"), "a", revision)
    if len(present) == 1:
        serving = present[0]
        current = slot_revision(serving)
        if current in (None, revision):
            return RolloutPlan(Placement(serving), serving, revision)
        return _start(name, spec, revision, serving, current, slots, keys, kinds, live)
    routed = _serving_revision(router)
    serving = next((slot for slot in SLOTS if slot_revision(slot) == routed), "a")
    current = slot_revision(serving) or revision
    other = other_slot(serving)
    if revision == current:
        if routers_settled(router, revision):
            return RolloutPlan(Placement(serving), serving, revision)  # the other slot is not desired: it goes
        return RolloutPlan(Placement(serving), serving, revision, keep=keys(other), target=None, phase="Draining",
                           message=f"the routers moved to revision {revision}; the pools of revision "
                                   f"{slot_revision(other)} go when no router serves them")
    return _start(name, spec, revision, serving, current, slots, keys, kinds, live)


def _start(name: str, spec: InferenceServiceSpec, revision: str, serving: str, current: str,
           slots: Mapping[str, Mapping[str, Mapping[str, Any] | None]], keys: Callable[[str], frozenset[ChildKey]],
           kinds: Mapping[str, tuple[str, str]], live: Mapping[ChildKey, Mapping[str, Any]]) -> RolloutPlan:
    """Rolling `revision` out next to the serving slot: the target comes up, then the routers switch."""
    target = other_slot(serving)
    sizes = {role: _replicas(slots[serving][role]) for role in ROLES if slots[serving][role]}
    initial, blocked = budget_replicas(spec, sizes)
    target_keys = {role: (*kinds[role], pool_name(name, role, target)) for role in ROLES}
    if blocked is not None and not any(slots[target].values()):
        return RolloutPlan(Placement(serving, router_revision=current), serving, current, keep=keys(serving),
                           target=revision, phase="Blocked", message=blocked, blocked="InsufficientBudget")
    ready = all(_revision(slots[target][role]) == revision and _ready(slots[target][role]) for role in ROLES)
    counts = "; ".join(f"{role} {deployment_counts(dict(slots[target][role] or {}))[1]}/"
                       f"{_replicas(slots[target][role]) if slots[target][role] else initial[role]} ready"
                       for role in ROLES)
    if ready:
        return RolloutPlan(Placement(target, router_revision=revision, initial_replicas=initial), serving, current,
                           keep=keys(serving), target=revision, phase="Switching", target_pools=target_keys,
                           message=f"the pools of revision {revision} are ready ({counts}): the routers switch to "
                                   f"them from revision {current}")
    return RolloutPlan(Placement(target, router_revision=current, initial_replicas=initial), serving, current,
                       keep=keys(serving), target=revision, phase="Starting", target_pools=target_keys,
                       message=f"revision {revision} comes up next to revision {current} ({counts}); the routers "
                               f"stay on revision {current} until both pools are ready")
