"""The roofline with its default efficiency factors, against published production figures.

Tolerances are stated per figure, with why they are not tighter.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from disagg.capacity import DEFAULT_EFFICIENCY, builtin_model, prefill_tokens_per_s
from disagg.catalog.accelerators import DEFAULT_CATALOG

# An H800 is H100-class compute and memory with NVLink cut to 400 GB/s (200 GB/s per direction).
H100 = DEFAULT_CATALOG["nvidia-h100"]
H800 = replace(H100, name="nvidia-h800", specs=replace(H100.specs, interconnect_bandwidth=200e9))


def test_mooncake_llama3_70b_kv_cache_at_128k_tokens_is_40_gb() -> None:
    """Mooncake (FAST'25): ~40 GB of KV cache for Llama-3-70B at 128k tokens (bf16). Tolerance 5 %:
    the figure is pure arithmetic over the architecture; "40 GB" is 40 GiB = 42.9e9 bytes exactly."""
    total = builtin_model("llama-3.1-70b").kv_bytes_per_token * 128 * 1024
    assert total == pytest.approx(40 * 2**30, rel=0.05)


def test_deepseek_v3_prefill_per_h800_node() -> None:
    """DeepSeek's inference-system report: ~73.7k input tokens/s per H800 node during prefill.

    Model: 8 GPUs each running the prefill of DeepSeek-V3 in fp8 as data-parallel attention plus expert
    parallelism (no tensor-parallel all-reduce), at a 4k-token mean prompt. Tolerance +-25 %: the
    published number is a day average and counts prefix-cache hits (56.3 % of input tokens), two
    effects that pull in opposite directions and that a roofline cannot separate.
    """
    model = builtin_model("deepseek-v3")
    per_node = 8 * prefill_tokens_per_s(model, H800, 1, 4096)
    assert per_node == pytest.approx(73.7e3, rel=0.25)


def test_deepseek_v3_decode_per_h800_node() -> None:
    """DeepSeek's report: ~14.8k output tokens/s per H800 node during decode, at 20-22 tokens/s per user
    and a mean KV length of 4,989 tokens, on 18-node expert-parallel (EP144) decode groups.

    Model: each GPU holds 1/144 of the fp8 weights and the MLA cache of its own sequences; a step reads
    both at the default MBU, plus the fixed overhead, plus the expert all-to-all (dispatch in fp8,
    combine in bf16, 8 routed experts, 58 MoE layers) over one 50 GB/s RDMA NIC per GPU, which DeepSeek
    overlaps only partly. The largest batch whose step fits 1/21 s and whose KV fits memory gives the
    throughput. Tolerance: within a factor 1.6 either way, because the published figure is a day
    average over a deployment that is not always full, so the roofline's capacity should sit above it.
    """
    model = builtin_model("deepseek-v3")
    eff = DEFAULT_EFFICIENCY
    specs = H800.specs
    weights = model.weight_bytes / 144
    kv_per_seq = 4989 * model.kv_bytes_per_token
    all_to_all_per_seq = 58 * 8 * model.hidden_size * (1 + 2) / 50e9
    step_budget = 1.0 / 21.0
    memory_per_seq = kv_per_seq / (eff.decode_mbu * specs.memory_bandwidth)
    weight_time = weights / (eff.decode_mbu * specs.memory_bandwidth)
    by_latency = (step_budget - eff.decode_overhead_s - weight_time) / (memory_per_seq + all_to_all_per_seq)
    by_memory = (specs.memory_bytes * eff.memory_utilization - weights - eff.activation_reserve_bytes) / kv_per_seq
    per_node = 8 * min(by_latency, by_memory) * 21.0
    assert 14.8e3 / 1.6 <= per_node <= 14.8e3 * 1.6
    assert per_node >= 14.8e3  # a capacity, above a day's average
