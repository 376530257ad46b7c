"""The capacity planner: per phase, the accelerator, tensor-parallel size and replica count that meet the SLO
at the lowest cost, with the aggregated (non-disaggregated) alternative on the same candidates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.capacity.models import ModelShape
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_step_seconds,
    fits,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
)
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.catalog.accelerators import Accelerator

TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Workload:
    """Offered load: requests per second with mean prompt (ISL) and output (OSL) lengths."""

    rate: float
    isl: float
    osl: float


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    itl_s: float
    percentile: float = 90.0


@dataclass(frozen=True)
class PhasePlan:
    """One pool of the plan."""

    role: str
    accelerator: Accelerator
    tensor_parallel: int
    replicas: int
    predicted_latency_s: float
    """TTFT (prefill, including the KV hand-off and first decode step) or ITL (decode)."""

    @property
    def accelerators(self) -> int:
        return self.replicas * self.tensor_parallel

    @property
    def usd_per_hour(self) -> float:
        return self.accelerators * self.accelerator.usd_per_hour


@dataclass(frozen=True)
class AggregatedPlan:
    """The same load on one pool doing both phases (prefill interleaved with decode steps)."""

    accelerator: Accelerator
    tensor_parallel: int
    replicas: int
    predicted_ttft_s: float
    predicted_itl_s: float

    @property
    def usd_per_hour(self) -> float:
        return self.replicas * self.tensor_parallel * self.accelerator.usd_per_hour


@dataclass(frozen=True)
class Plan:
    """A disaggregated deployment and its aggregated alternative."""

    model: ModelShape
    workload: Workload
    slo: SLO
    prefill: PhasePlan
    decode: PhasePlan
    aggregated: AggregatedPlan | None

    @property
    def usd_per_hour(self) -> float:
        return self.prefill.usd_per_hour + self.decode.usd_per_hour

    @property
    def tokens_per_dollar(self) -> float:
        """Prompt plus generated tokens served per dollar."""
        tokens_per_hour = self.workload.rate * (self.workload.isl + self.workload.osl) * 3600.0
        return tokens_per_hour / self.usd_per_hour if self.usd_per_hour > 0 else math.inf

    @property
    def pd_ratio(self) -> str:
        gcd = math.gcd(self.prefill.replicas, self.decode.replicas) or 1
        return f"{self.prefill.replicas // gcd}:{self.decode.replicas // gcd}"


class PlanError(ValueError):
    """No candidate meets the SLO: says which and why."""


def _prefill_options(
    model: ModelShape, candidates: list[Accelerator], load: Workload, slo: SLO, decode_tp: int, eff: Efficiency
) -> list[PhasePlan]:
    options = []
    for accelerator in candidates:
        for tp in TP_CHOICES:
            if not fits(model, accelerator, tp, load.isl):
                continue
            handoff = kv_transfer_seconds(model, load.isl, kv_link_bytes_per_s(tp, decode_tp), eff)
            budget = slo.ttft_s * 0.85 - handoff - slo.itl_s
            if budget <= 0:
                continue
            sizing = size_prefill(
                model, accelerator, tp, prompt_tokens_per_s=load.rate * load.isl, mean_prompt_tokens=load.isl,
                ttft_budget_s=budget, percentile=slo.percentile, headroom=0.1, eff=eff,
            )
            if sizing.predicted_ttft_s > budget:
                continue
            options.append(PhasePlan("prefill", accelerator, tp, sizing.replicas,
                                     sizing.predicted_ttft_s + handoff + slo.itl_s))
    return options


def _decode_options(
    model: ModelShape, candidates: list[Accelerator], load: Workload, slo: SLO, eff: Efficiency
) -> list[PhasePlan]:
    options = []
    for accelerator in candidates:
        for tp in TP_CHOICES:
            if not fits(model, accelerator, tp, load.isl + load.osl):
                continue
            target = slo.itl_s * 0.85
            context = load.isl + load.osl / 2.0
            if decode_step_seconds(model, accelerator, tp, 1.0, context, eff) > target:
                continue
            sizing = size_decode(
                model, accelerator, tp, generation_tokens_per_s=load.rate * load.osl, concurrent_sequences=0.0,
                mean_prompt_tokens=load.isl, mean_output_tokens=load.osl, itl_target_s=target, headroom=0.1,
                eff=eff,
            )
            options.append(PhasePlan("decode", accelerator, tp, sizing.replicas, sizing.predicted_itl_s))
    return options


def _aggregated(
    model: ModelShape, candidates: list[Accelerator], load: Workload, slo: SLO, eff: Efficiency
) -> AggregatedPlan | None:
    """Cheapest aggregated pool: each replica spends a share of its time on prefill; the decode steps
    stretch by the prefill work interleaved with them (chunked prefill), so the ITL target tightens."""
    best: AggregatedPlan | None = None
    for accelerator in candidates:
        for tp in TP_CHOICES:
            if not fits(model, accelerator, tp, load.isl + load.osl):
                continue
            prefill_one = size_prefill(
                model, accelerator, tp, prompt_tokens_per_s=load.rate * load.isl, mean_prompt_tokens=load.isl,
                ttft_budget_s=slo.ttft_s * 0.85, percentile=slo.percentile, eff=eff,
            )
            prefill_busy = load.rate * prefill_one.service_s  # replica-seconds of prefill per second
            for replicas in range(max(1, math.ceil(prefill_busy)), 1001):
                share = prefill_busy / replicas  # time share each replica spends prefilling
                if share >= 0.8:
                    continue
                itl_budget = slo.itl_s * 0.85 * (1.0 - share)
                sizing = size_decode(
                    model, accelerator, tp, generation_tokens_per_s=load.rate * load.osl / replicas,
                    concurrent_sequences=0.0, mean_prompt_tokens=load.isl, mean_output_tokens=load.osl,
                    itl_target_s=itl_budget, headroom=0.1, eff=eff,
                )
                if sizing.replicas <= 1 and sizing.max_batch >= 1:
                    itl = sizing.predicted_itl_s / (1.0 - share)
                    # The prefill queue sees replicas slowed by the decode share they also serve.
                    ttft = prefill_one.service_s / (1.0 - share) * (1.0 + share / (1.0 - share))
                    candidate = AggregatedPlan(accelerator, tp, replicas, ttft, itl)
                    if best is None or candidate.usd_per_hour < best.usd_per_hour:
                        best = candidate
                    break
    return best


def plan(
    model: ModelShape,
    load: Workload,
    slo: SLO,
    prefill_candidates: list[Accelerator],
    decode_candidates: list[Accelerator],
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> Plan:
    """The cheapest disaggregated deployment that meets `slo` under `load`, and the aggregated alternative."""
    decodes = _decode_options(model, decode_candidates, load, slo, eff)
    if not decodes:
        raise PlanError(
            f"no decode candidate ({', '.join(a.name for a in decode_candidates)}) holds {model.name} with a "
            f"{load.isl + load.osl:.0f}-token context within ITL {slo.itl_s * 1000:.0f} ms at any TP in {TP_CHOICES}"
        )
    decode = min(decodes, key=lambda option: (option.usd_per_hour, option.tensor_parallel))
    prefills = _prefill_options(model, prefill_candidates, load, slo, decode.tensor_parallel, eff)
    if not prefills:
        raise PlanError(
            f"no prefill candidate ({', '.join(a.name for a in prefill_candidates)}) processes a "
            f"{load.isl:.0f}-token prompt of {model.name} within TTFT {slo.ttft_s * 1000:.0f} ms"
        )
    prefill = min(prefills, key=lambda option: (option.usd_per_hour, option.tensor_parallel))
    candidates = list({a.name: a for a in [*prefill_candidates, *decode_candidates]}.values())
    return Plan(model, load, slo, prefill, decode, _aggregated(model, candidates, load, slo, eff))
