"""Decode's size: enough replicas for the generated tokens per second and the sequences running or
waiting, averaged over the span the queue ahead of decode absorbs (`horizon_per_budget` TTFT budgets).

The capacity model gives the largest batch a replica runs within `itl_target_fraction` of the ITL target
and its KV cache, with the KV a running sequence really holds read from the pool's KV usage. The
correction is the mean step the pool runs over the model's step, pushed up while the ITL percentile
exceeds the target itself. The admission guard grows the sequences planned for while decode's own part
of the TTFT (vLLM: KV hand-off, admission, first step) exceeds what prefill leaves of the target. A step
up in the requests entering prefill sizes decode for it at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.roofline import decode_step_seconds, kv_capacity_tokens
from disagg.capacity.sizing import DecodeSizing, size_decode
from disagg.engines import engine_adapter
from disagg.scaling.policy.model import (
    Capacity,
    clamp,
    first,
    next_guard,
    prefill_budget,
    steady,
    update_correction,
)
from disagg.scaling.policy.picture import LoadPicture, PoolSignals
from disagg.scaling.policy.reach import decode_out_of_reach, quantile_in_reach
from disagg.scaling.policy.settings import PolicySettings
from disagg.scaling.policy.state import Need, PoolMemory
from disagg.scaling.policy.step import step_baseline, step_rate


@dataclass(frozen=True)
class _Load:
    """Decode's load on this tick."""

    mean_prompt: float
    mean_output: float
    generated: float | None
    running: float | None
    tokens_per_s: float
    """Generated tokens per second: the larger of what decode produced and what the requests entering
    prefill will ask for (they reach decode within seconds)."""
    sequences: float
    """Running and waiting."""


def horizon(spec: InferenceServiceSpec, settings: PolicySettings) -> float:
    """The span of recent load decode is sized for: the queue ahead of it absorbs an overload of 25 % for
    about four times the TTFT it may add (at least `min_horizon_ticks` samples' rate windows, at most
    `max_horizon_s`)."""
    budget = spec.slo.ttft_ms / 1000.0 * settings.target_fraction
    samples = settings.signal_window_s + (settings.min_horizon_ticks - 1) * settings.tick_s
    return min(max(settings.horizon_per_budget * budget, samples), settings.max_horizon_s)


def _recent(
    samples: tuple[tuple[float, ...], ...], now: float, span: float, settings: PolicySettings
) -> list[tuple[float, ...]]:
    """The samples whose rate windows fall within the last `span` seconds (the newest always)."""
    return [x for x in samples if now - x[0] <= span - settings.signal_window_s + 1e-6] or list(samples[-1:])


def _load(picture: LoadPicture, memory: PoolMemory) -> _Load | str:
    signals, prefill = picture.decode, picture.prefill
    assert signals is not None
    mean_prompt = first(
        signals.mean_prompt_tokens, prefill.mean_prompt_tokens if prefill else None, memory.mean_prompt_tokens
    )
    mean_output = first(
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
    return _Load(mean_prompt, mean_output, generated, running, max(generated or 0.0, arriving),
                 (running or 0.0) + (signals.waiting_requests or 0.0))


def _held_prompt(signals: PoolSignals, capacity: Capacity, load: _Load, settings: PolicySettings) -> float:
    """The KV cache a running sequence really holds (the requests in decode are weighted by their output
    length, not by their number): from the pool's KV usage where it reports it, else the mean request."""
    capacity_tokens = kv_capacity_tokens(capacity.model, capacity.accelerator, capacity.tensor_parallel,
                                         settings.efficiency)
    ready, running = signals.ready_replicas, load.running or 0.0
    if signals.kv_usage is not None and ready > 0 and running >= 1.0 and capacity_tokens > 0:
        return max(signals.kv_usage * capacity_tokens * ready / running - load.mean_output / 2.0, 1.0)
    return load.mean_prompt


def _correction(
    signals: PoolSignals, spec: InferenceServiceSpec, capacity: Capacity, memory: PoolMemory, load: _Load,
    held_prompt: float, settings: PolicySettings, slow_share: float,
) -> float:
    """The mean step the pool really runs (running sequences / generated tokens per second) over the
    capacity model's step at the same batch and context; a step percentile above the target itself (the
    SLO broken at step level) pushes it up further."""
    ready, running, generated = signals.ready_replicas, load.running or 0.0, load.generated
    if ready <= 0 or running / ready < 1.0:
        return memory.correction
    predicted = decode_step_seconds(
        capacity.model, capacity.accelerator, capacity.tensor_parallel, running / ready,
        held_prompt + load.mean_output / 2.0, settings.efficiency,
    )
    ratio = running / generated / predicted if generated else None
    # the ITL of the requests in reach: a context whose step alone exceeds the target is not sped up
    itl = quantile_in_reach(signals.itl_s, signals.itl_buckets, spec.slo.percentile, slow_share)
    if itl is not None:
        itl_target_full = spec.slo.itl_ms / 1000.0
        observed_itl = itl
        if generated:
            # A histogram claiming far more than twice the mean step is broken, not slow.
            observed_itl = min(observed_itl, 2.0 * running / generated)
        if observed_itl > itl_target_full:
            ratio = max(ratio or 0.0, memory.correction * observed_itl / itl_target_full)
        elif ratio is None:
            ratio = observed_itl / predicted
    return update_correction(memory, ratio, settings)


def _admission_guard(
    picture: LoadPicture, spec: InferenceServiceSpec, capacity: Capacity, prefill_capacity: Capacity | None,
    memory: PoolMemory, mean_prompt: float, settings: PolicySettings, long_share: float,
) -> tuple[float, float | None]:
    """The guard and decode's own TTFT percentile. Decode's share of the TTFT (KV hand-off, admission,
    first step) waits when bursts fill the KV cache, which the mean over the horizon hides (heavy prompts
    and a few output tokens each: a sequence stays under a second). A decode-side TTFT percentile over
    what prefill leaves of the target (its budget's remainder, or more while prefill is faster than its
    budget) grows the sequences planned for, as prefill's SLO guard grows its load."""
    signals, prefill = picture.decode, picture.prefill
    assert signals is not None
    guard = memory.slo_guard
    own_ttft = None
    if engine_adapter(spec.engine).decode_ttft_from_handoff:
        # read over the requests in reach: the prompts too long for the target also hand over the most KV
        own_ttft = quantile_in_reach(signals.ttft_s, signals.ttft_buckets, spec.slo.percentile, long_share)
    if own_ttft is not None and signals.ready_replicas > 0 and steady(memory, signals, settings):
        ttft_target = spec.slo.ttft_ms / 1000.0
        allowance = ttft_target - prefill_budget(spec, prefill_capacity or capacity, capacity, mean_prompt,
                                                 settings, signals.itl_s)
        if prefill is not None and prefill.ttft_s is not None:
            allowance = max(allowance, ttft_target - prefill.ttft_s)
        guard = next_guard(guard, own_ttft > allowance, memory, signals.ready_replicas, settings)
    return guard, own_ttft


def _size(
    capacity: Capacity, tokens_per_s: float, sequences: float, held_prompt: float, mean_output: float,
    itl_target: float, correction: float, settings: PolicySettings,
) -> DecodeSizing:
    return size_decode(
        capacity.model, capacity.accelerator, capacity.tensor_parallel,
        generation_tokens_per_s=tokens_per_s, concurrent_sequences=sequences, mean_prompt_tokens=held_prompt,
        mean_output_tokens=mean_output, itl_target_s=itl_target, correction=correction,
        headroom=settings.decode_headroom, eff=settings.efficiency,
    )


@dataclass(frozen=True)
class _Plan:
    """What decode is sized with on this tick."""

    held_prompt: float
    correction: float
    guard: float
    itl_target: float


def _stepped(
    picture: LoadPicture, capacity: Capacity, memory: PoolMemory, load: _Load, plan: _Plan,
    rate_samples: tuple[tuple[float, ...], ...], settings: PolicySettings,
) -> tuple[DecodeSizing, float, float] | None:
    """A step up: the requests of the last scrape interval at least `persist_step` times the mean load of
    the last `max_horizon_s` (prefill's test against its replay; not against the newest windows, which
    already show part of the step) -> size for them at once, not once the windows have caught up. The
    sequences grow with them (Little's law). Returns the sizing, the step's load and what it was sized for."""
    signals, prefill = picture.decode, picture.prefill
    assert signals is not None
    usual_tokens = step_baseline(sum(x[1] for x in rate_samples) / len(rate_samples), load.tokens_per_s, memory,
                                 signals.sampled_at, settings)
    # The requests entering prefill, where the prefill pool reports them: decode admits what prefill
    # hands over in clumps (a batch's requests at once), far from Poisson within one short interval.
    entering = prefill if prefill is not None and prefill.requests_last is not None else signals
    fast = step_rate(entering, usual_tokens / load.mean_output, settings)
    if fast is None or settings.persist_s <= 0:
        return None
    fast_tokens, sized_tokens = fast[0] * load.mean_output, fast[1] * load.mean_output
    if fast_tokens <= 0 or fast_tokens < settings.persist_step * usual_tokens:
        return None
    # the time a sequence stays per token it generates (the step), at most the planned step: a pool
    # whose generated rate still lags a start-up would otherwise be credited with a long one
    stay_s = min(load.sequences / load.generated, plan.itl_target) if load.generated else 0.0
    sizing = _size(capacity, sized_tokens, max(load.sequences, stay_s * sized_tokens) * plan.guard,
                   plan.held_prompt, load.mean_output, plan.itl_target, plan.correction, settings)
    return sizing, fast_tokens, sized_tokens


def decode_need(
    picture: LoadPicture,
    spec: InferenceServiceSpec,
    capacity: Capacity,
    memory: PoolMemory,
    settings: PolicySettings,
    current: int,
    prefill_capacity: Capacity | None,
) -> Need | str:
    """Decode's replicas for this tick (`current`: the pool's replicas as the Deployment has them now)."""
    signals = picture.decode
    assert signals is not None
    load = _load(picture, memory)
    if isinstance(load, str):
        return load
    held_prompt = _held_prompt(signals, capacity, load, settings)
    long_share, slow_share = decode_out_of_reach(picture, spec, prefill_capacity or capacity, capacity, settings)
    correction = _correction(signals, spec, capacity, memory, load, held_prompt, settings, slow_share)
    guard, own_ttft = _admission_guard(picture, spec, capacity, prefill_capacity, memory, load.mean_prompt,
                                       settings, long_share)
    plan = _Plan(held_prompt, correction, guard, spec.slo.itl_ms / 1000.0 * settings.itl_target_fraction)
    # Size for the mean load over the horizon the queue ahead of decode absorbs (request sizes vary a
    # lot from one rate window to the next when prompts are heavy-tailed).
    rate_samples = (*memory.rate_samples,
                    (signals.sampled_at, load.tokens_per_s, load.sequences, held_prompt, load.mean_output))
    rate_samples = tuple(x for x in rate_samples if signals.sampled_at - x[0] <= settings.max_horizon_s)
    recent = _recent(rate_samples, signals.sampled_at, horizon(spec, settings), settings)
    count = len(recent)
    sizing = _size(capacity, sum(x[1] for x in recent) / count, sum(x[2] for x in recent) / count * guard,
                   sum(x[3] for x in recent) / count, sum(x[4] for x in recent) / count, plan.itl_target,
                   correction, settings)
    step, step_note, held = memory.step, "", sizing.replicas
    stepped = _stepped(picture, capacity, memory, load, plan, rate_samples, settings)
    if stepped is not None and stepped[0].replicas > sizing.replicas:
        sizing, step = stepped[0], (signals.sampled_at, stepped[1])
        step_note = (f" (a step to {stepped[1]:.0f} gen tok/s in the last scrape interval, sized for "
                     f"{stepped[2]:.0f})")
    if step is memory.step and clamp(sizing.replicas, spec.decode) > current:
        # Up through the rate windows (a step that reached them before a scrape interval showed it as
        # one): their load is the new level a further step is measured against, or the new level's
        # noise reads as a second step (seen: 1 -> 2, then 2 -> 3 eight seconds later on a noisy
        # interval). Prefill's replay already weighs the new level.
        step = (signals.sampled_at, load.tokens_per_s)
    explanation = _explain(signals, spec, load, plan, sizing, own_ttft, step_note)
    return Need(sizing.replicas, correction, 1.0, load.mean_prompt, load.mean_output, explanation, slo_guard=guard,
                rate_samples=rate_samples, step=step, held_replicas=held)


def _explain(
    signals: PoolSignals, spec: InferenceServiceSpec, load: _Load, plan: _Plan, sizing: DecodeSizing,
    own_ttft: float | None, step_note: str,
) -> str:
    percentile = spec.slo.percentile
    observed = f", ITL p{percentile:g} {signals.itl_s * 1000:.1f}ms" if signals.itl_s is not None else ""
    kv = f", KV {signals.kv_usage:.0%}" if signals.kv_usage is not None else ""
    if own_ttft is not None:
        observed += f", own TTFT p{percentile:g} {own_ttft * 1000:.0f}ms"
    guarded = f" x{plan.guard:.2f} (admission guard)" if plan.guard > 1.005 else ""
    return (
        f"{load.tokens_per_s:.0f} gen tok/s, {load.sequences:.0f} sequences{guarded}{kv}{observed}; "
        f"{sizing.max_batch:.0f} seqs / {sizing.tokens_per_s_per_replica:.0f} tok/s per replica "
        f"(correction {plan.correction:.2f}) -> {sizing.replicas}{step_note} for ITL"
        f" {sizing.predicted_itl_s * 1000:.1f}ms <= {plan.itl_target * 1000:.1f}ms"
    )
