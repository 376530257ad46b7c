"""The capacity planner: per phase, the accelerator, tensor-parallel size and replica count that meet the SLO
at the lowest cost, with the aggregated (non-disaggregated) alternative on the same candidates.

Workers may span nodes (`disagg.capacity.multinode`): when a model's weights do not fit one node, or a
multi-node worker serves the load for less, the plan says so and why. Options without an hourly price
(SRAM-class systems with no public price) are ranked after priced ones, by accelerator count."""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.capacity import multinode
from disagg.capacity.models import ModelShape
from disagg.capacity.multinode import Layout
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_step_seconds,
    fits,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
)
from disagg.capacity.sizing import predicted_prefill_ttft, size_decode, size_prefill
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
    layout: Layout | None = None
    """A worker over several nodes (or SRAM chips); None: one node, `tensor_parallel` accelerators."""
    why: str = ""
    """What decided the layout (memory, the SLO, the cost), with the numbers."""

    @property
    def per_worker(self) -> int:
        return self.layout.accelerators if self.layout is not None else self.tensor_parallel

    @property
    def nodes(self) -> int:
        return self.layout.nodes if self.layout is not None else 1

    @property
    def accelerators(self) -> int:
        return self.replicas * self.per_worker

    @property
    def usd_per_hour(self) -> float:
        return self.accelerators * self.accelerator.usd_per_hour

    @property
    def priced(self) -> bool:
        return self.accelerator.priced

    def describe(self) -> str:
        return self.layout.describe() if self.layout is not None else f"TP{self.tensor_parallel}"


def rank(option: PhasePlan) -> tuple[bool, float, int, int]:
    """Cheapest first; unpriced options after priced ones, fewest accelerators first; then fewer nodes."""
    cost = option.usd_per_hour if option.priced else float(option.accelerators)
    return (not option.priced, cost, option.nodes, option.tensor_parallel)


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
    def priced(self) -> bool:
        return self.prefill.priced and self.decode.priced

    @property
    def tokens_per_dollar(self) -> float:
        """Prompt plus generated tokens served per dollar."""
        tokens_per_hour = self.workload.rate * (self.workload.isl + self.workload.osl) * 3600.0
        if not self.priced:
            return math.nan
        return tokens_per_hour / self.usd_per_hour if self.usd_per_hour > 0 else math.inf

    @property
    def pd_ratio(self) -> str:
        gcd = math.gcd(self.prefill.replicas, self.decode.replicas) or 1
        return f"{self.prefill.replicas // gcd}:{self.decode.replicas // gcd}"


class PlanError(ValueError):
    """No candidate meets the SLO: says which and why."""


def _prefill_options(
    model: ModelShape, candidates: list[Accelerator], load: Workload, slo: SLO, decode: PhasePlan, eff: Efficiency,
    max_nodes: int = 8,
) -> list[PhasePlan]:
    decode_tp = decode.per_worker
    options = []
    for accelerator in candidates:
        if multinode.is_sram(accelerator):
            continue  # the SRAM parts are decoders: compute-light by design
        single = []
        for tp in TP_CHOICES:
            if tp > accelerator.per_node:
                continue
            if not fits(model, accelerator, tp, load.isl):
                continue
            if decode.layout is None:
                link = kv_link_bytes_per_s(tp, decode_tp)
            else:
                link = multinode.kv_link_bytes_per_s(accelerator, Layout(tensor=tp), decode.accelerator, decode.layout)
            handoff = kv_transfer_seconds(model, load.isl, link, eff)
            budget = slo.ttft_s * 0.85 - handoff - slo.itl_s
            if budget <= 0:
                continue
            sizing = size_prefill(
                model, accelerator, tp, prompt_tokens_per_s=load.rate * load.isl, mean_prompt_tokens=load.isl,
                ttft_budget_s=budget, percentile=slo.percentile, headroom=0.1, eff=eff,
            )
            if sizing.predicted_ttft_s > budget:
                continue
            single.append(PhasePlan("prefill", accelerator, tp, sizing.replicas,
                                    sizing.predicted_ttft_s + handoff + slo.itl_s))
        options += single
        if not single:
            options += _prefill_layouts(model, accelerator, load, slo, decode, eff, max_nodes)
    return options


def _prefill_layouts(
    model: ModelShape, accelerator: Accelerator, load: Workload, slo: SLO, decode: PhasePlan, eff: Efficiency,
    max_nodes: int,
) -> list[PhasePlan]:
    """Prefill workers over several nodes (tensor inside a node, pipeline across): only for a model one
    node cannot hold or prefill in time."""
    options = []
    usable = accelerator.specs.memory_bytes * eff.memory_utilization - eff.activation_reserve_bytes
    for layout in multinode.layouts(model, accelerator, max_nodes, load.isl):
        if layout.data > 1:
            continue  # data-parallel attention helps decode batches, not one prompt's latency
        if multinode.kv_capacity_tokens(model, accelerator, layout, eff) <= load.isl:
            continue
        decode_layout = decode.layout or Layout(tensor=decode.tensor_parallel)
        link = multinode.kv_link_bytes_per_s(accelerator, layout, decode.accelerator, decode_layout)
        handoff = kv_transfer_seconds(model, load.isl, link, eff)
        budget = slo.ttft_s * 0.85 - handoff - slo.itl_s
        service = load.isl * multinode.prefill_seconds_per_token(model, accelerator, layout, load.isl, eff)
        rate = load.rate * 1.1
        replicas = max(1, math.ceil(rate * service / 0.9))
        while replicas < 1000 and predicted_prefill_ttft(replicas, rate, service, slo.percentile) > budget:
            replicas += 1
        ttft = predicted_prefill_ttft(replicas, rate, service, slo.percentile)
        if budget <= 0 or ttft > budget:
            continue
        why = (f"{model.weight_bytes / 1e9:.0f} GB of weights do not fit one node of {accelerator.per_node} x "
               f"{accelerator.name} ({accelerator.per_node * usable / 1e9:.0f} GB usable)")
        options.append(PhasePlan("prefill", accelerator, layout.tensor, replicas, ttft + handoff + slo.itl_s,
                                 layout, why))
    return options


def _decode_options(
    model: ModelShape, candidates: list[Accelerator], load: Workload, slo: SLO, eff: Efficiency,
    max_nodes: int = 8,
) -> list[PhasePlan]:
    options = []
    for accelerator in candidates:
        if not multinode.is_sram(accelerator):
            options += _decode_single_node(model, accelerator, load, slo, eff)
        options += _decode_layouts(model, accelerator, load, slo, eff, max_nodes)
    return options


def _decode_single_node(
    model: ModelShape, accelerator: Accelerator, load: Workload, slo: SLO, eff: Efficiency
) -> list[PhasePlan]:
    options = []
    for tp in TP_CHOICES:
        if tp > accelerator.per_node or not fits(model, accelerator, tp, load.isl + load.osl):
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
        why = (f"{model.weight_bytes / tp / 1e9:.1f} GB of weights per accelerator; {sizing.max_batch:.0f} "
               f"sequences per worker within the ITL target, {sizing.tokens_per_s_per_replica:,.0f} tok/s per worker")
        options.append(PhasePlan("decode", accelerator, tp, sizing.replicas, sizing.predicted_itl_s, None, why))
    return options


def _decode_layouts(
    model: ModelShape, accelerator: Accelerator, load: Workload, slo: SLO, eff: Efficiency, max_nodes: int
) -> list[PhasePlan]:
    """Decode workers over several nodes, or over the SRAM chips a model needs."""
    options = []
    target = slo.itl_s * 0.85
    context = load.isl + load.osl / 2.0
    reserved = load.isl + load.osl
    for layout in multinode.layouts(model, accelerator, max_nodes, reserved):
        batch = multinode.decode_max_batch(model, accelerator, layout, context, reserved, target, eff)
        if batch < 1.0:
            continue
        step = multinode.decode_step_seconds(model, accelerator, layout, batch, context, eff)
        tokens = load.rate * load.osl * 1.1
        replicas = max(1, math.ceil(tokens / (batch / step) - 1e-9))
        spread = max(tokens * step / replicas, 1.0)
        itl = multinode.decode_step_seconds(model, accelerator, layout, min(spread, batch), context, eff)
        options.append(PhasePlan("decode", accelerator, layout.tensor, replicas, itl, layout,
                                 _layout_why(model, accelerator, layout, batch, step, eff)))
    return options


def _layout_why(
    model: ModelShape, accelerator: Accelerator, layout: Layout, batch: float, step: float, eff: Efficiency
) -> str:
    eff = multinode.efficiency_for(accelerator, eff)
    weights = multinode.weight_bytes_per_accelerator(model, layout)
    if multinode.is_sram(accelerator):
        least = multinode.min_accelerators(model, accelerator, 0.0, eff)
        return (f"SRAM: {model.weight_bytes / 1e9:.1f} GB of weights need at least {least} x "
                f"{accelerator.specs.memory_bytes / 1e9:g} GB chips; {layout.accelerators} hold the KV of "
                f"{batch:.0f} sequences; a step is {model.layers} layers x {eff.layer_latency_s * 1e6:.1f} us "
                f"= {step * 1000:.2f} ms at that batch")
    return (f"{weights / 1e9:.1f} GB of weights per accelerator; {batch:.0f} sequences per worker within the "
            f"ITL target, {batch / step:,.0f} tok/s per worker")


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
    max_nodes: int = 8,
) -> Plan:
    """The cheapest disaggregated deployment that meets `slo` under `load`, and the aggregated alternative."""
    decodes = _decode_options(model, decode_candidates, load, slo, eff, max_nodes)
    if not decodes:
        raise PlanError(
            f"no decode candidate ({', '.join(a.name for a in decode_candidates)}) holds {model.name} with a "
            f"{load.isl + load.osl:.0f}-token context within ITL {slo.itl_s * 1000:.0f} ms at any TP in {TP_CHOICES} "
            f"or over up to {max_nodes} nodes{_decode_floor(model, decode_candidates, load, eff, max_nodes)}"
        )
    decode = min(decodes, key=rank)
    decode = _explain(decode, decodes, model)
    prefills = _prefill_options(model, prefill_candidates, load, slo, decode, eff, max_nodes)
    if not prefills:
        raise PlanError(
            f"no prefill candidate ({', '.join(a.name for a in prefill_candidates)}) processes a "
            f"{load.isl:.0f}-token prompt of {model.name} within TTFT {slo.ttft_s * 1000:.0f} ms"
        )
    prefill = min(prefills, key=rank)
    candidates = [a for a in {a.name: a for a in [*prefill_candidates, *decode_candidates]}.values()
                  if not multinode.is_sram(a)]
    return Plan(model, load, slo, prefill, decode, _aggregated(model, candidates, load, slo, eff))


def _decode_floor(
    model: ModelShape, candidates: list[Accelerator], load: Workload, eff: Efficiency, max_nodes: int
) -> str:
    """The shortest step any candidate takes for one sequence: why a tight ITL target is out of reach."""
    context = load.isl + load.osl / 2.0
    floors: list[tuple[float, str]] = []
    for accelerator in candidates:
        layouts = [] if multinode.is_sram(accelerator) else [
            Layout(tensor=tp) for tp in TP_CHOICES
            if tp <= accelerator.per_node and fits(model, accelerator, tp, load.isl + load.osl)]
        layouts += multinode.layouts(model, accelerator, max_nodes, load.isl + load.osl)
        for layout in layouts:
            if multinode.kv_capacity_tokens(model, accelerator, layout, eff) < load.isl + load.osl:
                continue
            if layout.nodes == 1 and not multinode.is_sram(accelerator):
                step = decode_step_seconds(model, accelerator, layout.tensor, 1.0, context, eff)
            else:
                step = multinode.decode_step_seconds(model, accelerator, layout, 1.0, context, eff)
            floors.append((step, f"{accelerator.name} {layout.describe()}"))
    if not floors:
        return ": the weights and one sequence's KV fit no layout"
    step, where = min(floors)
    fixed = eff.decode_overhead_s * 1000
    return (f": the shortest step for one sequence is {step * 1000:.1f} ms ({where}; the weights read per step "
            f"at {eff.decode_mbu:.0%} of the memory bandwidth, plus {fixed:.0f} ms fixed per step on GPUs)")


def _explain(chosen: PhasePlan, options: list[PhasePlan], model: ModelShape) -> PhasePlan:
    """The chosen decode option with why it spans nodes: one node cannot hold it, or costs more."""
    if chosen.layout is None or multinode.is_sram(chosen.accelerator):
        return chosen
    same = [o for o in options if o.accelerator.name == chosen.accelerator.name and o.layout is None]
    if not same:
        reason = (f"{model.weight_bytes / 1e9:.0f} GB of weights with the KV of one sequence do not fit one "
                  f"node of {chosen.accelerator.per_node} x {chosen.accelerator.name}, or no one-node worker "
                  "meets the ITL target")
    else:
        best = min(same, key=rank)
        reason = (f"one-node workers would need {best.replicas} x TP{best.tensor_parallel} "
                  f"({best.accelerators} accelerators, ${best.usd_per_hour:,.2f}/hour) for the same load")
    return PhasePlan(chosen.role, chosen.accelerator, chosen.tensor_parallel, chosen.replicas,
                     chosen.predicted_latency_s, chosen.layout, f"{reason}; {chosen.why}")
