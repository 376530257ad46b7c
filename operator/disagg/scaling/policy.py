"""The autoscaling policy: a pure function from one load picture to the desired replicas of each pool.

The operator calls `decide()` on every tick with the signals it read from Prometheus; the simulator
(`disagg simulate`, bench/autoscale.py) calls the very same function with signals computed from a
replayed trace. No I/O, no clock: time comes in as `now`, memory as `PolicyState` and goes out as a new
`PolicyState`.

How a pool is sized
- Prefill, by replay: the policy keeps the last `replay_s` of per-tick load (prompt tokens/s, requests/s;
  the current tick's waiting requests added as load drained over `backlog_drain_s`) and picks the fewest
  replicas that would have kept the predicted share of requests over the TTFT budget within
  `miss_share` of what the SLO allows (1 - percentile/100). The budget is `target_fraction` of the TTFT
  target minus the KV hand-off and the first decode step. The prediction has two time scales: a fluid
  backlog carries a window's load beyond the pool's throughput into the next windows; within a window an
  M/M/c queue (the capacity model's prefill time of the mean prompt) gives the tail of the wait.
- Prefill, the error budget: the SLO allows 1 - percentile/100 of the requests over the TTFT target
  over time, not in every 5 minutes. The policy counts the requests the engines' TTFT histograms put
  over the target (an exponentially weighted count over `budget_window_s`); while they stay below
  `budget_spend` of the allowance, the replay's allowance grows in proportion (at most
  `max_budget_gain` times), and it is back to `miss_share` once they reach it. A service that keeps
  its SLO with room to spare gives the room back as fewer replicas; one near its SLO is sized as before.
  The count starts empty (a restarted operator sizes as without it until `budget_min_requests`).
- Prefill, learnt online from what the pool did (steady ticks only, `memory_ticks` of them): the
  effective load factor k (bursts shorter than the rate window queue like k x the window's mean load)
  and the TTFT floor (the part of the TTFT at the percentile that more replicas do not shorten: the
  long prompts' own prefill) are fitted so that floor + M/M/c wait of k x load explains the TTFT the
  pool reported at the SLO percentile; the measured prefill time per request corrects the model's
  prefill time (`service_correction`).
- Decode: the load is generated tokens per second (the larger of what decode produced and what the
  requests entering prefill will ask for) and the sequences running or waiting, averaged over the span
  the queue ahead of decode absorbs (`horizon_per_budget` TTFT budgets). The capacity model gives the
  largest batch a replica runs within `itl_target_fraction` of the ITL target and its KV cache, with
  the KV a running sequence really holds read from the pool's KV usage; the pool gets enough replicas
  for both. Its correction is the mean step the pool runs (running sequences / generated tokens per
  second) over the model's step, pushed further up while the ITL percentile exceeds the target itself.
- A step up, both pools: when the newest load (the rate window's or, sooner, the last scrape
  interval's requests/s if they are more than noise: `step_noise_z`) is at least `persist_step` times the
  recent mean (prefill: the replay's; decode: the last `max_horizon_s`), the pool is also sized for that
  load as if it lasted `persist_s`; for `max_horizon_s` after, only a step above that one counts again.
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
from functools import partial
from typing import Literal, NamedTuple

from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec
from disagg.capacity.models import ModelConfigError, ModelShape, builtin_model, from_architecture
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_step_seconds,
    kv_capacity_tokens,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.capacity.sizing import (
    queue_wait_percentile,
    size_decode,
    size_prefill_attainment,
)
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog
from disagg.catalog.engines import ENGINES

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
    request_rate_last: float | None = None
    """Requests per second over the last scrape interval only (Prometheus `irate`): noisier than
    `request_rate`, but it shows a step up a window sooner."""
    requests_last: float | None = None
    """How many requests that interval held (`idelta`): how far its rate is from noise."""
    kv_usage: float | None = None
    """Mean KV-cache occupancy of the pool's replicas, 0..1."""
    ttft_s: float | None = None
    """Time to first token at the SLO percentile, as the pool's engines measure it."""
    ttft_buckets: tuple[tuple[float, float], ...] = ()
    """The rate window's TTFT histogram: (upper bound, cumulative requests per second), ascending."""
    itl_s: float | None = None
    """Inter-token latency at the SLO percentile."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    prefill_time_s: float | None = None
    """Mean time a request spends in prefill compute, without queueing (vLLM:
    `vllm:request_prefill_time_seconds` sum / count); optional, sharpens the prefill correction."""

    @property
    def last_interval_s(self) -> float | None:
        """The last scrape interval's length: its request count over its rate (`idelta` / `irate` of one
        counter); None without requests in it."""
        rate, count = self.request_rate_last, self.requests_last
        if rate is None or count is None or rate <= 0 or count <= 0:
            return None
        return count / rate


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
    hysteresis: float = 0.05
    """A scale-down must remove at least this share of the pool (and at least one replica): one replica
    up to 20, two up to 40. (At 10 % an 11-replica pool could not go to 10: on the Azure code day that
    held 6 % more accelerator-hours for 0.08 points of attainment; the window already keeps a pool from
    flapping.)"""
    staleness_s: float = 90.0
    """Signals older than this are treated as missing."""
    prefill_headroom: float = 0.0
    """Extra share of prefill load provisioned for (the replay and the learnt effective load already
    provision for what the pool saw)."""
    decode_headroom: float = 0.0
    """Extra share of decode load provisioned for."""
    target_fraction: float = 0.85
    """Plan prefill for this share of the TTFT target, keeping the rest as margin."""
    itl_target_fraction: float = 0.95
    """Plan decode's mean step for this share of the ITL target (the rest covers replicas busier than
    the mean). At 0.85 the MI300X decode pools held a replica more than static-best on the Mooncake
    hours (5 vs 4, 3.3 vs 2) with ITL p99 under 46 ms of 50; at 0.95 the observed ITL p99 stays at or
    under 49 ms on every benchmark workload (1.0 sizes the same: the KV cache binds there)."""
    backlog_drain_s: float = 60.0
    """Waiting requests are added to the load as if they had to be served within this time."""
    correction_smoothing: float = 0.1
    """Weight of a newest observed/predicted ratio above the running correction (things got worse)."""
    correction_decay: float = 0.1
    """Weight of a newest ratio below the running correction (bursts are provisioned for by the replay
    and the effective load, not by the correction)."""
    correction_bounds: tuple[float, float] = (0.6, 6.0)
    """The correction never leaves this range (a broken histogram must not run the pool to its max)."""
    signal_window_s: float = 30.0
    """The rate window of the signals: latency observed less than this after the ready count changed
    mixes two pool sizes and does not update what the policy learns."""
    memory_ticks: int = 40
    """How many recent steady ticks the prefill effective load and TTFT floor are fitted to."""
    load_factor_bounds: tuple[float, float] = (1.0, 8.0)
    """The effective-load factor stays in this range: never smoother than Poisson arrivals."""
    slo_guard_step: float = 0.05
    """When a steady tick's TTFT at the percentile exceeds the target itself (the SLO broken, whatever the
    model predicted), the prefill effective load grows by this share ..."""
    slo_guard_decay: float = 0.005
    """... and shrinks back towards the fitted one by this share on every tick that keeps the SLO: the
    guard settles where about decay / (step + decay) of the rate windows (here 1 in 11) miss the target."""
    slo_guard_bounds: tuple[float, float] = (1.0, 4.0)
    replay_s: float = 300.0
    """Prefill is sized by replaying the load of this many recent seconds against candidate pool sizes."""
    persist_s: float = 60.0
    """Prefill is also sized for the newest load lasting this long: a step up is answered as soon as the
    signals show it, not once the replay has seen enough of it to outweigh the calm before (that took
    10-20 ticks). 0 turns the step test off, for decode too."""
    persist_step: float = 2.0
    """... but only when that load is at least this multiple of the replay's mean: a step to a new level,
    not one of the bursts the replay already provisions for (sizing every window as if it lasted cost
    7-28 % more accelerator-hours on the four production traces' hours for 0.0-0.2 points of attainment;
    at 1.5x still 0-10 %, at 2x nothing)."""
    step_noise_z: float = 4.0
    """The last scrape interval counts as a step only when its request count is this many standard
    deviations (Poisson) above what the recent load would bring in the same time: a 1-s interval at
    6 req/s reaches 2x by chance every few minutes, 6 + 4 x sqrt(6) = 16 requests about once in 2,000."""
    step_upper_sd: float = 1.0
    """A step seen in the last scrape interval is sized for its request count plus this many standard
    deviations (46 requests in 2 s are a level of 23 +- 3.4 req/s)."""
    miss_share: float = 0.5
    """Prefill aims at this share of the misses the SLO allows (1 - percentile/100) over the replay."""
    budget_window_s: float = 21600.0
    """The error budget's memory (time constant of its weighted counts of requests and of those over the
    TTFT target). Hours, not minutes: with 1 h the quiet hours after a busy peak spent again what the
    peak had used (Azure code day 99.35 % -> 99.28 %; with plain 1-h windows 99.09 %) ..."""
    budget_spend: float = 0.5
    """... while the share over the target stays below this share of what the SLO allows, the replay's
    allowance grows by budget_spend x allowance / share ..."""
    max_budget_gain: float = 4.0
    """... by at most this factor (miss_share 0.5 x 4: the replay may plan for twice the SLO's allowance
    while the last hours kept well inside it) ..."""
    budget_min_requests: float = 2000.0
    """... and only once the count holds this many requests (20 misses at a 1 % allowance; a share of
    fewer says little about a 1 % tail)."""
    horizon_per_budget: float = 4.0
    """Decode is sized for the mean load over this many TTFT budgets (at least one rate window, at most
    `max_horizon_s`): the queue ahead of it absorbs a 25 % overload for about four budgets."""
    max_horizon_s: float = 180.0
    min_horizon_ticks: int = 2
    """Decode's horizon spans at least this many ticks' samples: with a 1-s TTFT target four budgets are
    3 s, and decode sized on one scrape of its running-sequences gauge followed that gauge's noise (Azure
    conversation hour: a one-tick burst asked for a 5th replica now and then, the scale-down window held
    it on 361 of 399 ticks, where 4 keep the same 99.96 %)."""
    efficiency: Efficiency = DEFAULT_EFFICIENCY
    """Roofline efficiency factors of the capacity-model prior."""
    kv_over_rdma: bool = True
    """Whether KV hand-offs run over RDMA (else TCP) when predicting the TTFT budget."""


class ErrorBudget(NamedTuple):
    """Prefill's error budget: exponentially weighted counts (time constant `budget_window_s`)."""

    sampled_at: float
    """The sample the counts last took in."""
    requests: float
    over: float
    """Of those, the requests over the TTFT target."""


@dataclass(frozen=True)
class PoolMemory:
    """What the policy remembers about one pool between ticks."""

    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, replicas) recommended during the scale-down window."""
    last_scale_at: float | None = None
    correction: float = 1.0
    """Decode only: observed / predicted step time, smoothed: multiplies the capacity model's steps."""
    service_correction: float = 1.0
    """Prefill only: observed / predicted prefill time per request, smoothed: the capacity model's
    throughput error (engine speed, and the spread of prompt sizes around the mean)."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    load_factor: float = 1.0
    """Prefill only: effective load / measured load (arrivals burstier than Poisson within the rate window
    queue like more load), fitted to the TTFT the pool reported."""
    queue_samples: tuple[tuple[int, float, float, float], ...] = ()
    """Prefill only: (ready replicas, requests/s, mean prefill s, TTFT at the SLO percentile) of recent
    steady ticks, to which the effective load and the TTFT floor are fitted."""
    slo_guard: float = 1.0
    """Prefill: extra effective-load factor while the observed TTFT breaks the SLO more often than the
    model expects (see `PolicySettings.slo_guard_step`); decode: extra share of sequences planned for
    while decode's own part of the TTFT (admission into a full KV cache) breaks it."""
    rate_samples: tuple[tuple[float, ...], ...] = ()
    """Prefill: (sample time, prompt tokens/s incl. backlog, requests/s) of recent ticks; decode: (sample
    time, generated tokens/s, sequences, mean prompt, mean output)."""
    step: tuple[float, float] | None = None
    """(sample time, load) of the last step up sized for at once (prefill prompt tok/s, decode generated
    tok/s): the next one must be a step above it, not the noise of the same level."""
    ready: int | None = None
    """Ready replicas at the last tick, and since when (sample time) that count holds."""
    ready_since: float | None = None
    error_budget: ErrorBudget | None = None
    """Prefill only: requests, and those over the TTFT target, lately."""


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
    # a multi-node worker counts as one replica over all its accelerators (the roofline's TP term is
    # an approximation of its layout; the online correction learns the rest)
    return _Capacity(model, accelerator, pool.worker_accelerators if pool.multi_node else pool.parallelism.tensor)


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
    load_factor: float = 1.0
    queue_samples: tuple[tuple[int, float, float, float], ...] = ()
    slo_guard: float = 1.0
    rate_samples: tuple[tuple[float, ...], ...] = ()
    step: tuple[float, float] | None = None
    error_budget: ErrorBudget | None = None


def _horizon(spec: InferenceServiceSpec, settings: PolicySettings) -> float:
    """The span of recent load decode is sized for: the queue ahead of it absorbs an overload of 25 % for
    about four times the TTFT it may add (at least `min_horizon_ticks` samples' rate windows, at most
    `max_horizon_s`)."""
    budget = spec.slo.ttft_ms / 1000.0 * settings.target_fraction - spec.slo.itl_ms / 1000.0
    budget = max(budget, spec.slo.ttft_ms / 1000.0 * 0.25)
    samples = settings.signal_window_s + (settings.min_horizon_ticks - 1) * settings.tick_s
    return min(max(settings.horizon_per_budget * budget, samples), settings.max_horizon_s)


def _recent(
    samples: tuple[tuple[float, ...], ...], now: float, horizon: float, settings: PolicySettings
) -> list[tuple[float, ...]]:
    """The samples whose rate windows fall within the last `horizon` seconds (the newest always)."""
    return [x for x in samples if now - x[0] <= horizon - settings.signal_window_s + 1e-6] or list(samples[-1:])


def _step_rate(
    signals: PoolSignals | None, baseline_rps: float, settings: PolicySettings
) -> tuple[float, float] | None:
    """The last scrape interval's requests/s, and the upper end of what its count says (what a step is
    sized for), when they are more than Poisson noise around `baseline_rps` over the interval, else None."""
    if signals is None or (length := signals.last_interval_s) is None:
        return None
    rate, count = signals.request_rate_last or 0.0, signals.requests_last or 0.0  # both > 0 with a length
    expected = max(baseline_rps, 0.0) * length
    if count < expected + settings.step_noise_z * math.sqrt(max(expected, 1.0)):
        return None
    # One interval is a small sample of the new level: size for its upper end (a pool scaled up too far
    # comes back after the scale-down window; one left short breaks the SLO until the windows catch up).
    return rate, rate * (count + settings.step_upper_sd * math.sqrt(count)) / count


def _step_baseline(usual: float, newest: float, memory: PoolMemory, now: float, settings: PolicySettings) -> float:
    """The load a step up is measured against: the recent mean or, for `max_horizon_s` after a step was
    sized for, the level of that step as best known: what its interval showed or, once the rate window
    has caught up, the window's load (a step first seen in an interval it only partly filled reads low,
    and the noise of the new level is not a second step)."""
    if memory.step is not None and now - memory.step[0] <= settings.max_horizon_s:
        return max(usual, memory.step[1], newest)
    return usual


def _steady(memory: PoolMemory, signals: PoolSignals, settings: PolicySettings) -> bool:
    """Whether the pool had its current ready count over the whole rate window of these signals."""
    if memory.ready != signals.ready_replicas or memory.ready_since is None:
        return False
    return signals.sampled_at - memory.ready_since >= settings.signal_window_s


def _quantile(values: tuple[float, ...], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered))))]


def fit_ttft_model(
    samples: tuple[tuple[int, float, float, float], ...],
    percentile: float,
    load_factor: float,
    bounds: tuple[float, float],
    steps: tuple[float, ...] = (1.5, 1.2, 1.05),
    min_gain: float = 0.02,
) -> tuple[float, float]:
    """(load factor k, floor F) with which F + the M/M/c wait at `percentile` of k x each sample's
    arrivals best explains the TTFT observed at that percentile (least absolute residuals; F is the
    median residual). A few steps around `load_factor` per call: the fit follows the pool over ticks, and
    holds unless a step explains the observations better by at least `min_gain` (so it does not wander
    where they cannot tell, such as when no queueing is seen or predicted).

    Samples are (ready replicas, requests/s, mean prefill s, observed TTFT s). k > 1: arrivals burstier
    than Poisson within the rate window queue like more load; F: the long prompts' own prefill, which
    more replicas do not shorten.
    """
    low, high = bounds
    if not samples:
        return load_factor, 0.0
    scale = sum(sample[3] for sample in samples) / len(samples) or 1.0
    best: tuple[float, float, float] | None = None
    candidates = [load_factor] + [min(max(load_factor * f, low), high) for step in steps for f in (step, 1 / step)]
    for k in candidates:
        waits = [
            queue_wait_percentile(ready, min(k * rate, 0.999 * ready / service), service, percentile)
            for ready, rate, service, _ in samples
        ]
        residuals = [sample[3] - wait for sample, wait in zip(samples, waits, strict=True)]
        floor = max(_quantile(tuple(residuals), 0.5), 0.0)
        loss = sum(abs(r - floor) for r in residuals) / len(residuals) / scale
        if best is None or loss < best[0] * (1.0 - min_gain) - 1e-9:
            best = (loss, k, floor)
    assert best is not None
    return best[1], best[2]


def _next_guard(guard: float, broken: bool, memory: PoolMemory, ready: int, settings: PolicySettings) -> float:
    """A guard after one steady tick: up by `slo_guard_step` when the SLO was broken while the pool had
    what the policy last asked for (a pool still short of it breaks the SLO without the model being
    wrong), else back by `slo_guard_decay`; within `slo_guard_bounds`."""
    low, high = settings.slo_guard_bounds
    asked = memory.recommendations[-1][1] if memory.recommendations else 0
    if broken and ready >= asked:
        return min(guard * (1.0 + settings.slo_guard_step), high)
    return max(guard * (1.0 - settings.slo_guard_decay), low)


def _prefill_budget(
    spec: InferenceServiceSpec, prefill: _Capacity, decode: _Capacity, mean_prompt: float, settings: PolicySettings
) -> float:
    """What the prefill side may take of the TTFT target: the rest goes to the KV hand-off and the first
    decode step, with a margin."""
    handoff = kv_transfer_seconds(
        prefill.model, mean_prompt,
        kv_link_bytes_per_s(prefill.tensor_parallel, decode.tensor_parallel, settings.kv_over_rdma),
        settings.efficiency,
    )
    ttft = spec.slo.ttft_ms / 1000.0
    return max(ttft * settings.target_fraction - handoff - spec.slo.itl_ms / 1000.0, ttft * 0.25)


def share_above(bound: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Share of a cumulative histogram's observations above `bound`, linear within the bucket holding
    it (histogram_quantile's assumption); None for an empty histogram."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in buckets:
        if bound <= upper:
            if math.isinf(upper):
                return (total - lower_count) / total
            within = (bound - lower_bound) / (upper - lower_bound) if upper > lower_bound else 1.0
            below = lower_count + (count - lower_count) * min(max(within, 0.0), 1.0)
            return (total - below) / total
        lower_bound, lower_count = upper, count
    return 0.0


def _over_target(picture: LoadPicture, spec: InferenceServiceSpec) -> tuple[float, float] | None:
    """Requests per second whose first token came in the rate window, and the share of them over the
    TTFT target, as the engines' histograms tell it: decode's where it counts from the router (SGLang),
    else prefill's over the target less decode's own part at the percentile (vLLM: hand-off, admission,
    first step; an overestimate)."""
    target = spec.slo.ttft_ms / 1000.0
    decode, prefill = picture.decode, picture.prefill
    if decode is not None and decode.ttft_buckets and not ENGINES[spec.engine.kind].decode_ttft_from_handoff:
        buckets, bound = decode.ttft_buckets, target
    elif prefill is not None and prefill.ttft_buckets:
        own = decode.ttft_s if decode is not None and decode.ttft_s is not None else 0.0
        buckets, bound = prefill.ttft_buckets, max(target - own, 0.0)
    else:
        return None
    share = share_above(bound, buckets)
    return None if share is None else (buckets[-1][1], share)


def _count_budget(
    budget: ErrorBudget | None, picture: LoadPicture, spec: InferenceServiceSpec, settings: PolicySettings,
) -> ErrorBudget | None:
    """The error budget after this tick. A tick adds the requests of the time since the last one it
    counted (at most a rate window), at the share over the target its window shows."""
    signals = picture.prefill
    assert signals is not None
    observed = _over_target(picture, spec)
    if observed is None or (budget is not None and signals.sampled_at <= budget.sampled_at):
        return budget
    if budget is None:
        budget, since = ErrorBudget(signals.sampled_at, 0.0, 0.0), settings.signal_window_s
    else:
        since = min(signals.sampled_at - budget.sampled_at, settings.signal_window_s)
    requests = observed[0] * since
    over = requests * min(max(observed[1], 0.0), 1.0)
    kept = math.exp(-(signals.sampled_at - budget.sampled_at) / settings.budget_window_s)
    return ErrorBudget(signals.sampled_at, budget.requests * kept + requests, budget.over * kept + over)


def _budget_gain(budget: ErrorBudget | None, slo_allows: float, settings: PolicySettings) -> tuple[float, str]:
    """How far the replay's allowance grows for the error budget left unspent, and a note saying why."""
    if budget is None or budget.requests < settings.budget_min_requests or slo_allows <= 0:
        return 1.0, ""
    share = budget.over / budget.requests
    spend = settings.budget_spend * slo_allows
    gain = min(settings.max_budget_gain, spend / share) if share > 0 else settings.max_budget_gain
    if gain <= 1.0:
        return 1.0, ""
    return gain, (f"; error budget: {share:.2%} over the target lately, allowance x{gain:.1f}")


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
    budget = _prefill_budget(spec, capacity, decode_capacity or capacity, mean_prompt, settings)

    service = prefill_seconds(capacity.model, capacity.accelerator, capacity.tensor_parallel, mean_prompt, eff)
    service_correction = memory.service_correction
    if signals.prefill_time_s is not None and signals.prefill_time_s > 0:
        service_correction = _update_correction(
            replace(memory, correction=memory.service_correction), signals.prefill_time_s / service, settings
        )
    service *= service_correction
    ready = signals.ready_replicas
    rate = load / mean_prompt
    steady = ready > 0 and _steady(memory, signals, settings)

    # The TTFT at the percentile = a floor (the long prompts' own prefill, which more replicas do not
    # shorten) + queueing of an effective load (bursts within the rate window queue like more load than
    # the window's mean): both fitted to the recent steady ticks' observed TTFT.
    queue_samples = memory.queue_samples
    if steady and signals.ttft_s is not None and rate > 0:
        queue_samples = (*queue_samples, (ready, rate, service, signals.ttft_s))[-settings.memory_ticks:]
    load_factor, floor = fit_ttft_model(queue_samples, slo.percentile, memory.load_factor,
                                        settings.load_factor_bounds)
    floor = floor if queue_samples else service
    # The SLO guard: the model is a model; a TTFT percentile above the target itself is the SLO broken.
    slo_guard = memory.slo_guard
    if steady and signals.ttft_s is not None:
        # Broken with requests queueing (a window over only for a prompt longer than the target allows is
        # not: more replicas would not have helped).
        broken = signals.ttft_s > slo.ttft_ms / 1000.0 and (signals.waiting_requests or 0.0) >= 1.0
        slo_guard = _next_guard(slo_guard, broken, memory, ready, settings)
    # A floor at the budget leaves nothing to size queueing against: keep a quarter of it for queueing.
    floor = min(max(floor, service), budget - 0.25 * (budget - service))

    # Replay the recent windows' load against candidate pool sizes: the fewest replicas whose predicted
    # share of requests over the TTFT budget stays within the SLO's allowance.
    rate_samples = (*memory.rate_samples, (signals.sampled_at, load + backlog, rate + backlog / mean_prompt))
    rate_samples = tuple(x for x in rate_samples if signals.sampled_at - x[0] <= settings.replay_s)
    windows = [(x[1], x[2]) for x in rate_samples]
    total_tokens = sum(x[1] for x in rate_samples)
    total_requests = sum(x[2] for x in rate_samples)
    sized_prompt = total_tokens / total_requests if total_requests > 0 else mean_prompt
    sized_service = service_correction * prefill_seconds(
        capacity.model, capacity.accelerator, capacity.tensor_parallel, sized_prompt, eff)
    slo_allows = 1.0 - slo.percentile / 100.0
    error_budget = _count_budget(memory.error_budget, picture, spec, settings)
    gain, budget_note = _budget_gain(error_budget, slo_allows, settings)
    allowed = slo_allows * settings.miss_share * gain
    size = partial(
        size_prefill_attainment, service_s=sized_service, tokens_per_replica_s=sized_prompt / sized_service,
        ttft_budget_s=budget, load_factor=load_factor * slo_guard * (1.0 + settings.prefill_headroom),
        floor_s=floor, max_replicas=max_replicas,
    )
    replicas, miss = size(windows, step_s=settings.tick_s, miss_share=allowed)
    # The newest load as if it lasted `persist_s`, when it is a step to a new level: one step to what the
    # step needs. It may predict all the misses the SLO allows (a load that, if it lasted, breaks the SLO
    # itself), where the replay aims at `miss_share` of them. The newest load is the rate window's or,
    # when higher and more than noise, the last scrape interval's (a step shows there first).
    sized_by = f"{miss:.2%} of the last {settings.replay_s:.0f}s"
    mean_tokens = total_tokens / len(windows)
    newest, sized = windows[-1][0], windows[-1]
    baseline = _step_baseline(mean_tokens, newest, memory, signals.sampled_at, settings)
    fast = _step_rate(signals, baseline * total_requests / total_tokens if total_tokens > 0 else 0.0, settings)
    if fast is not None and fast[0] * mean_prompt + backlog > newest:
        newest = fast[0] * mean_prompt + backlog
        sized = (fast[1] * mean_prompt + backlog, fast[1] + backlog / mean_prompt)
    step = memory.step
    if settings.persist_s > 0 and newest >= settings.persist_step * baseline:
        persisted, persisted_miss = size([sized], step_s=settings.persist_s, miss_share=slo_allows)
        if persisted > replicas:
            replicas, step = persisted, (signals.sampled_at, newest)
            sized_by = (f"{persisted_miss:.2%} if the newest load ({sized[0]:.0f} tok/s) lasts "
                        f"{settings.persist_s:.0f}s")
    observed_text = f", TTFT p{slo.percentile:g} {signals.ttft_s * 1000:.0f}ms" if signals.ttft_s is not None else ""
    per_replica = mean_prompt / service
    explanation = (
        f"{load:.0f} prompt tok/s + {signals.waiting_requests or 0:.0f} waiting, {mean_prompt:.0f} tok/prompt"
        f"{observed_text}; {per_replica:.0f} tok/s per replica (service correction {service_correction:.2f}), "
        f"effective load x{load_factor:.2f}{f' (SLO guard x{slo_guard:.2f})' if slo_guard > 1.005 else ''}, "
        f"TTFT floor {floor * 1000:.0f}ms"
        f" -> {replicas} for {sized_by} over TTFT {budget * 1000:.0f}ms"
        f" (allowed {allowed:.2%}{budget_note})"
    )
    return _Need(replicas, memory.correction, service_correction, mean_prompt, memory.mean_output_tokens,
                 explanation, load_factor, queue_samples, slo_guard, rate_samples, step, error_budget)


def _decode_need(
    picture: LoadPicture,
    spec: InferenceServiceSpec,
    capacity: _Capacity,
    memory: PoolMemory,
    settings: PolicySettings,
    current: int,
    prefill_capacity: _Capacity | None,
) -> _Need | str:
    """`current`: the pool's replicas as the Deployment has them now."""
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
    itl_target = spec.slo.itl_ms / 1000.0 * settings.itl_target_fraction

    ready = signals.ready_replicas
    # The KV cache a running sequence really holds (the requests in decode are weighted by their output
    # length, not by their number): from the pool's KV usage where it reports it, else the mean request.
    held_prompt = mean_prompt
    capacity_tokens = kv_capacity_tokens(capacity.model, capacity.accelerator, capacity.tensor_parallel, eff)
    if signals.kv_usage is not None and ready > 0 and (running or 0.0) >= 1.0 and capacity_tokens > 0:
        held_prompt = max(signals.kv_usage * capacity_tokens * ready / (running or 1.0) - mean_output / 2.0, 1.0)

    # Correction: the mean step the pool really runs (running sequences / generated tokens per second)
    # over the capacity model's step at the same batch and context; a step percentile above the target
    # itself (the SLO broken at step level) pushes it up further.
    correction = memory.correction
    if ready > 0 and (running or 0.0) / ready >= 1.0:
        batch = (running or 0.0) / ready
        predicted = decode_step_seconds(
            capacity.model, capacity.accelerator, capacity.tensor_parallel, batch, held_prompt + mean_output / 2.0,
            eff,
        )
        ratio = (running or 0.0) / generated / predicted if generated else None
        if signals.itl_s is not None:
            itl_target_full = spec.slo.itl_ms / 1000.0
            observed_itl = signals.itl_s
            if generated:
                # A histogram claiming far more than twice the mean step is broken, not slow.
                observed_itl = min(observed_itl, 2.0 * (running or 0.0) / generated)
            if observed_itl > itl_target_full:
                ratio = max(ratio or 0.0, memory.correction * observed_itl / itl_target_full)
            elif ratio is None:
                ratio = observed_itl / predicted
        correction = _update_correction(memory, ratio, settings)

    # The admission guard: decode's share of the TTFT (KV hand-off, admission, first step) waits when
    # bursts fill the KV cache, which the mean over the horizon hides (heavy prompts and a few output
    # tokens each: a sequence stays under a second). A decode-side TTFT percentile over what prefill
    # leaves of the target (its budget's remainder, or more while prefill is faster than its budget),
    # grows the sequences planned for, as prefill's SLO guard grows its load.
    guard = memory.slo_guard
    own_ttft = signals.ttft_s if ENGINES[spec.engine.kind].decode_ttft_from_handoff else None
    if own_ttft is not None and ready > 0 and _steady(memory, signals, settings):
        ttft_target = spec.slo.ttft_ms / 1000.0
        allowance = ttft_target - _prefill_budget(spec, prefill_capacity or capacity, capacity, mean_prompt,
                                                  settings)
        if prefill is not None and prefill.ttft_s is not None:
            allowance = max(allowance, ttft_target - prefill.ttft_s)
        guard = _next_guard(guard, own_ttft > allowance, memory, ready, settings)

    # Size for the mean load over the horizon the queue ahead of decode absorbs (request sizes vary a
    # lot from one rate window to the next when prompts are heavy-tailed).
    horizon = _horizon(spec, settings)
    rate_samples = (*memory.rate_samples, (signals.sampled_at, load_tokens, sequences, held_prompt, mean_output))
    rate_samples = tuple(x for x in rate_samples if signals.sampled_at - x[0] <= settings.max_horizon_s)
    recent = _recent(rate_samples, signals.sampled_at, horizon, settings)
    count = len(recent)
    sizing = size_decode(
        capacity.model, capacity.accelerator, capacity.tensor_parallel,
        generation_tokens_per_s=sum(x[1] for x in recent) / count,
        concurrent_sequences=sum(x[2] for x in recent) / count * guard,
        mean_prompt_tokens=sum(x[3] for x in recent) / count, mean_output_tokens=sum(x[4] for x in recent) / count,
        itl_target_s=itl_target, correction=correction, headroom=settings.decode_headroom, eff=eff,
    )
    # A step up: the requests of the last scrape interval at least `persist_step` times the mean load of
    # the last `max_horizon_s` (prefill's test against its replay; not against the newest windows, which
    # already show part of the step) -> size for them at once, not once the windows have caught up. The
    # sequences grow with them (Little's law).
    step_note = ""
    usual_tokens = _step_baseline(sum(x[1] for x in rate_samples) / len(rate_samples), load_tokens, memory,
                                  signals.sampled_at, settings)
    # The requests entering prefill, where the prefill pool reports them: decode admits what prefill
    # hands over in clumps (a batch's requests at once), far from Poisson within one short interval.
    entering = prefill if prefill is not None and prefill.requests_last is not None else signals
    fast = _step_rate(entering, usual_tokens / mean_output, settings)
    fast_tokens, sized_tokens = (fast[0] * mean_output, fast[1] * mean_output) if fast else (0.0, 0.0)
    step = memory.step
    if settings.persist_s > 0 and fast_tokens > 0 and fast_tokens >= settings.persist_step * usual_tokens:
        # the time a sequence stays per token it generates (the step), at most the planned step: a pool
        # whose generated rate still lags a start-up would otherwise be credited with a long one
        stay_s = min(sequences / generated, itl_target) if generated else 0.0
        stepped = size_decode(
            capacity.model, capacity.accelerator, capacity.tensor_parallel,
            generation_tokens_per_s=sized_tokens, concurrent_sequences=max(sequences, stay_s * sized_tokens) * guard,
            mean_prompt_tokens=held_prompt, mean_output_tokens=mean_output,
            itl_target_s=itl_target, correction=correction, headroom=settings.decode_headroom, eff=eff,
        )
        if stepped.replicas > sizing.replicas:
            sizing, step = stepped, (signals.sampled_at, fast_tokens)
            step_note = (f" (a step to {fast_tokens:.0f} gen tok/s in the last scrape interval, sized for "
                         f"{sized_tokens:.0f})")
    if step is memory.step and _clamp(sizing.replicas, spec.decode) > current:
        # Up through the rate windows (a step that reached them before a scrape interval showed it as
        # one): their load is the new level a further step is measured against, or the new level's
        # noise reads as a second step (seen: 1 -> 2, then 2 -> 3 eight seconds later on a noisy
        # interval). Prefill's replay already weighs the new level.
        step = (signals.sampled_at, load_tokens)
    observed = f", ITL p{spec.slo.percentile:g} {signals.itl_s * 1000:.1f}ms" if signals.itl_s is not None else ""
    kv = f", KV {signals.kv_usage:.0%}" if signals.kv_usage is not None else ""
    if own_ttft is not None:
        observed += f", own TTFT p{spec.slo.percentile:g} {own_ttft * 1000:.0f}ms"
    guarded = f" x{guard:.2f} (admission guard)" if guard > 1.005 else ""
    explanation = (
        f"{load_tokens:.0f} gen tok/s, {sequences:.0f} sequences{guarded}{kv}{observed}; "
        f"{sizing.max_batch:.0f} seqs / {sizing.tokens_per_s_per_replica:.0f} tok/s per replica "
        f"(correction {correction:.2f}) -> {sizing.replicas}{step_note} for ITL"
        f" {sizing.predicted_itl_s * 1000:.1f}ms <= {itl_target * 1000:.1f}ms"
    )
    return _Need(sizing.replicas, correction, 1.0, mean_prompt, mean_output, explanation, slo_guard=guard,
                 rate_samples=rate_samples, step=step)


def _clamp(value: int, pool: PoolSpec) -> int:
    assert pool.autoscaling is not None
    return max(pool.autoscaling.min_replicas, min(pool.autoscaling.max_replicas, value))


def _fit_budget(
    desired: dict[Role, int], spec: InferenceServiceSpec, current: dict[str, int]
) -> tuple[dict[Role, int], str]:
    """Shrink the autoscaled pools' counts in proportion until both pools fit the accelerator budget."""
    budget = spec.accelerator_budget
    if budget is None or not desired:  # nothing to shrink: pools without metrics hold their count
        return desired, ""
    # a replica of a multi-node pool is a whole group: its accelerators on every node
    per_replica: dict[str, int] = {role: int(getattr(spec, role).worker_accelerators) for role in ROLE_NAMES}
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
            else _decode_need(picture, spec, capacity, memory, settings, current.get(role, pool.replicas),
                              capacities["prefill"])
        )
        if isinstance(need, str):
            unavailable[role] = need
            continue
        recommendation[role] = _clamp(need.replicas, pool)
        explanations[role] = need.explanation
        ready_now = signals.ready_replicas if signals is not None else None
        memories[role] = replace(
            memory,
            correction=need.correction,
            service_correction=need.service_correction,
            load_factor=need.load_factor,
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
