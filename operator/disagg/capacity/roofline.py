"""Roofline capacity model of one engine replica, per phase.

Prefill is compute-bound: a prompt token costs 2 x active parameters FLOPs in the matmuls plus the
attention over the tokens before it, so

    prefill tokens/s = MFU x peak FLOP/s x TP / (2 x active params + attention FLOPs per token)

(and, with tensor parallelism, the all-reduce traffic of the activations over the accelerator links).
Decode is memory-bandwidth-bound: every step reads the weights once and the KV cache of every running
sequence, so

    decode step = (weight bytes read + sum(context) x KV bytes/token) / (MBU x bandwidth x TP) + overhead

and it falls back to the compute roof at very large batches.

The efficiency factors (`Efficiency`) are what a roofline cannot know. The defaults are round numbers
that published serving measurements support; each is documented on its field, and
tests/unit/test_capacity_published.py checks the resulting figures against DeepSeek's and Mooncake's
published numbers with the tolerance stated there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.capacity.models import ModelShape
from disagg.catalog.accelerators import Accelerator


@dataclass(frozen=True)
class Efficiency:
    """Efficiency factors that turn accelerator peaks into sustained engine throughput."""

    prefill_mfu: float = 0.45
    """Fraction of peak matmul FLOP/s a prefill batch sustains. Dense models reach 40-60 % on H100-class
    parts in vLLM/SGLang for prompts of a few thousand tokens; 0.45 stays on the safe side."""
    moe_mfu_factor: float = 0.7
    """Extra factor on prefill MFU for mixture-of-experts models: small per-expert GEMMs and the expert
    all-to-all lose about a third of the dense efficiency."""
    decode_mbu: float = 0.7
    """Fraction of peak memory bandwidth a decode step sustains (60-80 % measured for large batches)."""
    decode_mfu: float = 0.5
    """Compute roof of a very large decode batch (rarely binding)."""
    decode_overhead_s: float = 0.004
    """Fixed cost of one decode step: scheduling, sampling, kernel launches (with CUDA graphs)."""
    allreduce_latency_s: float = 10e-6
    """Latency of one small tensor-parallel all-reduce; a decode step does two per layer."""
    memory_utilization: float = 0.9
    """Share of accelerator memory the engine may use (vLLM's gpu_memory_utilization default)."""
    activation_reserve_bytes: float = 4e9
    """Per accelerator: activations, CUDA graphs and fragmentation, not available to the KV cache."""
    link_efficiency: float = 0.7
    """Share of a link's nominal bandwidth a KV transfer achieves."""
    link_latency_s: float = 0.002
    """Fixed cost of one KV hand-off (handshake, block metadata, first byte)."""
    internode_latency_s: float = 20e-6
    """Latency of one collective or pipeline hop between nodes over RDMA (EFA, InfiniBand): a few
    times the in-node all-reduce's (multi-node workers only, `disagg.capacity.multinode`)."""
    layer_latency_s: float = 0.0
    """Fixed cost per layer of one decode step. 0 for GPUs (their fixed cost is `decode_overhead_s`);
    the SRAM-class parts' catalogue entries fit it to the vendor's published single-user speed."""


DEFAULT_EFFICIENCY = Efficiency()

RDMA_LINK_BYTES_PER_S = 50e9
"""Per accelerator: one 400 Gb/s RDMA NIC per GPU (p5/a3-class instances)."""
TCP_LINK_BYTES_PER_S = 3.0e9
"""Per pod without RDMA: what TCP through the pod network sustains on a 25-100 GbE node."""


def _act_bytes(model: ModelShape) -> float:
    return 2.0  # activations travel in bf16 whatever the weight dtype


def kv_shard_fraction(model: ModelShape, tensor_parallel: int) -> float:
    """Share of a token's KV cache one accelerator of the replica holds.

    KV heads are split across tensor-parallel ranks (replicated once TP exceeds the KV heads); the MLA
    latent is not split by heads, so every rank keeps all of it.
    """
    if model.kv_lora_rank is not None:
        return 1.0
    return 1.0 / min(tensor_parallel, model.kv_heads)


def kv_capacity_tokens(
    model: ModelShape, accelerator: Accelerator, tensor_parallel: int, eff: Efficiency = DEFAULT_EFFICIENCY
) -> float:
    """Tokens of KV cache one replica holds (0 when the weights do not fit)."""
    per_gpu_free = (
        accelerator.specs.memory_bytes * eff.memory_utilization
        - model.weight_bytes / tensor_parallel
        - eff.activation_reserve_bytes
    )
    if per_gpu_free <= 0:
        return 0.0
    return per_gpu_free / (model.kv_bytes_per_token * kv_shard_fraction(model, tensor_parallel))


def fits(model: ModelShape, accelerator: Accelerator, tensor_parallel: int, min_tokens: float = 0.0) -> bool:
    """Whether the weights fit on `tensor_parallel` accelerators with room for `min_tokens` of KV cache."""
    return kv_capacity_tokens(model, accelerator, tensor_parallel) > max(min_tokens, 0.0)


def prefill_seconds_per_token(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    prompt_tokens: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Mean time one prompt token of a `prompt_tokens`-long prompt costs a replica."""
    mfu = eff.prefill_mfu * (eff.moe_mfu_factor if model.is_moe else 1.0)
    peak = accelerator.specs.peak_flops(model.weight_dtype) * tensor_parallel * mfu
    # Causal attention: on average a prompt token attends to half the prompt.
    flops = 2.0 * model.active_parameters + model.attention_flops_per_token(prompt_tokens / 2.0)
    compute = flops / peak
    communication = 0.0
    if tensor_parallel > 1 and accelerator.specs.interconnect_bandwidth > 0:
        # Two all-reduces of the hidden state per layer; a ring moves 2 (TP-1)/TP of the bytes.
        allreduce_bytes = 2 * model.layers * model.hidden_size * _act_bytes(model)
        ring = 2.0 * (tensor_parallel - 1) / tensor_parallel
        communication = allreduce_bytes * ring / accelerator.specs.interconnect_bandwidth
    return compute + communication


def prefill_tokens_per_s(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    prompt_tokens: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Prompt tokens per second one replica processes, for prompts of `prompt_tokens` tokens."""
    return 1.0 / prefill_seconds_per_token(model, accelerator, tensor_parallel, prompt_tokens, eff)


def prefill_seconds(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    prompt_tokens: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Time one replica spends on one prompt of `prompt_tokens` tokens (no queueing)."""
    return prompt_tokens * prefill_seconds_per_token(model, accelerator, tensor_parallel, prompt_tokens, eff)


@dataclass(frozen=True)
class DecodeCost:
    """The decode step of one replica as coefficients, so that a simulator can apply the same formula to
    arrays of replicas: step = max(weights read x s/byte + total context x s/token, batch x s/sequence)
    + overhead."""

    weight_bytes: float
    active_share: float
    """Active over total parameters (1 for a dense model): the share of the weights one token reads."""
    seconds_per_weight_byte: float
    seconds_per_context_token: float
    """Per token of context held by any sequence of the batch."""
    seconds_per_sequence: float
    """The compute roof: matmul time of one sequence's token."""
    overhead_s: float

    @classmethod
    def of(
        cls, model: ModelShape, accelerator: Accelerator, tensor_parallel: int, eff: Efficiency = DEFAULT_EFFICIENCY
    ) -> DecodeCost:
        bandwidth = eff.decode_mbu * accelerator.specs.memory_bandwidth
        return cls(
            weight_bytes=model.weight_bytes,
            active_share=model.active_parameters / model.parameters if model.is_moe else 1.0,
            seconds_per_weight_byte=1.0 / (tensor_parallel * bandwidth),
            seconds_per_context_token=model.kv_bytes_per_token * kv_shard_fraction(model, tensor_parallel) / bandwidth,
            seconds_per_sequence=2.0 * model.active_parameters
            / (eff.decode_mfu * accelerator.specs.peak_flops(model.weight_dtype) * tensor_parallel),
            overhead_s=eff.decode_overhead_s
            + (2 * model.layers * eff.allreduce_latency_s if tensor_parallel > 1 else 0.0),
        )

    def weights_read(self, batch: float) -> float:
        """Weight bytes one step reads for `batch` sequences: all of a dense model; of a mixture of experts,
        the experts its tokens route to (each token touches `active_share`, a batch 1 - (1 - share)^batch)."""
        if self.active_share >= 1.0:
            return self.weight_bytes
        return float(self.weight_bytes * (1.0 - (1.0 - self.active_share) ** max(batch, 1.0)))

    def step_seconds(self, batch: float, context_tokens: float) -> float:
        """One step of `batch` sequences holding `context_tokens` tokens of KV cache in all."""
        weights = self.weights_read(batch) * self.seconds_per_weight_byte
        memory = weights + context_tokens * self.seconds_per_context_token
        compute = batch * self.seconds_per_sequence
        return (memory if memory > compute else compute) + self.overhead_s


def decode_step_seconds(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    batch: float,
    context_tokens: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Duration of one decode step of a replica running `batch` sequences of mean context `context_tokens`.

    Every sequence gains one token per step, so this is also the inter-token latency.
    """
    return DecodeCost.of(model, accelerator, tensor_parallel, eff).step_seconds(batch, batch * context_tokens)


def decode_max_batch(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    context_tokens: float,
    itl_s: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
    reserved_tokens: float | None = None,
) -> float:
    """Most concurrent sequences a replica runs with steps no longer than `itl_s` and room in its KV cache.

    `reserved_tokens` is the KV each sequence holds at its peak (default: `context_tokens`). Returns a
    real number (the capacity in sequences); 0 when even one sequence misses the target or does not fit.
    """
    kv_limit = kv_capacity_tokens(model, accelerator, tensor_parallel, eff) / max(
        reserved_tokens if reserved_tokens is not None else context_tokens, 1.0
    )
    if decode_step_seconds(model, accelerator, tensor_parallel, 1.0, context_tokens, eff) > itl_s:
        return 0.0
    low, high = 1.0, max(1.0, kv_limit)
    if decode_step_seconds(model, accelerator, tensor_parallel, high, context_tokens, eff) <= itl_s:
        return kv_limit
    for _ in range(40):  # the step time grows monotonically with the batch: bisect
        mid = (low + high) / 2.0
        if decode_step_seconds(model, accelerator, tensor_parallel, mid, context_tokens, eff) <= itl_s:
            low = mid
        else:
            high = mid
    return min(low, kv_limit)


def decode_tokens_per_s(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    context_tokens: float,
    itl_s: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
    reserved_tokens: float | None = None,
) -> float:
    """Generated tokens per second of one replica at the largest batch that keeps steps within `itl_s`."""
    batch = decode_max_batch(model, accelerator, tensor_parallel, context_tokens, itl_s, eff, reserved_tokens)
    if batch <= 0:
        return 0.0
    return batch / decode_step_seconds(model, accelerator, tensor_parallel, batch, context_tokens, eff)


def kv_transfer_seconds(
    model: ModelShape,
    tokens: float,
    link_bytes_per_s: float,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> float:
    """Time to move the KV cache of `tokens` prompt tokens from a prefill to a decode replica.

    `link_bytes_per_s` is the aggregate bandwidth between the two replicas (for instance one RDMA NIC per
    accelerator times the smaller tensor-parallel size of the two sides).
    """
    if link_bytes_per_s <= 0:
        return math.inf
    return eff.link_latency_s + tokens * model.kv_bytes_per_token / (link_bytes_per_s * eff.link_efficiency)


def kv_link_bytes_per_s(prefill_tp: int, decode_tp: int, rdma: bool = True) -> float:
    """Aggregate prefill-to-decode bandwidth: one NIC per accelerator on the narrower side, or TCP."""
    if not rdma:
        return TCP_LINK_BYTES_PER_S
    return RDMA_LINK_BYTES_PER_S * min(prefill_tp, decode_tp)
