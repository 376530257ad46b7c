"""decide(): every autoscaled pool of one service sized on one tick, stabilised and fitted to the budget.

Up in one step to the needed count; down only to the highest count recommended during the last
`scale_down_window_s`, and only when that is at least `hysteresis` below the current count (a pool never
flaps). Bounds: `autoscaling.minReplicas`/`maxReplicas` per pool, and `spec.acceleratorBudget`
(replicas x accelerators per replica, both pools together) shared in proportion to need. Missing or stale
signals: the pool holds its count (within min/max), `metrics_available=False`; it never scales to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from disagg.api.v1alpha1 import ROLES, InferenceServiceSpec, PoolSpec
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.engines import Role
from disagg.scaling.policy.budget import budget_gain
from disagg.scaling.policy.decode import decode_need
from disagg.scaling.policy.model import Capacity, capacity_of, clamp
from disagg.scaling.policy.picture import LoadPicture, PoolSignals
from disagg.scaling.policy.prefill import prefill_need
from disagg.scaling.policy.settings import PolicySettings
from disagg.scaling.policy.state import Need, PolicyState, PoolDecision, PoolMemory


def _usable(signals: PoolSignals | None, now: float, settings: PolicySettings) -> str | None:
    """Why these signals cannot be used, or None when they can."""
    if signals is None:
        return "no metrics for this pool"
    age = now - signals.sampled_at
    if age > settings.staleness_s:
        return f"metrics are {age:.0f}s old (limit {settings.staleness_s:.0f}s)"
    return None


def _remember(memory: PoolMemory, need: Need, signals: PoolSignals | None) -> PoolMemory:
    """The pool's memory after this tick's sizing."""
    ready_now = signals.ready_replicas if signals is not None else None
    return replace(
        memory,
        correction=need.correction,
        service_correction=need.service_correction,
        load_factor=need.load_factor,
        fitted_load_factors=need.fitted_load_factors,
        queue_samples=need.queue_samples,
        slo_guard=need.slo_guard,
        rate_samples=need.rate_samples,
        step=need.step,
        ready=ready_now,
        ready_since=memory.ready_since if memory.ready == ready_now and memory.ready_since is not None
        else (signals.sampled_at if signals is not None else None),
        mean_prompt_tokens=need.mean_prompt if need.mean_prompt is not None else memory.mean_prompt_tokens,
        mean_output_tokens=need.mean_output if need.mean_output is not None else memory.mean_output_tokens,
        error_budget=need.error_budget,
        sized_since=memory.sized_since if memory.sized_since is not None
        else (signals.sampled_at if signals is not None else None),
    )


@dataclass
class _Tick:
    """One tick's work in progress."""

    memories: dict[str, PoolMemory]
    recommendation: dict[Role, int] = field(default_factory=dict)
    explanations: dict[Role, str] = field(default_factory=dict)
    unavailable: dict[Role, str] = field(default_factory=dict)
    desired: dict[Role, int] = field(default_factory=dict)
    notes: dict[Role, str] = field(default_factory=dict)
    out_of_reach: dict[Role, tuple[float, str]] = field(default_factory=dict)
    remembered: dict[Role, int] = field(default_factory=dict)
    """What the scale-down window remembers of each pool's recommendation (without a step's sizing)."""


def _need(
    role: Role, picture: LoadPicture, spec: InferenceServiceSpec, capacities: dict[Role, Capacity | None],
    memory: PoolMemory, settings: PolicySettings, current: dict[str, int],
) -> Need | str:
    pool: PoolSpec = getattr(spec, role)
    capacity = capacities[role]
    assert capacity is not None and pool.autoscaling is not None
    if role == "prefill":
        return prefill_need(picture, spec, capacity, capacities["decode"], memory, settings,
                            pool.autoscaling.max_replicas)
    return decode_need(picture, spec, capacity, memory, settings, current.get(role, pool.replicas),
                       capacities["prefill"])


def _recommend(
    tick: _Tick, picture: LoadPicture | None, spec: InferenceServiceSpec, current: dict[str, int],
    state: PolicyState, now: float, settings: PolicySettings, catalog: AcceleratorCatalog,
) -> None:
    """Each autoscaled pool's recommendation for this tick, or why there is none."""
    capacities: dict[Role, Capacity | None] = {role: capacity_of(spec, getattr(spec, role), catalog)
                                               for role in ROLES}
    for role in ROLES:
        pool: PoolSpec = getattr(spec, role)
        if pool.autoscaling is None:
            continue
        memory = state.pool(role)
        signals = picture.pool(role) if picture is not None else None
        problem = _usable(signals, now, settings)
        if problem is None and capacities[role] is None:
            problem = "no capacity model (set spec.model.architecture and a catalogue accelerator.type)"
        if problem is not None:
            tick.unavailable[role] = problem
            continue
        assert picture is not None
        need = _need(role, picture, spec, capacities, memory, settings, current)
        if isinstance(need, str):
            tick.unavailable[role] = need
            continue
        tick.recommendation[role] = clamp(need.replicas, pool)
        tick.explanations[role] = need.explanation
        if need.out_of_reach is not None:
            tick.out_of_reach[role] = need.out_of_reach
        tick.memories[role] = _remember(memory, need, signals)
        if need.held_replicas is not None and clamp(need.held_replicas, pool) < tick.recommendation[role]:
            tick.remembered[role] = clamp(need.held_replicas, pool)


def _hold_steps(tick: _Tick, spec: InferenceServiceSpec, now: float, settings: PolicySettings) -> None:
    """A count sized for a step up is held for the whole scale-down window while the service spends its
    error budget (the bursts that follow are caught by the pool kept up), for `step_hold_s` only while it
    leaves the budget well unspent (the load settles at what the replay of the new windows asks)."""
    prefill = tick.memories.get("prefill")
    slo_allows = 1.0 - spec.slo.percentile / 100.0
    gain, _ = budget_gain(prefill.error_budget if prefill is not None else None, slo_allows, settings)
    for role in list(tick.remembered):
        if gain <= 1.0:
            del tick.remembered[role]  # the window remembers the step's count
            continue
        tick.memories[role] = replace(tick.memories[role],
                                      step_hold=(now + settings.step_hold_s, tick.recommendation[role]))


def _stabilise(tick: _Tick, spec: InferenceServiceSpec, current: dict[str, int], now: float,
               settings: PolicySettings) -> None:
    """Up at once; down only to the window's highest recommendation and past the hysteresis."""
    for role, wanted in tick.recommendation.items():
        pool = getattr(spec, role)
        now_count = current.get(role, pool.replicas)
        memory = tick.memories[role]
        # A pool seen for the first time counts its current size as a recent recommendation: no
        # scale-down before a whole window of evidence says so.
        history = memory.recommendations or ((now, now_count),)
        window = (*tuple((t, n) for t, n in history if now - t < settings.scale_down_window_s),
                  (now, tick.remembered.get(role, wanted)))
        tick.memories[role] = replace(memory, recommendations=window)
        if wanted >= now_count:
            tick.desired[role] = wanted
            continue
        stable = max(n for _, n in window)
        if memory.step_hold is not None and now < memory.step_hold[0]:
            stable = max(stable, memory.step_hold[1])
        step = max(1, math.ceil(settings.hysteresis * now_count))
        if stable <= now_count - step:
            tick.desired[role] = stable
            if stable > wanted:
                tick.notes[role] = f"; down to {stable}, the highest of the last {settings.scale_down_window_s:.0f}s"
        else:
            tick.desired[role] = clamp(now_count, pool)
            reason = (
                f"recommended {stable} within the last {settings.scale_down_window_s:.0f}s"
                if stable > wanted else f"within hysteresis of {now_count}"
            )
            tick.notes[role] = f"; holding {tick.desired[role]} ({reason})"


def _fit_budget(
    desired: dict[Role, int], spec: InferenceServiceSpec, current: dict[str, int]
) -> tuple[dict[Role, int], str]:
    """Shrink the autoscaled pools' counts in proportion until both pools fit the accelerator budget."""
    budget = spec.accelerator_budget
    if budget is None or not desired:  # nothing to shrink: pools without metrics hold their count
        return desired, ""
    # a replica of a multi-node pool is a whole group: its accelerators on every node
    per_replica: dict[str, int] = {role: int(getattr(spec, role).worker_accelerators) for role in ROLES}
    fixed: int = sum(
        per_replica[role] * int(current.get(role, getattr(spec, role).replicas))
        for role in ROLES if role not in desired
    )
    total = fixed + sum(per_replica[role] * n for role, n in desired.items())
    if total <= budget:
        return desired, ""
    floors = {role: getattr(spec, role).autoscaling.min_replicas for role in desired}
    share = max(budget - fixed, 0) / sum(per_replica[role] * n for role, n in desired.items())
    fitted: dict[Role, int] = {role: max(int(floors[role]), math.floor(n * share)) for role, n in desired.items()}

    def used() -> int:
        return fixed + sum(per_replica[r] * int(n) for r, n in fitted.items())

    # Hand out what rounding left, to the pool furthest below its need; take back if floors overshoot.
    while True:
        spare = budget - used()
        short = [r for r in fitted if fitted[r] < desired[r] and per_replica[r] <= spare]
        if not short:
            break
        neediest = min(short, key=lambda r: fitted[r] / desired[r])
        fitted[neediest] += 1
    while used() > budget:
        above = [r for r in fitted if fitted[r] > floors[r]]
        if not above:
            break
        fitted[max(above, key=lambda r: fitted[r] / desired[r])] -= 1
    return fitted, f"; accelerator budget {budget} (wanted {total}) limits the pools"


def _decisions(
    tick: _Tick, spec: InferenceServiceSpec, current: dict[str, int], now: float
) -> dict[str, PoolDecision]:
    fitted, budget_note = _fit_budget(tick.desired, spec, current)
    decisions: dict[str, PoolDecision] = {}
    for role in ROLES:
        pool = getattr(spec, role)
        if pool.autoscaling is None:
            continue
        now_count = current.get(role, pool.replicas)
        if role in tick.unavailable:
            held = clamp(now_count, pool)
            decisions[role] = PoolDecision(
                role, now_count, held, f"MetricsUnavailable: {tick.unavailable[role]}; holding {held}",
                held != now_count, False,
            )
            continue
        final = fitted[role]
        if final != now_count:
            tick.memories[role] = replace(tick.memories[role], last_scale_at=now)
        note = tick.notes.get(role, "") + (budget_note if final != tick.desired[role] else "")
        decisions[role] = PoolDecision(
            role, now_count, final, f"{role}: {tick.explanations[role]}{note}", final != now_count, True,
            tick.out_of_reach.get(role),
        )
    return decisions


def decide(
    picture: LoadPicture | None,
    spec: InferenceServiceSpec,
    current: dict[str, int],
    state: PolicyState,
    now: float,
    settings: PolicySettings,
    catalog: AcceleratorCatalog,
) -> tuple[dict[str, PoolDecision], PolicyState]:
    """Desired replicas of every autoscaled pool of one service, and the policy's next memory.

    `current` holds each pool's replicas as the Deployment has them now (missing: the spec's replicas).
    Pools without `autoscaling` get no decision (but their accelerators count against the budget).
    """
    tick = _Tick(dict(state.pools))
    _recommend(tick, picture, spec, current, state, now, settings, catalog)
    _hold_steps(tick, spec, now, settings)
    _stabilise(tick, spec, current, now, settings)
    decisions = _decisions(tick, spec, current, now)
    return decisions, PolicyState(tick.memories)
