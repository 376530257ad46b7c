"""The autoscaling policy: a pure function from one load picture to the desired replicas of each pool.

The operator calls `decide()` on every tick with the signals it read from Prometheus; the simulator
(`disagg simulate`, bench/autoscale.py) calls the very same function with signals computed from a
replayed trace. No I/O, no clock: time comes in as `now`, memory as `PolicyState` and goes out as a new
`PolicyState`.

How a pool is sized
- Prefill: the load is prompt tokens per second (the larger of what the pool processed and what arrived)
  plus the waiting requests, drained over `backlog_drain_s`. The capacity model gives one replica's
  prefill time for the mean prompt; an M/M/c queue predicts the TTFT at the SLO percentile; the pool
  gets the fewest replicas whose predicted TTFT stays within the target (minus the KV hand-off and the
  first decode step), times `target_fraction`.
- Decode: the load is generated tokens per second (the larger of what decode produced and what the
  requests entering prefill will ask for) and the sequences running or waiting. The capacity model gives
  the largest batch a replica runs within the ITL target and its KV cache; the pool gets enough replicas
  for both.
- Online correction: each tick, the observed latency at the SLO percentile is compared with what the
  model predicts for the ready replicas at the observed load; the ratio (smoothed, bounded) multiplies
  every later prediction. A slower engine, heavier prompts or burstier arrivals than the prior assumes all
  show up there.
- Up in one step to the needed count; down only to the highest count recommended during the last
  `scale_down_window_s`, and only when that is at least `hysteresis` below the current count: a pool never
  flaps.
- Bounds: `autoscaling.minReplicas`/`maxReplicas` per pool, and `spec.acceleratorBudget` (replicas x
  accelerators per replica, both pools together) shared in proportion to need.
- Missing or stale signals: the pool holds its count (within min/max), `metrics_available=False`.
  It never scales to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec
from disagg.capacity.models import ModelConfigError, ModelShape, builtin_model, from_architecture
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_step_seconds,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.capacity.sizing import predicted_prefill_ttft, size_decode, size_prefill
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog

Role = Literal["prefill", "decode"]
ROLE_NAMES: tuple[Role, Role] = ("prefill", "decode")


@dataclass(frozen=True)
class PoolSignals:
    """What Prometheus says about one pool, summed (counts, rates) or aggregated (latencies) over its pods."""

    ready_replicas: int
    sampled_at: float
    """Clock seconds of the newest sample these values come from."""
    waiting_requests: float | None = None
    running_requests: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    request_rate: float | None = None
    """Requests per second entering the pool."""
    kv_usage: float | None = None
    """Mean KV-cache occupancy of the pool's replicas, 0..1."""
    ttft_s: float | None = None
    """Time to first token at the SLO percentile, as the pool's engines measure it."""
    itl_s: float | None = None
    """Inter-token latency at the SLO percentile."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    prefill_time_s: float | None = None
    """Mean time a request spends in prefill compute, without queueing (vLLM:
    `vllm:request_prefill_time_seconds` sum / count); optional, sharpens the prefill correction."""


@dataclass(frozen=True)
class LoadPicture:
    """One tick's signals of both pools of a service."""

    prefill: PoolSignals | None
    decode: PoolSignals | None

    def pool(self, role: Role) -> PoolSignals | None:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class PolicySettings:
    """Knobs of the policy; the defaults are what bench/autoscale.py measures."""

    tick_s: float = 15.0
    """How often the operator calls decide()."""
    scale_down_window_s: float = 1200.0
    """A pool scales down only to the highest count recommended during this window."""
    hysteresis: float = 0.1
    """A scale-down must remove at least this share of the pool (and at least one replica)."""
    staleness_s: float = 90.0
    """Signals older than this are treated as missing."""
    prefill_headroom: float = 0.1
    """Extra share of prefill load provisioned for."""
    decode_headroom: float = 0.1
    """Extra share of decode load provisioned for."""
    target_fraction: float = 0.85
    """Plan for this share of the latency targets, keeping the rest as margin."""
    backlog_drain_s: float = 60.0
    """Waiting requests are added to the load as if they had to be served within this time."""
    correction_smoothing: float = 0.5
    """Weight of a newest observed/predicted ratio above the running correction (things got worse)."""
    correction_decay: float = 0.02
    """Weight of a newest ratio below the running correction: bursts are remembered for ~1/decay ticks."""
    correction_bounds: tuple[float, float] = (0.6, 6.0)
    """The correction never leaves this range (a broken histogram must not run the pool to its max)."""
    min_load_for_correction: float = 0.15
    """Utilisation (prefill) or batch share (decode) below which latency says little; no correction."""
    efficiency: Efficiency = DEFAULT_EFFICIENCY
    """Roofline efficiency factors of the capacity-model prior."""
    kv_over_rdma: bool = True
    """Whether KV hand-offs run over RDMA (else TCP) when predicting the TTFT budget."""


@dataclass(frozen=True)
class PoolMemory:
    """What the policy remembers about one pool between ticks."""

    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, replicas) recommended during the scale-down window."""
    last_scale_at: float | None = None
    correction: float = 1.0
    """Observed / predicted latency, smoothed: multiplies the capacity model's latencies."""
    service_correction: float = 1.0
    """Prefill only: observed / predicted prefill time per request, smoothed: the capacity model's
    throughput error (engine speed, and the spread of prompt sizes around the mean)."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None


@dataclass(frozen=True)
class PolicyState:
    """Per-service memory of the policy; immutable, `decide()` returns the next one."""

    pools: dict[str, PoolMemory] = field(default_factory=dict)

    def pool(self, role: str) -> PoolMemory:
        return self.pools.get(role, PoolMemory())


@dataclass(frozen=True)
class PoolDecision:
    """The policy's answer for one pool."""

    role: str
    current: int
    desired: int
    reason: str
    """Why, with the numbers that drove it."""
    changed: bool
    metrics_available: bool


@dataclass(frozen=True)
class _Capacity:
    model: ModelShape
    accelerator: Accelerator
    tensor_parallel: int


def _capacity(spec: InferenceServiceSpec, pool: PoolSpec, catalog: AcceleratorCatalog) -> _Capacity | None:
    """The capacity model of a pool, or None when the model or the accelerator is unknown."""
    if pool.accelerator.type is None:
        return None
    accelerator = catalog.get(pool.accelerator.type)
    if accelerator is None:
        return None
    if spec.model.architecture is not None:
        model = from_architecture(spec.model.architecture, spec.model.name)
    else:
        try:
            model = builtin_model(spec.model.name)
        except ModelConfigError:
            return None
    return _Capacity(model, accelerator, pool.parallelism.tensor)


def _first(*values: float | None) -> float | None:
    for value in values:
        if value is not None:
            return value
    return None


def _usable(signals: PoolSignals | None, now: float, settings: PolicySettings) -> str | None:
    """Why these signals cannot be used, or None when they can."""
    if signals is None:
        return "no metrics for this pool"
    age = now - signals.sampled_at
    if age > settings.staleness_s:
        return f"metrics are {age:.0f}s old (limit {settings.staleness_s:.0f}s)"
    return None


def _update_correction(memory: PoolMemory, ratio: float | None, settings: PolicySettings) -> float:
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return memory.correction
    low, high = settings.correction_bounds
    ratio = min(max(ratio, low), high)
    alpha = settings.correction_smoothing if ratio > memory.correction else settings.correction_decay
    # Smooth in log space: a 2x slow-down and a 2x speed-up weigh the same.
    blended = math.exp((1 - alpha) * math.log(memory.correction) + alpha * math.log(ratio))
    return min(max(blended, low), high)


@dataclass(frozen=True)
class _Need:
    replicas: int
    correction: float
    service_correction: float
    mean_prompt: float | None
    mean_output: float | None
    explanation: str


def _prefill_need(
    picture: LoadPicture,
    spec: InferenceServiceSpec,
    capacity: _Capacity,
    decode_capacity: _Capacity | None,
    memory: PoolMemory,
    settings: PolicySettings,
    max_replicas: int,
) -> _Need | str:
    signals = picture.prefill
    assert signals is not None
    mean_prompt = _first(signals.mean_prompt_tokens, memory.mean_prompt_tokens)
    arrived = None
    if signals.request_rate is not None and mean_prompt is not None:
        arrived = signals.request_rate * mean_prompt
    processed = signals.prompt_tokens_per_s
    if processed is None and arrived is None:
        return "no prompt-token or request rate for the prefill pool"
    if mean_prompt is None:
        if (processed or 0.0) > 0:
            return "prompt tokens flow but no request count to size a mean prompt"
        mean_prompt = 1024.0  # idle pool, nothing seen yet: any size gives the minimum
    load = max(processed or 0.0, arrived or 0.0)
    backlog = (signals.waiting_requests or 0.0) * mean_prompt / settings.backlog_drain_s
    eff = settings.efficiency
    slo = spec.slo
    decode_tp = decode_capacity.tensor_parallel if decode_capacity else capacity.tensor_parallel
    handoff = kv_transfer_seconds(
        capacity.model, mean_prompt, kv_link_bytes_per_s(capacity.tensor_parallel, decode_tp, settings.kv_over_rdma),
        eff,
    )
    budget = slo.ttft_ms / 1000.0 * settings.target_fraction - handoff - slo.itl_ms / 1000.0
    budget = max(budget, slo.ttft_ms / 1000.0 * 0.25)

    correction = memory.correction
    service = prefill_seconds(capacity.model, capacity.accelerator, capacity.tensor_parallel, mean_prompt, eff)
    service_correction = memory.service_correction
    if signals.prefill_time_s is not None and signals.prefill_time_s > 0:
        service_correction = _update_correction(
            replace(memory, correction=memory.service_correction), signals.prefill_time_s / service, settings
        )
    service *= service_correction
    ready = signals.ready_replicas
    if signals.ttft_s is not None and ready > 0 and load > 0:
        rate = load / mean_prompt
        utilization = rate * service / ready
        if settings.min_load_for_correction <= utilization < 0.95:
            predicted = predicted_prefill_ttft(ready, rate, service, slo.percentile)
            correction = _update_correction(memory, signals.ttft_s / predicted, settings)

    sizing = size_prefill(
        capacity.model, capacity.accelerator, capacity.tensor_parallel,
        prompt_tokens_per_s=load + backlog, mean_prompt_tokens=mean_prompt, ttft_budget_s=budget,
        percentile=slo.percentile, correction=correction, headroom=settings.prefill_headroom,
        max_replicas=max_replicas, eff=eff, service_scale=service_correction,
    )
    observed = f", TTFT p{slo.percentile:g} {signals.ttft_s * 1000:.0f}ms" if signals.ttft_s is not None else ""
    explanation = (
        f"{load:.0f} prompt tok/s + {signals.waiting_requests or 0:.0f} waiting, {mean_prompt:.0f} tok/prompt"
        f"{observed}; {sizing.tokens_per_s_per_replica:.0f} tok/s per replica (corrections: service "
        f"{service_correction:.2f}, latency {correction:.2f})"
        f" -> {sizing.replicas} for TTFT {sizing.predicted_ttft_s * 1000:.0f}ms <= {budget * 1000:.0f}ms"
    )
    return _Need(sizing.replicas, correction, service_correction, mean_prompt, memory.mean_output_tokens,
                 explanation)


def _decode_need(
    picture: LoadPicture,
    spec: InferenceServiceSpec,
    capacity: _Capacity,
    memory: PoolMemory,
    settings: PolicySettings,
) -> _Need | str:
    signals = picture.decode
    assert signals is not None
    prefill = picture.prefill
    mean_prompt = _first(
        signals.mean_prompt_tokens, prefill.mean_prompt_tokens if prefill else None, memory.mean_prompt_tokens
    )
    mean_output = _first(
        signals.mean_output_tokens, prefill.mean_output_tokens if prefill else None, memory.mean_output_tokens
    )
    generated = signals.generation_tokens_per_s
    running = signals.running_requests
    if generated is None and running is None:
        return "no generated-token rate or running requests for the decode pool"
    if mean_prompt is None or mean_output is None:
        if (generated or 0.0) > 0 or (running or 0.0) > 0:
            return "decode is busy but no request sizes are known yet"
        mean_prompt, mean_output = 1024.0, 256.0
    # Requests entering prefill now reach decode within seconds: the same picture leads decode.
    rates = [r for r in (signals.request_rate, prefill.request_rate if prefill else None) if r is not None]
    arriving = max(rates) * mean_output if rates else 0.0
    load_tokens = max(generated or 0.0, arriving)
    sequences = (running or 0.0) + (signals.waiting_requests or 0.0)
    eff = settings.efficiency
    itl_target = spec.slo.itl_ms / 1000.0 * settings.target_fraction

    correction = memory.correction
    ready = signals.ready_replicas
    context = mean_prompt + mean_output / 2.0
    if signals.itl_s is not None and ready > 0 and (running or 0.0) > 0:
        batch = (running or 0.0) / ready
        predicted = decode_step_seconds(
            capacity.model, capacity.accelerator, capacity.tensor_parallel, batch, context, eff
        )
        observed_itl = signals.itl_s
        if generated:
            # Running sequences / generated tokens per second is the mean step: a histogram claiming far
            # more than that is broken, not slow.
            observed_itl = min(observed_itl, 2.0 * (running or 0.0) / generated)
        if batch >= 1.0:
            correction = _update_correction(memory, observed_itl / predicted, settings)

    sizing = size_decode(
        capacity.model, capacity.accelerator, capacity.tensor_parallel,
        generation_tokens_per_s=load_tokens, concurrent_sequences=sequences,
        mean_prompt_tokens=mean_prompt, mean_output_tokens=mean_output, itl_target_s=itl_target,
        correction=correction, headroom=settings.decode_headroom, eff=eff,
    )
    observed = f", ITL p{spec.slo.percentile:g} {signals.itl_s * 1000:.1f}ms" if signals.itl_s is not None else ""
    kv = f", KV {signals.kv_usage:.0%}" if signals.kv_usage is not None else ""
    explanation = (
        f"{load_tokens:.0f} gen tok/s, {sequences:.0f} sequences{kv}{observed}; "
        f"{sizing.max_batch:.0f} seqs / {sizing.tokens_per_s_per_replica:.0f} tok/s per replica "
        f"(correction {correction:.2f}) -> {sizing.replicas} for ITL {sizing.predicted_itl_s * 1000:.1f}ms"
        f" <= {itl_target * 1000:.1f}ms"
    )
    return _Need(sizing.replicas, correction, 1.0, mean_prompt, mean_output, explanation)


def _clamp(value: int, pool: PoolSpec) -> int:
    assert pool.autoscaling is not None
    return max(pool.autoscaling.min_replicas, min(pool.autoscaling.max_replicas, value))


def _fit_budget(
    desired: dict[Role, int], spec: InferenceServiceSpec, current: dict[str, int]
) -> tuple[dict[Role, int], str]:
    """Shrink the autoscaled pools' counts in proportion until both pools fit the accelerator budget."""
    budget = spec.accelerator_budget
    if budget is None:
        return desired, ""
    per_replica: dict[str, int] = {role: int(getattr(spec, role).accelerator.count) for role in ROLE_NAMES}
    fixed: int = sum(
        per_replica[role] * int(current.get(role, getattr(spec, role).replicas))
        for role in ROLE_NAMES if role not in desired
    )
    total = fixed + sum(per_replica[role] * n for role, n in desired.items())
    if total <= budget:
        return desired, ""
    floors = {role: getattr(spec, role).autoscaling.min_replicas for role in desired}
    available = budget - fixed
    wanted = sum(per_replica[role] * n for role, n in desired.items())
    share = max(available, 0) / wanted
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
    note = f"; accelerator budget {budget} (wanted {total}) limits the pools"
    return fitted, note


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
    recommendation: dict[Role, int] = {}
    explanations: dict[Role, str] = {}
    unavailable: dict[Role, str] = {}
    memories = dict(state.pools)
    capacities = {role: _capacity(spec, getattr(spec, role), catalog) for role in ROLE_NAMES}
    autoscaled = [role for role in ROLE_NAMES if getattr(spec, role).autoscaling is not None]

    for role in autoscaled:
        pool: PoolSpec = getattr(spec, role)
        memory = state.pool(role)
        signals = picture.pool(role) if picture is not None else None
        problem = _usable(signals, now, settings)
        capacity = capacities[role]
        if problem is None and capacity is None:
            problem = "no capacity model (set spec.model.architecture and a catalogue accelerator.type)"
        if problem is not None:
            unavailable[role] = problem
            continue
        assert picture is not None and capacity is not None and pool.autoscaling is not None
        need = (
            _prefill_need(picture, spec, capacity, capacities["decode"], memory, settings,
                          pool.autoscaling.max_replicas)
            if role == "prefill"
            else _decode_need(picture, spec, capacity, memory, settings)
        )
        if isinstance(need, str):
            unavailable[role] = need
            continue
        recommendation[role] = _clamp(need.replicas, pool)
        explanations[role] = need.explanation
        memories[role] = replace(
            memory,
            correction=need.correction,
            service_correction=need.service_correction,
            mean_prompt_tokens=need.mean_prompt if need.mean_prompt is not None else memory.mean_prompt_tokens,
            mean_output_tokens=need.mean_output if need.mean_output is not None else memory.mean_output_tokens,
        )

    # Stabilise: up at once, down only to the window's highest recommendation and past the hysteresis.
    desired: dict[Role, int] = {}
    notes: dict[Role, str] = {}
    for role, wanted in recommendation.items():
        pool = getattr(spec, role)
        now_count = current.get(role, pool.replicas)
        memory = memories[role]
        # A pool seen for the first time counts its current size as a recent recommendation: no
        # scale-down before a whole window of evidence says so.
        history = memory.recommendations or ((now, now_count),)
        window = (*tuple((t, n) for t, n in history if now - t < settings.scale_down_window_s), (now, wanted))
        memories[role] = replace(memory, recommendations=window)
        if wanted >= now_count:
            desired[role] = wanted
            continue
        stable = max(n for _, n in window)
        step = max(1, math.ceil(settings.hysteresis * now_count))
        if stable <= now_count - step:
            desired[role] = stable
            if stable > wanted:
                notes[role] = f"; down to {stable}, the highest of the last {settings.scale_down_window_s:.0f}s"
        else:
            desired[role] = _clamp(now_count, pool)
            reason = (
                f"recommended {stable} within the last {settings.scale_down_window_s:.0f}s"
                if stable > wanted else f"within hysteresis of {now_count}"
            )
            notes[role] = f"; holding {desired[role]} ({reason})"

    fitted, budget_note = _fit_budget(desired, spec, current)

    decisions: dict[str, PoolDecision] = {}
    for role in autoscaled:
        pool = getattr(spec, role)
        now_count = current.get(role, pool.replicas)
        if role in unavailable:
            held = _clamp(now_count, pool)
            decisions[role] = PoolDecision(
                role, now_count, held, f"MetricsUnavailable: {unavailable[role]}; holding {held}",
                held != now_count, False,
            )
            continue
        final = fitted[role]
        memory = memories[role]
        if final != now_count:
            memories[role] = replace(memory, last_scale_at=now)
        note = notes.get(role, "") + (budget_note if final != desired[role] else "")
        decisions[role] = PoolDecision(
            role, now_count, final, f"{role}: {explanations[role]}{note}", final != now_count, True
        )
    return decisions, PolicyState(memories)
