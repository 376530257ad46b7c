"""What the policy knows of a replica (the capacity model of its accelerator) and how it corrects that
knowledge online from what the pool reports."""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec
from disagg.capacity.models import ModelConfigError, ModelShape, builtin_model, from_architecture
from disagg.capacity.roofline import kv_link_bytes_per_s, kv_transfer_seconds
from disagg.capacity.sizing import queue_wait_percentile
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog
from disagg.scaling.policy.picture import PoolSignals
from disagg.scaling.policy.settings import PolicySettings
from disagg.scaling.policy.state import PoolMemory


@dataclass(frozen=True)
class Capacity:
    """The capacity model of one pool's replica."""

    model: ModelShape
    accelerator: Accelerator
    tensor_parallel: int


def capacity_of(spec: InferenceServiceSpec, pool: PoolSpec, catalog: AcceleratorCatalog) -> Capacity | None:
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
    return Capacity(model, accelerator, pool.worker_accelerators if pool.multi_node else pool.parallelism.tensor)


def clamp(value: int, pool: PoolSpec) -> int:
    """`value` within the pool's autoscaling bounds."""
    assert pool.autoscaling is not None
    return max(pool.autoscaling.min_replicas, min(pool.autoscaling.max_replicas, value))


def first(*values: float | None) -> float | None:
    for value in values:
        if value is not None:
            return value
    return None


def update_correction(memory: PoolMemory, ratio: float | None, settings: PolicySettings) -> float:
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return memory.correction
    low, high = settings.correction_bounds
    ratio = min(max(ratio, low), high)
    alpha = settings.correction_smoothing if ratio > memory.correction else settings.correction_decay
    # Smooth in log space: a 2x slow-down and a 2x speed-up weigh the same.
    blended = math.exp((1 - alpha) * math.log(memory.correction) + alpha * math.log(ratio))
    return min(max(blended, low), high)


def steady(memory: PoolMemory, signals: PoolSignals, settings: PolicySettings) -> bool:
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


def fit_floor(samples: tuple[tuple[int, float, float, float], ...], percentile: float, load_factor: float) -> float:
    """The floor F with which F + the M/M/c wait at `percentile` of `load_factor` x each sample's arrivals
    best explains the TTFT observed at that percentile (the median residual; 0 without samples)."""
    if not samples:
        return 0.0
    residuals = [
        ttft - queue_wait_percentile(ready, min(load_factor * rate, 0.999 * ready / service), service, percentile)
        for ready, rate, service, ttft in samples
    ]
    return max(_quantile(tuple(residuals), 0.5), 0.0)


def next_guard(guard: float, broken: bool, memory: PoolMemory, ready: int, settings: PolicySettings) -> float:
    """A guard after one steady tick: up by `slo_guard_step` when the SLO was broken while the pool had
    what the policy last asked for (a pool still short of it breaks the SLO without the model being
    wrong), else back by `slo_guard_decay`; within `slo_guard_bounds`."""
    low, high = settings.slo_guard_bounds
    asked = memory.recommendations[-1][1] if memory.recommendations else 0
    if broken and ready >= asked:
        return min(guard * (1.0 + settings.slo_guard_step), high)
    return max(guard * (1.0 - settings.slo_guard_decay), low)


def prefill_budget(
    spec: InferenceServiceSpec, prefill: Capacity, decode: Capacity, mean_prompt: float, settings: PolicySettings,
    observed_itl_s: float | None = None,
) -> float:
    """What the prefill side may take of the TTFT target: the rest goes to the KV hand-off and the first
    decode step, with a margin. The first step is a request's wait for the running step to end and its
    own step: twice the ITL decode delivers, at most the ITL target (a looser ITL target must not shrink
    prefill's share while decode's steps stay short)."""
    handoff = kv_transfer_seconds(
        prefill.model, mean_prompt,
        kv_link_bytes_per_s(prefill.tensor_parallel, decode.tensor_parallel, settings.kv_over_rdma),
        settings.efficiency,
    )
    ttft = spec.slo.ttft_ms / 1000.0
    first_step = spec.slo.itl_ms / 1000.0
    if observed_itl_s is not None:
        first_step = min(first_step, 2.0 * observed_itl_s)
    return max(ttft * settings.target_fraction - handoff - first_step, ttft * 0.25)
