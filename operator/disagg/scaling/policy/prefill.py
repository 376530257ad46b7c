"""Prefill's size: the fewest replicas whose predicted share of requests over the TTFT budget, replayed
over the recent load, stays within what the SLO allows; and one step to the newest load when it is a
step up.

- The replay keeps the last `replay_s` of per-tick load (prompt tokens/s, requests/s; waiting requests
  added as load drained over `backlog_drain_s`) and predicts the misses at each candidate count: a fluid
  backlog carries a window's load beyond the pool's throughput into the next windows; within a window an
  M/M/c queue of the capacity model's prefill time gives the tail of the wait.
- Learnt online from steady ticks (`memory_ticks` of them): the effective-load factor (bursts shorter
  than the rate window queue like more load) and the TTFT floor (the long prompts' own prefill), fitted
  so that floor + M/M/c wait explains the TTFT the pool reported at the SLO percentile; the measured
  prefill time per request corrects the model's (`service_correction`); the SLO guard grows the load
  while the TTFT percentile is over the target itself with requests queueing.
- The error budget (disagg.scaling.policy.budget) widens the replay's allowance while misses stay well
  under what the SLO allows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.roofline import prefill_seconds
from disagg.capacity.sizing import size_prefill_attainment
from disagg.scaling.policy.budget import budget_gain, count_budget
from disagg.scaling.policy.model import (
    Capacity,
    first,
    fit_floor,
    fit_ttft_model,
    next_guard,
    prefill_budget,
    steady,
    update_correction,
)
from disagg.scaling.policy.picture import LoadPicture, PoolSignals
from disagg.scaling.policy.reach import OutOfReach, prompts_out_of_reach, ttft_in_reach
from disagg.scaling.policy.settings import PolicySettings
from disagg.scaling.policy.state import Need, PoolMemory
from disagg.scaling.policy.step import step_baseline, step_rate


@dataclass(frozen=True)
class _Load:
    """The prefill load of this tick."""

    tokens_per_s: float
    """Prompt tokens per second (the larger of processed and arrived)."""
    mean_prompt: float
    backlog: float
    """Waiting requests as prompt tokens per second, drained over `backlog_drain_s`."""


@dataclass(frozen=True)
class _Learnt:
    """What the pool taught the policy on this tick."""

    service_s: float
    service_correction: float
    queue_samples: tuple[tuple[int, float, float, float, float], ...]
    load_factor: float
    floor_s: float
    slo_guard: float
    out_of_reach: OutOfReach | None
    fitted_load_factors: tuple[float, float]


@dataclass(frozen=True)
class _Sized:
    replicas: int
    sized_by: str
    step: tuple[float, float] | None


def _load(signals: PoolSignals, memory: PoolMemory, settings: PolicySettings) -> _Load | str:
    mean_prompt = first(signals.mean_prompt_tokens, memory.mean_prompt_tokens)
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
    return _Load(load, mean_prompt, backlog)


def _learn(
    signals: PoolSignals, spec: InferenceServiceSpec, capacities: tuple[Capacity, Capacity], memory: PoolMemory,
    load: _Load, budget: float, settings: PolicySettings,
) -> _Learnt:
    slo = spec.slo
    capacity = capacities[0]
    service = prefill_seconds(capacity.model, capacity.accelerator, capacity.tensor_parallel, load.mean_prompt,
                              settings.efficiency)
    service_correction = memory.service_correction
    if signals.prefill_time_s is not None and signals.prefill_time_s > 0:
        service_correction = update_correction(
            replace(memory, correction=memory.service_correction), signals.prefill_time_s / service, settings
        )
    service *= service_correction
    out_of_reach = prompts_out_of_reach(signals, spec, *capacities, service_correction, settings)
    ttft = ttft_in_reach(signals, slo.percentile, out_of_reach)
    # the effective load is read where queueing shows: at a high percentile whatever the SLO's
    fit_percentile = max(slo.percentile, settings.fit_percentile) if signals.ttft_buckets else slo.percentile
    ttft_fit = ttft_in_reach(signals, fit_percentile, out_of_reach) if fit_percentile != slo.percentile else ttft
    ready = signals.ready_replicas
    rate = load.tokens_per_s / load.mean_prompt
    is_steady = ready > 0 and steady(memory, signals, settings)
    # The TTFT at the percentile = a floor (the long prompts' own prefill, which more replicas do not
    # shorten) + queueing of an effective load (bursts within the rate window queue like more load than
    # the window's mean): the load fitted to the recent steady ticks' TTFT at the fit percentile, the
    # floor then to their TTFT at the SLO's.
    queue_samples = memory.queue_samples
    if is_steady and ttft is not None and ttft_fit is not None and rate > 0:
        queue_samples = (*queue_samples, (ready, rate, service, ttft, ttft_fit))[-settings.memory_ticks:]
    # fitted at the SLO's percentile and at the fit percentile, the lower one counts: a load factor read
    # at p90, where the wait shows little, does not exceed the p99 one; one read at p99 does not size a
    # p90 pool for the heavy tail of prompt sizes that only the p99 shows
    fitted = memory.fitted_load_factors
    at_slo, floor = fit_ttft_model(tuple(s[:4] for s in queue_samples), slo.percentile, fitted[0],
                                   settings.load_factor_bounds)
    at_fit = at_slo
    if fit_percentile != slo.percentile:
        at_fit, _ = fit_ttft_model(tuple(s[:3] + s[4:] for s in queue_samples), fit_percentile, fitted[1],
                                   settings.load_factor_bounds)
    load_factor = min(at_slo, at_fit)
    if load_factor != at_slo:
        floor = fit_floor(tuple(s[:4] for s in queue_samples), slo.percentile, load_factor)
    floor = floor if queue_samples else service
    # The SLO guard: the model is a model; a TTFT percentile above the target itself is the SLO broken.
    slo_guard = memory.slo_guard
    if is_steady and ttft is not None:
        # Broken with requests queueing (a window over only for a prompt longer than the target allows is
        # not: more replicas would not have helped).
        broken = ttft > slo.ttft_ms / 1000.0 and (signals.waiting_requests or 0.0) >= 1.0
        slo_guard = next_guard(slo_guard, broken, memory, ready, settings)
    # A floor at the budget leaves nothing to size queueing against: keep a quarter of the room above the
    # mean prefill for queueing, and at least a sixteenth of the budget when the mean prompt alone takes
    # longer than the budget (a mean swollen by prompts out of reach: no count would do).
    floor = min(max(floor, service), budget - 0.25 * max(budget - service, 0.25 * budget))
    return _Learnt(service, service_correction, queue_samples, load_factor, floor, slo_guard, out_of_reach,
                   (at_slo, at_fit))


def _step(
    signals: PoolSignals, memory: PoolMemory, load: _Load, windows: list[tuple[float, float]],
    size: partial[tuple[int, float]], slo_allows: float, settings: PolicySettings,
) -> tuple[int, float, str, tuple[float, float] | None] | None:
    """The newest load as if it lasted `persist_s`, when it is a step to a new level: one step to what
    the step needs. It may predict all the misses the SLO allows (a load that, if it lasted, breaks the
    SLO itself), where the replay aims at `miss_share` of them. The newest load is the rate window's or,
    when higher and more than noise, the last scrape interval's (a step shows there first)."""
    total_tokens = sum(x[0] for x in windows)
    total_requests = sum(x[1] for x in windows)
    newest, sized = windows[-1][0], windows[-1]
    baseline = step_baseline(total_tokens / len(windows), newest, memory, signals.sampled_at, settings)
    fast = step_rate(signals, baseline * total_requests / total_tokens if total_tokens > 0 else 0.0, settings)
    if fast is not None and fast[0] * load.mean_prompt + load.backlog > newest:
        newest = fast[0] * load.mean_prompt + load.backlog
        sized = (fast[1] * load.mean_prompt + load.backlog, fast[1] + load.backlog / load.mean_prompt)
    if settings.persist_s <= 0 or newest < settings.persist_step * baseline:
        return None
    persisted, persisted_miss = size([sized], step_s=settings.persist_s, miss_share=slo_allows)
    return persisted, persisted_miss, f"{sized[0]:.0f}", (signals.sampled_at, newest)


def prefill_need(
    picture: LoadPicture,
    spec: InferenceServiceSpec,
    capacity: Capacity,
    decode_capacity: Capacity | None,
    memory: PoolMemory,
    settings: PolicySettings,
    max_replicas: int,
) -> Need | str:
    """Prefill's replicas for this tick, and what the policy learnt (or why the pool cannot be sized)."""
    signals = picture.prefill
    assert signals is not None
    load = _load(signals, memory, settings)
    if isinstance(load, str):
        return load
    budget = prefill_budget(spec, capacity, decode_capacity or capacity, load.mean_prompt, settings,
                            picture.decode.itl_s if picture.decode is not None else None)
    learnt = _learn(signals, spec, (capacity, decode_capacity or capacity), memory, load, budget, settings)

    # Replay the recent windows' load against candidate pool sizes: the fewest replicas whose predicted
    # share of requests over the TTFT budget stays within the SLO's allowance.
    rate = load.tokens_per_s / load.mean_prompt
    rate_samples = (*memory.rate_samples, (signals.sampled_at, load.tokens_per_s + load.backlog,
                                           rate + load.backlog / load.mean_prompt))
    rate_samples = tuple(x for x in rate_samples if signals.sampled_at - x[0] <= settings.replay_s)
    windows = [(x[1], x[2]) for x in rate_samples]
    total_tokens = sum(x[1] for x in rate_samples)
    total_requests = sum(x[2] for x in rate_samples)
    sized_prompt = total_tokens / total_requests if total_requests > 0 else load.mean_prompt
    sized_service = learnt.service_correction * prefill_seconds(
        capacity.model, capacity.accelerator, capacity.tensor_parallel, sized_prompt, settings.efficiency)
    slo_allows = 1.0 - spec.slo.percentile / 100.0
    out = learnt.out_of_reach
    error_budget = memory.error_budget
    # the count begins a scale-down window after the policy first sized the pool: a new service's first
    # ramp-up says nothing of the slack the sizing leaves (it stayed the count's largest part for hours)
    first = memory.sized_since if memory.sized_since is not None else signals.sampled_at
    if error_budget is not None or signals.sampled_at - first >= settings.budget_after_s:
        error_budget = count_budget(error_budget, picture, spec, settings, out.share if out else 0.0)
    gain, budget_note = budget_gain(error_budget, slo_allows, settings)
    allowed = slo_allows * settings.miss_share * gain
    size = partial(
        size_prefill_attainment, service_s=sized_service, tokens_per_replica_s=sized_prompt / sized_service,
        ttft_budget_s=budget, load_factor=learnt.load_factor * learnt.slo_guard * (1.0 + settings.prefill_headroom),
        floor_s=learnt.floor_s, max_replicas=max_replicas,
    )
    replicas, miss = size(windows, step_s=settings.tick_s, miss_share=allowed)
    sized = _Sized(replicas, f"{miss:.2%} of the last {settings.replay_s:.0f}s", memory.step)
    stepped = _step(signals, memory, load, windows, size, slo_allows, settings)
    held = replicas
    if stepped is not None and stepped[0] > replicas:
        sized = _Sized(stepped[0], f"{stepped[1]:.2%} if the newest load ({stepped[2]} tok/s) lasts "
                                   f"{settings.persist_s:.0f}s", stepped[3])
    explanation = _explain(signals, spec, load, learnt, sized, budget, allowed, budget_note)
    return Need(sized.replicas, memory.correction, learnt.service_correction, load.mean_prompt,
                memory.mean_output_tokens, explanation, learnt.load_factor, learnt.queue_samples, learnt.slo_guard,
                rate_samples, sized.step, error_budget, (out.share, out.reason) if out and out.share > 0 else None,
                held, learnt.fitted_load_factors)


def _explain(
    signals: PoolSignals, spec: InferenceServiceSpec, load: _Load, learnt: _Learnt, sized: _Sized, budget: float,
    allowed: float, budget_note: str,
) -> str:
    slo = spec.slo
    observed = f", TTFT p{slo.percentile:g} {signals.ttft_s * 1000:.0f}ms" if signals.ttft_s is not None else ""
    out = learnt.out_of_reach
    if out is not None and out.share >= 0.0005:
        ttft = ttft_in_reach(signals, slo.percentile, out)
        in_reach = f" ({ttft * 1000:.0f}ms in reach)" if ttft is not None else ""
        observed += (f"{in_reach}, {out.share:.1%} of requests out of reach (prompts over "
                     f"{out.longest_prompt:,.0f} tokens), not sized for")
    per_replica = load.mean_prompt / learnt.service_s
    guard = f" (SLO guard x{learnt.slo_guard:.2f})" if learnt.slo_guard > 1.005 else ""
    return (
        f"{load.tokens_per_s:.0f} prompt tok/s + {signals.waiting_requests or 0:.0f} waiting, "
        f"{load.mean_prompt:.0f} tok/prompt{observed}; {per_replica:.0f} tok/s per replica (service correction "
        f"{learnt.service_correction:.2f}), effective load x{learnt.load_factor:.2f}{guard}, "
        f"TTFT floor {learnt.floor_s * 1000:.0f}ms -> {sized.replicas} for {sized.sized_by} over TTFT "
        f"{budget * 1000:.0f}ms (allowed {allowed:.2%}{budget_note})"
    )

