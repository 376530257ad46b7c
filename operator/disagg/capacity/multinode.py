"""Workers that span nodes, and SRAM-class decoders: the capacity model of one worker of any layout.

A worker is one engine instance (one vLLM or SGLang server) over `tensor x pipeline x data` accelerators
on `nodes` nodes. What one accelerator holds and reads per decode step:

- Weights. Tensor and pipeline parallelism split every weight; the routed experts of a mixture-of-experts
  model are split over all the worker's accelerators (expert parallelism, or vLLM's tensor-parallel
  expert group of data x tensor); the rest (attention, embeddings, shared experts) is replicated over the
  data-parallel ranks, which is what data-parallel attention costs.
- KV cache. Each data-parallel rank holds the KV of its own sequences; tensor parallelism splits KV heads
  (not the latent of multi-head latent attention), pipeline parallelism splits the layers.
- A decode step: every accelerator reads its weights (the experts the batch routes to) and its
  sequences' KV; pipeline stages run one after another; communication is the tensor-parallel
  all-reduces, the expert all-to-all (dispatch and combine) and the pipeline hops, over the fast links
  inside a node (or scale-up domain) and over the scale-out fabric (EFA, InfiniBand) between nodes.

SRAM-class parts (Cerebras WSE-3, Groq LPUs) keep weights and KV in on-chip SRAM over many chips. Their
bandwidth makes the memory term tiny; a step is set by a per-layer latency the catalogue fits to the
vendor's published single-user speed (`Efficiency.layer_latency_s`), and the chips a model needs by
the SRAM that holds weights plus KV. Each figure and its source: docs/multinode.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from disagg.capacity.models import ModelShape
from disagg.capacity.roofline import DEFAULT_EFFICIENCY, RDMA_LINK_BYTES_PER_S, Efficiency
from disagg.catalog.accelerators import Accelerator

ACTIVATION_BYTES = 2.0
"""Activations travel in bf16."""
DISPATCH_BYTES = 1.0
"""Expert dispatch sends tokens in fp8 (DeepEP's low-latency mode); the combine returns bf16."""


@dataclass(frozen=True)
class Layout:
    """How one worker spreads over accelerators and nodes."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    expert: bool = False
    """Expert parallelism over all the worker's accelerators (mixture-of-experts models)."""
    nodes: int = 1

    @property
    def accelerators(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def per_node(self) -> int:
        return max(1, self.accelerators // self.nodes)

    def describe(self) -> str:
        parts = [f"TP{self.tensor}"] if self.tensor > 1 or (self.pipeline == 1 and self.data == 1) else []
        if self.pipeline > 1:
            parts.append(f"PP{self.pipeline}")
        if self.data > 1:
            parts.append(f"DP{self.data}")
        if self.expert:
            parts.append(f"EP{self.accelerators}")
        text = " ".join(parts)
        return text if self.nodes == 1 else f"{text} over {self.nodes} nodes"


class UnknownEfficiency(ValueError):
    """A catalogue entry overrides an efficiency factor that does not exist."""


def efficiency_for(accelerator: Accelerator, eff: Efficiency = DEFAULT_EFFICIENCY) -> Efficiency:
    """The efficiency factors with the accelerator's own overrides (SRAM parts differ from GPUs)."""
    if not accelerator.efficiency:
        return eff
    known = {f.name for f in fields(Efficiency)}
    unknown = sorted(set(accelerator.efficiency) - known)
    if unknown:
        raise UnknownEfficiency(
            f"accelerator {accelerator.name!r}: unknown efficiency field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return replace(eff, **accelerator.efficiency)


def is_sram(accelerator: Accelerator) -> bool:
    return accelerator.memory_kind == "sram"


def non_expert_bytes(model: ModelShape) -> float:
    return max(model.weight_bytes - expert_bytes(model), 0.0)


def expert_bytes(model: ModelShape) -> float:
    if not model.is_moe or model.expert_parameters <= 0:
        return 0.0
    return model.weight_bytes * model.expert_parameters / model.parameters


def weight_bytes_per_accelerator(model: ModelShape, layout: Layout) -> float:
    """Weights one accelerator holds: the routed experts over all of them, the rest over TP x PP."""
    return non_expert_bytes(model) / (layout.tensor * layout.pipeline) + expert_bytes(model) / layout.accelerators


def kv_bytes_per_token_per_accelerator(model: ModelShape, layout: Layout) -> float:
    """KV bytes one accelerator holds for one token of a sequence of its data-parallel rank."""
    heads_split = 1.0 if model.kv_lora_rank is not None else 1.0 / min(layout.tensor, model.kv_heads)
    return model.kv_bytes_per_token * heads_split / layout.pipeline


def kv_capacity_tokens(
    model: ModelShape, accelerator: Accelerator, layout: Layout, eff: Efficiency = DEFAULT_EFFICIENCY
) -> float:
    """Tokens of KV cache the whole worker holds (0 when the weights do not fit)."""
    eff = efficiency_for(accelerator, eff)
    free = (
        accelerator.specs.memory_bytes * eff.memory_utilization
        - weight_bytes_per_accelerator(model, layout)
        - eff.activation_reserve_bytes
    )
    if free <= 0:
        return 0.0
    return layout.data * free / kv_bytes_per_token_per_accelerator(model, layout)


def _touched(model: ModelShape, batch: float) -> float:
    """Share of the routed experts a batch's tokens pass through (each picks k of E)."""
    if model.experts <= 0 or model.experts_per_token <= 0:
        share = model.active_parameters / model.parameters
    else:
        share = model.experts_per_token / model.experts
    return float(1.0 - (1.0 - min(share, 1.0)) ** max(batch, 1.0))


def _crosses_nodes(accelerator: Accelerator, group: int) -> bool:
    return group > accelerator.domain_size


def _scale_out(accelerator: Accelerator) -> float:
    return accelerator.scale_out_bandwidth or RDMA_LINK_BYTES_PER_S


def decode_step_seconds(
    model: ModelShape,
    accelerator: Accelerator,
    layout: Layout,
    batch: float,
    context_tokens: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Duration of one decode step of a worker running `batch` sequences of mean context `context_tokens`."""
    eff = efficiency_for(accelerator, eff)
    specs = accelerator.specs
    per_rank = max(batch, 1.0) / layout.data
    compute = batch * 2.0 * model.active_parameters / (
        eff.decode_mfu * specs.peak_flops(model.weight_dtype) * layout.accelerators)
    kv_read = per_rank * context_tokens * kv_bytes_per_token_per_accelerator(model, layout)
    if is_sram(accelerator):
        # weights and KV stream from every chip at once; hops between chips are in the per-layer fit
        total = model.weight_bytes + batch * context_tokens * model.kv_bytes_per_token
        memory = total / (eff.decode_mbu * specs.memory_bandwidth * layout.accelerators)
        return max(memory, compute) + eff.decode_overhead_s + model.layers * eff.layer_latency_s
    weights_read = (
        non_expert_bytes(model) / (layout.tensor * layout.pipeline)
        + expert_bytes(model) / layout.accelerators * _touched(model, batch)
    )
    if expert_bytes(model) == 0.0 and model.is_moe:  # a MoE shape without expert counts
        weights_read = model.weight_bytes / layout.accelerators * _touched(model, batch)
    stage = max((weights_read + kv_read) / (eff.decode_mbu * specs.memory_bandwidth), compute / layout.pipeline)
    return (
        layout.pipeline * stage
        + eff.decode_overhead_s
        + model.layers * eff.layer_latency_s
        + _decode_communication(model, accelerator, layout, per_rank, eff)
    )


def _decode_communication(
    model: ModelShape, accelerator: Accelerator, layout: Layout, per_rank: float, eff: Efficiency
) -> float:
    hidden_bytes = model.hidden_size * ACTIVATION_BYTES
    seconds = 0.0
    if layout.tensor > 1:
        # two all-reduces per layer; across nodes they pay the fabric's latency and bandwidth
        if _crosses_nodes(accelerator, layout.tensor):
            ring = 2.0 * (layout.tensor - 1) / layout.tensor
            bytes_per_rank = per_rank * hidden_bytes * ring
            seconds += 2 * model.layers * (eff.internode_latency_s + bytes_per_rank / _scale_out(accelerator))
        else:
            seconds += 2 * model.layers * eff.allreduce_latency_s
    if layout.expert and model.experts_per_token > 0:
        # dispatch (fp8) and combine (bf16) of every token to its k experts; the share of experts
        # outside the node's fast domain goes over the fabric
        group = layout.accelerators
        remote = max(0.0, 1.0 - accelerator.domain_size / group)
        sent = per_rank * model.experts_per_token * model.hidden_size * (DISPATCH_BYTES + ACTIVATION_BYTES)
        latency = eff.internode_latency_s if remote > 0 else eff.allreduce_latency_s
        link = accelerator.specs.interconnect_bandwidth or _scale_out(accelerator)
        per_layer = 2 * latency + sent * remote / _scale_out(accelerator) + sent * (1.0 - remote) / link
        seconds += model.layers * per_layer
    if layout.pipeline > 1:
        crossing = layout.nodes > 1
        hop = eff.internode_latency_s if crossing else eff.allreduce_latency_s
        link = _scale_out(accelerator)
        if not crossing:
            link = accelerator.specs.interconnect_bandwidth or link
        seconds += (layout.pipeline - 1) * (hop + per_rank * layout.data * hidden_bytes / link)
    return seconds


def decode_max_batch(
    model: ModelShape,
    accelerator: Accelerator,
    layout: Layout,
    context_tokens: float,
    reserved_tokens: float,
    itl_s: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Most sequences the worker runs with steps within `itl_s` and room in its KV cache (0: none)."""
    kv_limit = kv_capacity_tokens(model, accelerator, layout, eff) / max(reserved_tokens, 1.0)
    if kv_limit < 1.0 or decode_step_seconds(model, accelerator, layout, 1.0, context_tokens, eff) > itl_s:
        return 0.0
    if decode_step_seconds(model, accelerator, layout, kv_limit, context_tokens, eff) <= itl_s:
        return kv_limit
    low, high = 1.0, kv_limit
    for _ in range(40):  # the step grows with the batch: bisect
        middle = (low + high) / 2.0
        if decode_step_seconds(model, accelerator, layout, middle, context_tokens, eff) <= itl_s:
            low = middle
        else:
            high = middle
    return low


def prefill_seconds_per_token(
    model: ModelShape,
    accelerator: Accelerator,
    layout: Layout,
    prompt_tokens: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Mean time one prompt token costs a worker (the whole worker computes; communication on top)."""
    eff = efficiency_for(accelerator, eff)
    mfu = eff.prefill_mfu * (eff.moe_mfu_factor if model.is_moe else 1.0)
    peak = accelerator.specs.peak_flops(model.weight_dtype) * layout.accelerators * mfu
    flops = 2.0 * model.active_parameters + model.attention_flops_per_token(prompt_tokens / 2.0)
    seconds = flops / peak
    hidden_bytes = model.hidden_size * ACTIVATION_BYTES
    if layout.tensor > 1:
        ring = 2.0 * (layout.tensor - 1) / layout.tensor
        link = (_scale_out(accelerator) * layout.tensor if _crosses_nodes(accelerator, layout.tensor)
                else accelerator.specs.interconnect_bandwidth or _scale_out(accelerator))
        seconds += 2 * model.layers * hidden_bytes * ring / link
    if layout.pipeline > 1 and layout.nodes > 1:
        seconds += (layout.pipeline - 1) * hidden_bytes / (_scale_out(accelerator) * layout.per_node)
    return seconds


def kv_link_bytes_per_s(
    prefill: Accelerator, prefill_layout: Layout, decode: Accelerator, decode_layout: Layout
) -> float:
    """Prefill-to-decode bandwidth: each side's fabric per accelerator, on the narrower side."""
    prefill_side = _scale_out(prefill) * prefill_layout.accelerators
    decode_side = _scale_out(decode) * decode_layout.accelerators
    return min(prefill_side, decode_side)


def min_accelerators(model: ModelShape, accelerator: Accelerator, reserve_tokens: float,
                     eff: Efficiency = DEFAULT_EFFICIENCY) -> int:
    """Fewest accelerators whose memory holds the weights plus `reserve_tokens` of KV (spread evenly)."""
    eff = efficiency_for(accelerator, eff)
    usable = accelerator.specs.memory_bytes * eff.memory_utilization - eff.activation_reserve_bytes
    if usable <= 0:
        return 0
    return max(1, math.ceil((model.weight_bytes + reserve_tokens * model.kv_bytes_per_token) / usable))


def layouts(model: ModelShape, accelerator: Accelerator, max_nodes: int, reserve_tokens: float) -> list[Layout]:
    """The multi-node layouts worth sizing for one accelerator, fewest nodes first.

    GPUs and other HBM parts: tensor parallelism inside a node and pipeline parallelism across nodes
    (vLLM's and SGLang's documented multi-node layout for dense models), and for mixture-of-experts
    models data-parallel attention with expert parallelism over every accelerator (wide EP). SRAM-class
    parts: the fewest systems that hold the weights and the KV of `reserve_tokens`, and multiples of it.
    """
    per_node = accelerator.per_node
    found: list[Layout] = []
    if is_sram(accelerator):
        least = math.ceil(min_accelerators(model, accelerator, reserve_tokens) / per_node)
        if least < 1:
            return []
        for factor in (1.0, 1.5, 2.0, 3.0, 4.0):
            nodes = max(1, math.ceil(least * factor))
            layout = Layout(pipeline=nodes * per_node, nodes=nodes)
            if layout not in found:
                found.append(layout)
        return found
    for nodes in (2, 4, 8, 16, 32):
        if nodes > max_nodes:
            break
        if model.layers >= nodes:
            found.append(Layout(tensor=per_node, pipeline=nodes, nodes=nodes))
        if model.is_moe and model.experts and model.experts % (per_node * nodes) == 0:
            found.append(Layout(data=per_node * nodes, expert=True, nodes=nodes))
    return found
