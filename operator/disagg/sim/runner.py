"""Running policies side by side on one workload: shared by `disagg simulate` and bench/autoscale.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from disagg.capacity.roofline import (
    decode_tokens_per_s,
    kv_capacity_tokens,
    prefill_seconds,
    prefill_tokens_per_s,
)
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.scaling.policy import PolicySettings
from disagg.sim.baselines import controller_for, find_static_best
from disagg.sim.controllers import DisaggController
from disagg.sim.engine import SimResult, SimSetup, simulate
from disagg.sim.traces import Workload

POLICIES = ("disagg", "static-best", "hpa", "dynamo-sla", "dynamo-load", "oracle")


def initial_replicas(setup: SimSetup, workload: Workload, minutes: float = 5.0, offset: float = 0.0) -> SimSetup:
    """The setup with both pools sized by the capacity model for the workload's first minutes (from
    `offset`).

    Every policy starts from the same allocation, as an operator would start from `disagg plan`.
    """
    head = workload.window(offset, offset + minutes * 60.0)
    if head.requests == 0:
        return setup
    rate = head.requests / (minutes * 60.0)
    isl = float(head.prompt_tokens.mean())
    osl = float(head.output_tokens.mean())
    prefill = size_prefill(
        setup.model, setup.prefill.accelerator, setup.prefill.tensor_parallel,
        prompt_tokens_per_s=rate * isl, mean_prompt_tokens=isl, ttft_budget_s=setup.ttft_s * 0.85,
        percentile=setup.percentile, headroom=0.1, max_replicas=setup.prefill.max_replicas,
    )
    decode = size_decode(
        setup.model, setup.decode.accelerator, setup.decode.tensor_parallel,
        generation_tokens_per_s=rate * osl, concurrent_sequences=0.0, mean_prompt_tokens=isl,
        mean_output_tokens=osl, itl_target_s=setup.itl_s * 0.85, headroom=0.1,
    )
    return replace(
        setup,
        prefill=replace(setup.prefill, initial_replicas=min(prefill.replicas, setup.prefill.max_replicas)),
        decode=replace(setup.decode, initial_replicas=min(decode.replicas, setup.decode.max_replicas)),
    )


def peak_replicas(setup: SimSetup, workload: Workload, minutes: float = 5.0) -> dict[str, int]:
    """Both pools sized by the capacity model for the workload's busiest `minutes` (the static-best
    search starts there: a day-long workload's first minutes are its quietest)."""
    span = minutes * 60.0
    starts = np.arange(0.0, max(workload.duration_s - span, 0.0) + 1e-9, span)
    busiest = max(starts, key=lambda start: workload.window(float(start), float(start) + span).requests)
    peak = initial_replicas(setup, workload.window(float(busiest), float(busiest) + span), minutes, offset=busiest)
    return {"prefill": peak.prefill.initial_replicas, "decode": peak.decode.initial_replicas}


def scale_for_replicas(setup: SimSetup, workload: Workload, replicas: int = 4, utilization: float = 0.75) -> float:
    """Time scale at which the workload's mean load needs `replicas` per pool (at `utilization`).

    Capped where the busier pool would need four times that: a trace whose requests are nearly all
    prompt (Azure code: ~13 output tokens) leaves its decode pool lighter rather than its prefill pool
    absurdly large.
    """
    rate = workload.mean_rate()
    isl = float(workload.prompt_tokens.mean())
    osl = float(workload.output_tokens.mean())
    prefill_tps = prefill_tokens_per_s(setup.model, setup.prefill.accelerator, setup.prefill.tensor_parallel, isl)
    decode_tps = decode_tokens_per_s(
        setup.model, setup.decode.accelerator, setup.decode.tensor_parallel, isl + osl / 2, setup.itl_s * 0.85,
        reserved_tokens=isl + osl,
    )
    for_prefill = replicas * prefill_tps * utilization / (rate * isl)
    for_decode = replicas * decode_tps * utilization / (rate * osl) if decode_tps > 0 else for_prefill
    scale = min(max(for_prefill, for_decode), 4.0 * min(for_prefill, for_decode))
    return math.ceil(scale * 10.0) / 10.0


def reachable_ttft_s(setup: SimSetup, workload: Workload, share: float = 0.995) -> float:
    """A TTFT target static provisioning can meet: 1.5x the unloaded prefill time of the `share` quantile
    prompt (plus one ITL), rounded up to half a second, at least 1 s."""
    prompts = sorted(workload.prompt_tokens.tolist())
    fits = kv_capacity_tokens(setup.model, setup.decode.accelerator, setup.decode.tensor_parallel)
    prompts = [p for p in prompts if p < fits] or prompts
    quantile = prompts[min(len(prompts) - 1, int(share * len(prompts)))]
    unloaded = prefill_seconds(setup.model, setup.prefill.accelerator, setup.prefill.tensor_parallel, quantile)
    return max(1.0, math.ceil((1.5 * unloaded + setup.itl_s) * 2.0) / 2.0)


def run_policy(
    name: str,
    setup: SimSetup,
    workload: Workload,
    catalog: AcceleratorCatalog,
    settings: PolicySettings | None = None,
    on_trial: Callable[[dict[str, int], SimResult], None] | None = None,
) -> SimResult:
    """One policy's run (`static-best` runs its search and returns its best trial)."""
    if name == "disagg":
        return simulate(setup, workload, DisaggController(setup, catalog, settings or PolicySettings()))
    if name == "static-best":
        _, result = find_static_best(setup, workload, start=peak_replicas(setup, workload), on_trial=on_trial)
        return result
    return simulate(setup, workload, controller_for(name, setup, workload))
