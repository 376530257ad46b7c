"""One level-triggered reconcile of one InferenceService: the same code for create, update, resume
and periodic resync. It recomputes the whole desired state, applies only what differs, deletes what
is no longer desired, and writes status only when it changed.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from disagg.api.v1alpha1 import InferenceServiceSpec, NetworkPolicyPeer
from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.kube.client import (
    CHILD_KINDS,
    DEPLOYMENT,
    INFERENCE_SERVICE,
    LEADER_WORKER_SET,
    POD,
    ApiError,
    Kube,
    kind_of,
)
from disagg.reconcile import POOL_KINDS, ChildKey, Plan, child_key, owned_by, pack, plan_children, stamp, unpack
from disagg.reconcile.diff import contains
from disagg.reconcile.rollout import PoolKinds, RolloutPlan, plan_in_place, plan_rollout
from disagg.reconcile.status import (
    Cond,
    PodTrouble,
    compute_conditions,
    deployment_counts,
    endpoint,
    invalid_conditions,
    merge_conditions,
    pod_security_condition,
    pod_trouble,
    pool_status,
)
from disagg.render import Owner, Placement, place, render_unplaced, revision_of
from disagg.render.context import DEFAULT_METRICS_SCRAPERS, RDMA_POD_SECURITY, kv_service_name
from disagg.wellknown import (
    AUTOSCALED_ANNOTATION,
    AUTOSCALER_FIELD_MANAGER,
    FIELD_MANAGER,
    INITIAL_REPLICAS_ANNOTATION,
    LEGACY_FINALIZER,
    MANAGED_SELECTOR,
    ROLE_LABEL,
    ROLES,
    ROUTER,
    SERVICE_LABEL,
    SLOT_LABEL,
)

log = logging.getLogger(__name__)

LWS_UNAVAILABLE = "LeaderWorkerSetUnavailable"
DEFAULT_REPLICAS = 1
"""What the API server sets a Deployment's spec.replicas to when the manifest has none."""

# (object, event type, reason, message)
EventRecorder = Callable[[dict[str, Any], str, str, str], None]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Reconciler:
    """Everything reconcile needs from outside, passed in explicitly (tests swap any of it)."""

    kube: Kube
    catalog: AcceleratorCatalog
    record_event: EventRecorder
    clock: Callable[[], datetime.datetime] = utcnow
    live_children: Callable[[str, str], dict[ChildKey, dict[str, Any]]] | None = None
    """Where the children come from: a watch cache if given, else LIST requests."""
    pod_check_interval_s: float = 10.0
    """How often (at most) a not-ready pool's pods are listed to explain why."""
    lws_available: Callable[[], bool] = lambda: False
    """Whether the API server serves LeaderWorkerSets (their CRD is installed): multi-node pools need them
    (the operator asks discovery; without an answer, a cluster without them is assumed)."""
    lws_reason: Callable[[], str] = lambda: "the API server does not serve them"
    """Why LeaderWorkerSets cannot be used, and what would fix it."""
    lws_listed: Callable[[], bool] = lambda: True
    """Whether the children cache holds the LeaderWorkerSets already (their watch has listed)."""
    metrics_scrapers: tuple[NetworkPolicyPeer, ...] = DEFAULT_METRICS_SCRAPERS
    """Who may scrape the engines of a service whose spec names no one (`--metrics-scrapers`)."""
    versioned_rollouts: bool = True
    """False: every change rolls the pools in place, the routers select any revision (`--rollouts in-place`)."""
    applier: Executor | None = None
    """Threads that apply the children of one service concurrently (None: one after another). A
    Service with a cluster IP can take ~0.3 s to create (the API server allocates the IPs one at a
    time); applied in turn, a new service's 13 children waited for it."""
    _pods_checked: dict[tuple[str, str], float] = field(default_factory=dict)
    _rollout_troubles: dict[tuple[str, str], PodTrouble] = field(default_factory=dict)
    _rendered: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    """By service uid: (generation, its revision, the children before `place`)."""
    _desired: dict[str, tuple[int, Placement, bytes]] = field(default_factory=dict)
    """Rendered children by service uid, for the generation they were rendered from: the spec only
    changes with the generation, so the other reconciles (status, resync) never render again. Kept as
    compressed JSON (~2 KiB a service instead of ~100 KiB of dicts) and decoded per reconcile, which
    also hands every reconcile its own copy."""
    _failures: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    """The last failure of each service (by uid) whose traceback was logged: a failure that repeats
    on every resync is logged in one line after the first."""

    def _render(self, owner: Owner, generation: int | None, spec: InferenceServiceSpec) -> tuple[str, list[Any]]:
        cached = self._rendered.get(owner.uid or "") if owner.uid else None
        if cached is not None and generation is not None and cached[0] == generation:
            return cached[1], list(unpack(cached[2]))
        children = render_unplaced(owner, spec, self.catalog, self.metrics_scrapers)
        revision = revision_of(children)
        if owner.uid and generation is not None:
            self._rendered[owner.uid] = (generation, revision, pack(children))
        return revision, children

    def revision(self, owner: Owner, generation: int | None, spec: InferenceServiceSpec) -> str:
        """The revision of what the spec's engines run (render/revision.py); cached: no decoding per reconcile."""
        cached = self._rendered.get(owner.uid or "") if owner.uid else None
        if cached is not None and generation is not None and cached[0] == generation:
            return cached[1]
        return self._render(owner, generation, spec)[0]

    def desired_children(
        self, owner: Owner, generation: int | None, spec: InferenceServiceSpec, placement: Placement | None = None
    ) -> list[dict[str, Any]]:
        placement = placement or Placement()
        cached = self._desired.get(owner.uid or "") if owner.uid else None
        if cached is not None and generation is not None and cached[:2] == (generation, placement):
            children: list[dict[str, Any]] = unpack(cached[2])
            return children
        desired = [stamp(m) for m in place(owner.name, self._render(owner, generation, spec)[1], placement)]
        if owner.uid and generation is not None:
            self._desired[owner.uid] = (generation, placement, pack(desired))
        return desired

    def forget(self, uid: str | None) -> None:
        self._desired.pop(uid or "", None)
        self._rendered.pop(uid or "", None)
        self._failures.pop(uid or "", None)


@dataclass
class Outcome:
    """What one reconcile did (for logs, metrics and tests)."""

    applied: list[ChildKey] = field(default_factory=list)
    deleted: list[ChildKey] = field(default_factory=list)
    status_written: bool = False
    status_object: dict[str, Any] | None = None
    """The service as the status write left it (newer than any watch event seen so far)."""
    invalid: str | None = None
    conflicts: list[ChildConflict] = field(default_factory=list)
    """Children whose names other objects hold: left untouched, the service Ready=False ChildConflict."""
    failed: str | None = None
    """Why the reconcile stopped (an exception), as the ReconcileError condition says it."""
    failed_status: int | None = None
    """The API server's HTTP status when that was a failed request."""


CONFLICT_RETRY_S = 30.0
"""A service with a ChildConflict is reconciled again this long after (the object in the way may go
without any event the operator watches: it need not carry the operator's labels)."""


@dataclass(frozen=True)
class ChildConflict:
    """A desired child whose name an object this InferenceService does not own already has."""

    kind: str
    name: str
    holder: str
    """Who owns the object in the way, as a user would look for it."""

    def __str__(self) -> str:
        return (f"{self.kind}/{self.name} already exists and is not owned by this InferenceService "
                f"({self.holder}); it was left untouched: delete or rename it, or rename this InferenceService")


def conflict_with(obj: dict[str, Any]) -> ChildConflict:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    controller = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if controller is not None:
        holder = f"its owner is {controller.get('kind')}/{controller.get('name')} (uid {controller.get('uid')})"
    else:
        holder = "it has no owner"
    return ChildConflict(str(obj.get("kind")), str(obj.get("metadata", {}).get("name")), holder)


def selector_for(name: str) -> str:
    return f"{SERVICE_LABEL}={name},{MANAGED_SELECTOR}"


def live_children(
    kube: Kube, namespace: str, name: str, with_lws: bool = False
) -> dict[ChildKey, dict[str, Any]]:
    children: dict[ChildKey, dict[str, Any]] = {}
    for kind in (*CHILD_KINDS, LEADER_WORKER_SET) if with_lws else CHILD_KINDS:
        for item in kube.list(kind, namespace, selector_for(name)):
            children[child_key(item)] = item
    return children


def _owns_replicas(deployment: dict[str, Any], manager: str | None, but_a_create: bool = False) -> bool:
    """Whether `manager` (None: any manager) owns the pool's spec.replicas. With `but_a_create`, not
    counting the operator's own create: the API server credits the creator with the replicas it
    defaults (an autoscaled pool is created without them), which are still the default."""
    for entry in deployment.get("metadata", {}).get("managedFields", []) or []:
        if manager is not None and entry.get("manager") != manager:
            continue
        if but_a_create and (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (
                FIELD_MANAGER, "Update", None):
            continue
        if "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reconcile_service(ctx: Reconciler, body: dict[str, Any]) -> Outcome:
    """Brings one InferenceService's children and status to what its spec says. Whatever goes wrong
    (a bug, an API error) ends as Ready=False reason ReconcileError with the message, and an Event."""
    try:
        outcome = _reconcile(ctx, body)
    except Exception as error:
        return _report_failure(ctx, body, error)
    ctx._failures.pop((body.get("metadata") or {}).get("uid") or "", None)
    return outcome


MAX_MESSAGE = 2048
"""Longest failure message kept in a condition (an API server's refusal can quote a whole object)."""


def _report_failure(ctx: Reconciler, body: dict[str, Any], error: Exception) -> Outcome:
    """Ready=False/ReconcileError with the error's message, a Warning Event when that is news, and the
    traceback of an unexpected error in the log once per service, generation and message (a resync
    that fails the same way logs one line)."""
    meta = body.get("metadata") or {}
    name, namespace, uid = meta.get("name", ""), meta.get("namespace", ""), meta.get("uid") or ""
    generation = meta.get("generation")
    message = str(error) if isinstance(error, ApiError) else f"{type(error).__name__}: {error}"
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    outcome = Outcome(failed=message, failed_status=error.status if isinstance(error, ApiError) else None)
    if isinstance(error, ApiError):  # its message is all there is to say: no traceback
        log.warning("reconcile of %s/%s failed: %s", namespace, name, message)
    elif ctx._failures.get(uid) != (generation, message):
        ctx._failures[uid] = (generation, message)
        log.error("reconcile of %s/%s failed: %s", namespace, name, message, exc_info=error)
    else:
        log.warning("reconcile of %s/%s failed again: %s", namespace, name, message)
    old_status: dict[str, Any] = dict(body.get("status") or {})
    conditions = merge_conditions(
        old_status.get("conditions", []), [Cond("Ready", "False", "ReconcileError", message)], generation,
        _timestamp(ctx.clock()),
    )
    new_status = {**old_status, "conditions": conditions}
    if not _status_differs(old_status, new_status):
        return outcome
    try:
        outcome.status_object = ctx.kube.patch_status(namespace, name, new_status)
        outcome.status_written = True
    except ApiError as status_error:  # the API server is gone or refuses: the log is all there is
        log.warning("status of %s/%s not written: %s", namespace, name, status_error)
        return outcome
    if _ready_reason(old_status) != ("ReconcileError", message):
        ctx.record_event(body, "Warning", "ReconcileError", message)
    return outcome


def _reconcile(ctx: Reconciler, body: dict[str, Any]) -> Outcome:
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta.get("uid")
    old_status: dict[str, Any] = dict(body.get("status") or {})
    outcome = Outcome()
    now = _timestamp(ctx.clock())
    _drop_legacy_finalizer(ctx, meta)
    if meta.get("deletionTimestamp"):
        return outcome  # the garbage collector removes the children through their owner references

    try:
        spec = validate_service(body, ctx.catalog)
    except InvalidSpec as error:
        # Nothing running is touched: only the status says what is wrong.
        outcome.invalid = str(error)
        conditions = invalid_conditions(old_status.get("conditions", []), str(error), meta.get("generation"), now)
        return _hold(ctx, body, old_status, conditions, "InvalidSpec", str(error), outcome)

    multi_node = [role for role in ROLES if getattr(spec, role).multi_node]
    if multi_node and not ctx.lws_available():
        # Nothing is created or changed: only the status says what the cluster lacks.
        message = (f"the {' and '.join(multi_node)} workers span several nodes, which needs LeaderWorkerSets "
                   f"(leaderworkerset.x-k8s.io/v1), and {ctx.lws_reason()}; or make each worker fit one node "
                   "(parallelism and nodes)")
        outcome.invalid = message
        conditions = merge_conditions(old_status.get("conditions", []),
                                      [Cond("Ready", "False", LWS_UNAVAILABLE, message)], meta.get("generation"), now)
        return _hold(ctx, body, old_status, conditions, LWS_UNAVAILABLE, message, outcome)
    if multi_node and not ctx.lws_listed():
        return outcome  # the LeaderWorkerSet watch is still listing: a later reconcile sees them

    lister = ctx.live_children or partial(live_children, ctx.kube, with_lws=ctx.lws_available())
    live = lister(namespace, name)
    owner = Owner(name, namespace, uid)
    kinds: PoolKinds = {
        role: ((LEADER_WORKER_SET.api_version, LEADER_WORKER_SET.kind) if getattr(spec, role).multi_node
               else (DEPLOYMENT.api_version, DEPLOYMENT.kind)) for role in ROLES}
    revision = ctx.revision(owner, meta.get("generation"), spec)
    rollout = (plan_rollout(name, spec, revision, live, kinds) if ctx.versioned_rollouts
               else plan_in_place(name, revision, live, kinds))
    desired = ctx.desired_children(owner, meta.get("generation"), spec, rollout.placement)
    plan = plan_children(desired, live, uid, keep=rollout.keep)
    scaled = _hand_over_replicas(ctx, desired, live, plan, uid)

    results: dict[ChildKey, dict[str, Any]] = {child_key(obj): obj for obj in plan.unchanged}
    results.update((key, live[key]) for key in rollout.keep if key in live)
    results.update((k, v) for k, v in scaled.items() if k in results)
    outcome.conflicts = [conflict_with(obj) for obj in plan.conflicts]
    refused = _write_plan(ctx, namespace, plan, live, uid, results, outcome)
    _announce_writes(ctx, body, live, outcome)
    new_status = _observe(ctx, body, spec, results, old_status, now, rollout, kinds)
    return _finish(ctx, body, old_status, new_status, refused, outcome, now)


def _drop_legacy_finalizer(ctx: Reconciler, meta: dict[str, Any]) -> None:
    """An earlier version's kopf timers left a finalizer; nothing needs it (children go with their owner
    references), and it blocks deletion whenever no operator runs."""
    if LEGACY_FINALIZER in (meta.get("finalizers") or []):
        ctx.kube.request(
            "PATCH", INFERENCE_SERVICE.path(meta["namespace"], meta["name"]),
            body={"metadata": {"finalizers": [f for f in meta["finalizers"] if f != LEGACY_FINALIZER]}},
            content_type="application/merge-patch+json",
        )


def _hold(ctx: Reconciler, body: dict[str, Any], old_status: dict[str, Any], conditions: list[dict[str, Any]],
          reason: str, message: str, outcome: Outcome) -> Outcome:
    """A service that cannot be served as specified: its status says why (an Event when the reason is new),
    its children stay as they are."""
    new_status = {**old_status, "conditions": conditions, "observedGeneration": body["metadata"].get("generation")}
    if _status_differs(old_status, new_status):
        meta = body["metadata"]
        outcome.status_object = ctx.kube.patch_status(meta["namespace"], meta["name"], new_status)
        outcome.status_written = True
        if _ready_reason(old_status) != (reason, message):
            ctx.record_event(body, "Warning", reason, message)
    return outcome


def _hand_over_replicas(ctx: Reconciler, desired: list[dict[str, Any]], live: dict[ChildKey, dict[str, Any]],
                        plan: Plan, uid: str | None) -> dict[ChildKey, dict[str, Any]]:
    """An autoscaled pool's replicas belong to the autoscaler's field manager. Hand the field over before an
    apply that omits it, or server-side apply would reset it to the default. A pool whose replicas no manager
    owns still has the API server's default: it was created, but the operator stopped before setting its
    initial replicas; set them now."""
    to_apply = {child_key(m) for m in plan.apply}
    scaled: dict[ChildKey, dict[str, Any]] = {}
    for manifest in desired:
        if manifest["kind"] in POOL_KINDS and "replicas" not in manifest["spec"]:
            current = live.get(child_key(manifest))
            if current is None or not owned_by(current, uid) or _owns_replicas(current, AUTOSCALER_FIELD_MANAGER):
                continue
            # created autoscaled: the replicas its create is credited with are the API server's default
            created_autoscaled = (current["metadata"].get("annotations") or {}).get(AUTOSCALED_ANNOTATION) == "true"
            if not _owns_replicas(current, None, but_a_create=created_autoscaled):
                # Still the API server's default: never scaled since it was created, so it gets its
                # initial count (unless that is the default too, see create_scaled). Any other count was
                # set by hand through the scale subresource, which records no owner for a field nobody
                # owned: it stays, for the autoscaler to take over.
                replicas = int(manifest["metadata"]["annotations"][INITIAL_REPLICAS_ANNOTATION])
                if int(current.get("spec", {}).get("replicas", DEFAULT_REPLICAS)) != DEFAULT_REPLICAS:
                    continue
                if replicas == DEFAULT_REPLICAS:
                    continue
            elif child_key(manifest) in to_apply:
                replicas = int(current.get("spec", {}).get("replicas", DEFAULT_REPLICAS))
            else:
                continue
            scaled[child_key(manifest)] = _scale(ctx.kube, manifest, replicas, current["metadata"].get("uid"))
    return scaled


def _write_plan(ctx: Reconciler, namespace: str, plan: Plan, live: dict[ChildKey, dict[str, Any]],
                uid: str | None, results: dict[ChildKey, dict[str, Any]], outcome: Outcome) -> list[str]:
    """Creates, applies, sets initial counts and deletes as planned; what the API server refused to store (a
    spec valid here, but not as a child: e.g. a nodeSelector that is no label) is returned, reported like an
    invalid spec, and that child stays as it was."""
    refused: list[str] = []
    writes: list[tuple[dict[str, Any], dict[str, Any] | None]] = [(m, None) for m in plan.create]
    writes += [(m, live[child_key(m)]) for m in plan.apply]
    created: set[ChildKey] = set()
    for (manifest, current), answer in zip(writes, _write_children(ctx, writes, uid), strict=True):
        key = child_key(manifest)
        if isinstance(answer, ChildConflict):
            outcome.conflicts.append(answer)
            continue
        if isinstance(answer, ApiError):
            if not _refused(answer):
                raise answer
            refused.append(f"the API server refused {key[1]}/{key[2]}: {answer.message}")
            if key in live:
                results[key] = live[key]
            continue
        results[key] = answer
        outcome.applied.append(key)
        if current is None:
            created.add(key)
    for manifest in plan.create_scaled:
        initial = int(manifest["metadata"]["annotations"][INITIAL_REPLICAS_ANNOTATION])
        key = child_key(manifest)
        # The API server's default is the initial count already: no write. The field then has no
        # manager at all, so no later apply resets it, and the autoscaler's first decision takes it
        # (1,000 new services: 2,000 writes fewer).
        if key in created and initial != DEFAULT_REPLICAS:
            results[key] = _scale(ctx.kube, manifest, initial, results[key]["metadata"].get("uid"))
    for obj in plan.delete:
        ctx.kube.delete(kind_of(obj), namespace, obj["metadata"]["name"], obj["metadata"].get("uid"))
        outcome.deleted.append(child_key(obj))
    return refused


def _announce_writes(ctx: Reconciler, body: dict[str, Any], live: dict[ChildKey, dict[str, Any]],
                     outcome: Outcome) -> None:
    if outcome.applied:
        names = ", ".join(f"{kind}/{child}" for _, kind, child in outcome.applied)
        verb = "Created" if not live else "Updated"
        ctx.record_event(body, "Normal", verb, f"applied {len(outcome.applied)} children: {names}")
    if outcome.deleted:
        names = ", ".join(f"{kind}/{child}" for _, kind, child in outcome.deleted)
        ctx.record_event(body, "Normal", "Pruned", f"deleted children no longer in the spec: {names}")


def _finish(ctx: Reconciler, body: dict[str, Any], old_status: dict[str, Any], new_status: dict[str, Any],
            refused: list[str], outcome: Outcome, now: str) -> Outcome:
    """The status from what the children are, conflicts and refusals over it; written when it changed."""
    generation = body["metadata"].get("generation")
    if outcome.conflicts:
        message = "; ".join(str(c) for c in outcome.conflicts)
        new_status["conditions"] = merge_conditions(
            new_status["conditions"], [Cond("Ready", "False", "ChildConflict", message)], generation, now
        )
    elif refused:
        outcome.invalid = "; ".join(refused)
        new_status["conditions"] = merge_conditions(
            new_status["conditions"], [Cond("Ready", "False", "InvalidSpec", outcome.invalid)], generation, now
        )
    if _status_differs(old_status, new_status):
        meta = body["metadata"]
        outcome.status_object = ctx.kube.patch_status(meta["namespace"], meta["name"], new_status)
        outcome.status_written = True
        _announce_transitions(ctx, body, old_status, new_status)
    return outcome


def _scale(kube: Kube, manifest: dict[str, Any], replicas: int, uid: str | None) -> dict[str, Any]:
    """A pool's replicas under the autoscaler's field manager (a LeaderWorkerSet's: whole groups), only
    on the object of `uid`."""
    meta = manifest["metadata"]
    kind = LEADER_WORKER_SET if manifest["kind"] == LEADER_WORKER_SET.kind else DEPLOYMENT
    return kube.scale(meta["namespace"], meta["name"], replicas, AUTOSCALER_FIELD_MANAGER, kind, uid=uid)


APPLIED_FIRST = frozenset({"ServiceAccount", "Role"})
"""Kinds applied before the other children: the API server resolves a RoleBinding's Role to check
that the operator may grant it (404 while the Role does not exist), and refuses the pods of a
Deployment whose ServiceAccount does not exist yet (the ReplicaSet controller then retries them with
a growing delay)."""


Answer = dict[str, Any] | ApiError | ChildConflict
"""What writing one child gave: the object, the error, or the conflict."""


def _write_children(
    ctx: Reconciler, writes: list[tuple[dict[str, Any], dict[str, Any] | None]], owner_uid: str | None
) -> list[Answer]:
    """Creates each child without a live object (a create never touches an existing one) and applies
    the others, each only to the object of the live one's uid; the answers in the same order. The
    `APPLIED_FIRST` kinds go first, then all the others: each group at once on `ctx.applier`."""
    each = ctx.applier.map if ctx.applier is not None else map
    answers: dict[int, Answer] = {}
    for first in (True, False):
        group = [i for i, (m, _) in enumerate(writes) if (m["kind"] in APPLIED_FIRST) == first]
        answers.update(zip(group, each(partial(_write_child, ctx, owner_uid), [writes[i] for i in group]),
                           strict=True))
    return [answers[i] for i in range(len(writes))]


def _write_child(ctx: Reconciler, owner_uid: str | None, item: tuple[dict[str, Any], dict[str, Any] | None]) -> Answer:
    manifest, current = item
    kind, meta = kind_of(manifest), manifest["metadata"]
    # status reads only the pools back; of the rest it needs to know they exist
    read_back = manifest["kind"] in POOL_KINDS
    try:
        if current is None:
            created = _create_child(ctx, manifest, owner_uid, read_back)
            if not isinstance(created, tuple):
                return created
            current = created[0]
        if _set_by_update(current):
            autoscaled = manifest["kind"] in POOL_KINDS and "replicas" not in manifest["spec"]
            ctx.kube.claim_fields(kind, meta["namespace"], meta["name"], leave=("replicas",) if autoscaled else ())
        return ctx.kube.apply(manifest, read_back=read_back, uid=current["metadata"].get("uid"))
    except ApiError as error:
        if error.status in (409, 422) and "uid" in error.message:
            # the object was replaced since it was seen: whatever holds the name now is not ours
            replaced = ctx.kube.get(kind, meta["namespace"], meta["name"])
            if replaced is not None and not owned_by(replaced, owner_uid):
                return conflict_with({**replaced, "kind": manifest["kind"]})
        return error


def _create_child(ctx: Reconciler, manifest: dict[str, Any], owner_uid: str | None,
                  read_back: bool) -> Answer | tuple[dict[str, Any]]:
    """The created child; or, when one of that name exists already, the answer for it (ours and as wanted,
    another's, gone meanwhile), or (it,) when it is ours and must be applied over."""
    kind, meta = kind_of(manifest), manifest["metadata"]
    try:
        created: dict[str, Any] = ctx.kube.create(manifest)
        return created if read_back else manifest
    except ApiError as error:
        if error.status != 409:
            raise
    # a child the watch has not shown yet, one whose labels were edited away, or another's
    current = ctx.kube.get(kind, meta["namespace"], meta["name"])
    if current is None:
        return ApiError(409, f"{manifest['kind']}/{meta['name']} was deleted while being created")
    current.setdefault("kind", manifest["kind"])
    if not owned_by(current, owner_uid):
        return conflict_with(current)
    if contains(manifest, current):
        return current
    return (current,)


def _set_by_update(obj: dict[str, Any]) -> bool:
    """Whether the operator's field manager holds fields of `obj` from a create (not an apply)."""
    return any(
        (e.get("manager"), e.get("operation"), e.get("subresource")) == (FIELD_MANAGER, "Update", None)
        for e in obj.get("metadata", {}).get("managedFields") or []
    )


def _refused(error: ApiError) -> bool:
    """The API server will never store this object as it is (not a passing failure or a permission)."""
    return error.status in (400, 422) or (
        error.status == 500 and "failed to create typed patch object" in error.message
    )


def _observe(
    ctx: Reconciler,
    body: dict[str, Any],
    spec: InferenceServiceSpec,
    children: dict[ChildKey, dict[str, Any]],
    old_status: dict[str, Any],
    now: str,
    rollout: RolloutPlan | None = None,
    kinds: PoolKinds | None = None,
) -> dict[str, Any]:
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    kinds = kinds or {role: (DEPLOYMENT.api_version, DEPLOYMENT.kind) for role in ROLES}
    rollout = rollout or RolloutPlan(Placement(), "a", "")
    serving = rollout.serving_pools(kinds, name)
    deployments: dict[str, dict[str, Any] | None] = {}
    troubles: dict[str, PodTrouble | None] = {}
    for role in (*ROLES, ROUTER):
        key = serving[role] if role in ROLES else ("apps/v1", "Deployment", f"{name}-{ROUTER}")
        deployments[role] = children.get(key)
        troubles[role] = _trouble(ctx, namespace, name, role, key[2], deployments[role], old_status)
    blocked, message = rollout.blocked, rollout.message
    for role, key in rollout.target_pools.items():
        trouble = _trouble(ctx, namespace, name, role, key[2], children.get(key), old_status, rollout=True)
        if trouble is not None and trouble.unschedulable:
            blocked = "Unschedulable"
            message = (f"the {role} pool of revision {rollout.target} cannot be scheduled ({trouble.unschedulable} "
                       f"pods: {trouble.message}); revision {rollout.serving_revision} goes on serving")
    kv_present = all(("v1", "Service", kv_service_name(name, role)) in children for role in ROLES)
    kv_from_traffic = next((c for c in old_status.get("conditions", []) or [] if c.get("type") == "KVTransferReady"),
                           None)
    conditions = merge_conditions(
        old_status.get("conditions", []),
        [*compute_conditions(deployments, troubles, kv_present, kv_from_traffic),
         pod_security_condition(spec, RDMA_POD_SECURITY), _progressing(rollout, blocked, message)],
        meta.get("generation"),
        now,
    )
    status: dict[str, Any] = {
        **old_status,
        "observedGeneration": meta.get("generation"),
        "endpoint": endpoint(name, namespace, spec.router.port),
        "conditions": conditions,
        "revision": rollout.serving_revision,
        "rollout": _rollout_status(rollout, children, blocked, message, old_status.get("rollout"), now),
    }
    for role in ROLES:
        status[role] = {**pool_status(spec, role, deployments[role], old_status.get(role)),
                        "workload": serving[role][2]}
    return status


def _trouble(ctx: Reconciler, namespace: str, name: str, role: str, workload: str, pool: dict[str, Any] | None,
             old_status: dict[str, Any], rollout: bool = False) -> PodTrouble | None:
    """Why a pool's pods are not all Ready (the scheduler's reason), checked at most every pod_check_interval_s."""
    desired, ready, _, _ = deployment_counts(pool)
    if pool is None or ready >= desired:
        ctx._pods_checked.pop((namespace, workload), None)
        ctx._rollout_troubles.pop((namespace, workload), None)
        return None
    # pods to explain the shortfall with exist only once the Deployment's controller made them (a new
    # service's first reconcile would list 3 empty selections: 3,000 requests for 1,000)
    pods_made = int((pool.get("status") or {}).get("replicas", 0)) > 0
    last = ctx._pods_checked.get((namespace, workload), 0.0)
    if pods_made and time.monotonic() - last >= ctx.pod_check_interval_s:
        ctx._pods_checked[(namespace, workload)] = time.monotonic()
        selector = f"{SERVICE_LABEL}={name},{ROLE_LABEL}={role}"
        if role in ROLES:  # this slot's pods only
            slot = ((pool.get("metadata") or {}).get("labels") or {}).get(SLOT_LABEL)
            selector += f",{SLOT_LABEL}={slot}" if slot else f",!{SLOT_LABEL}"
        trouble = pod_trouble(ctx.kube.list(POD, namespace, selector, cached=True))
        if rollout:
            ctx._rollout_troubles[(namespace, workload)] = trouble
        return trouble
    if rollout:
        return ctx._rollout_troubles.get((namespace, workload))
    return _previous_trouble(old_status, role)  # none made, or checked moments ago


def _progressing(rollout: RolloutPlan, blocked: str | None, message: str) -> Cond:
    """Whether a rollout goes on (as a Deployment's Progressing condition)."""
    if blocked is not None:
        return Cond("Progressing", "False", blocked, message)
    if rollout.phase == "Complete":
        return Cond("Progressing", "True", "RevisionServing", f"revision {rollout.serving_revision} serves")
    return Cond("Progressing", "True", f"Rollout{rollout.phase}", message)


def _rollout_status(rollout: RolloutPlan, children: dict[ChildKey, dict[str, Any]], blocked: str | None,
                    message: str, old: dict[str, Any] | None, now: str) -> dict[str, Any] | None:
    if rollout.phase == "Complete":
        return None  # the merge patch removes it
    target = rollout.target or rollout.serving_revision
    old = old or {}
    out: dict[str, Any] = {
        "from": rollout.serving_revision if rollout.target else old.get("from", rollout.serving_revision),
        "to": target, "phase": "Blocked" if blocked else rollout.phase, "message": message,
        "startedAt": old.get("startedAt") if old.get("to") == target and old.get("startedAt") else now,
    }
    for role, key in rollout.target_pools.items():
        desired, ready, _, _ = deployment_counts(children.get(key))
        out[role] = f"{ready}/{desired}"
    return out


def _previous_trouble(status: dict[str, Any], role: str) -> PodTrouble | None:
    """The Unschedulable finding of the last status, so it is not lost between pod checks."""
    ctype = {"prefill": "PrefillReady", "decode": "DecodeReady", "router": "RouterReady"}[role]
    for cond in status.get("conditions", []) or []:
        if cond.get("type") == ctype and cond.get("reason") == "Unschedulable":
            message = str(cond.get("message", ""))
            count = message.split(" of ", 1)[0]
            unschedulable = int(count) if count.isdigit() else 1
            return PodTrouble(unschedulable, unschedulable, message.split(": ", 1)[-1])
    return None


def _status_differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(key) != value for key, value in new.items())


def _ready_reason(status: dict[str, Any]) -> tuple[str, str] | None:
    for cond in status.get("conditions", []) or []:
        if cond.get("type") == "Ready":
            return str(cond.get("reason")), str(cond.get("message"))
    return None


def _announce_transitions(ctx: Reconciler, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
    """An Event for each condition whose status or reason changed: what a user wants to see."""
    before = {c.get("type"): (c.get("status"), c.get("reason")) for c in old.get("conditions", []) or []}
    for cond in new.get("conditions", []):
        if before.get(cond["type"]) == (cond["status"], cond["reason"]):
            continue
        if cond["type"] == "Progressing":  # each step of a rollout, its end, and a rollout that cannot go on
            if cond["type"] in before or cond["reason"] != "RevisionServing":
                ctx.record_event(body, "Normal" if cond["status"] == "True" else "Warning", cond["reason"],
                                 cond["message"])
            continue
        if cond["type"] != "Ready" and cond["reason"] != "Unschedulable" and (
                cond["type"], cond["status"]) != ("PodSecurity", "False"):
            continue
        kind = "Normal" if cond["status"] == "True" else "Warning"
        if cond["reason"] in ("NotCreated", "NoReplicasReady", "RollingOut", "NoPeers") and cond["type"] == "Ready":
            if before.get("Ready") is None or before.get("Ready", ("", ""))[1] in ("NotCreated", "NoReplicasReady"):
                continue  # a new service on its way to its first readiness: "Created", then "Ready"
            kind = "Normal"  # the ordinary way to readiness, not a problem
        ctx.record_event(body, kind, cond["reason"], f"{cond['type']}={cond['status']}: {cond['message']}")
