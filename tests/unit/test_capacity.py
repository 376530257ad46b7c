"""The roofline capacity model: KV sizes, prefill and decode throughput, memory, transfer, model loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from disagg.api.v1alpha1 import ModelArchitecture
from disagg.capacity import (
    ModelConfigError,
    builtin_model,
    decode_max_batch,
    decode_step_seconds,
    from_architecture,
    from_hf_config,
    kv_capacity_tokens,
    kv_transfer_seconds,
    prefill_seconds,
    prefill_tokens_per_s,
)
from disagg.capacity.sizing import erlang_c, queue_wait_percentile, size_decode, size_prefill
from disagg.catalog.accelerators import DEFAULT_CATALOG

H100 = DEFAULT_CATALOG["nvidia-h100"]
H200 = DEFAULT_CATALOG["nvidia-h200"]
LLAMA_70B = builtin_model("llama-3.1-70b")


@pytest.mark.parametrize(
    ("model", "bytes_per_token"),
    [
        ("llama-3.1-70b", 2 * 80 * 8 * 128 * 2),  # 320 KiB, as ARCHITECTURE.md says
        ("llama-3.1-8b", 2 * 32 * 8 * 128 * 2),
        ("qwen3-32b", 2 * 64 * 8 * 128 * 2),
        ("qwen3-235b-a22b", 2 * 94 * 4 * 128 * 2),
        ("deepseek-v3", 61 * (512 + 64) * 2),  # MLA: one latent plus the rotary key, no K/V pair
    ],
)
def test_kv_bytes_per_token_follow_the_architecture(model: str, bytes_per_token: int) -> None:
    assert builtin_model(model).kv_bytes_per_token == bytes_per_token


def test_fp8_kv_cache_halves_the_bytes_and_doubles_the_capacity() -> None:
    fp8 = LLAMA_70B.with_dtypes(kv_dtype="fp8")
    assert fp8.kv_bytes_per_token == LLAMA_70B.kv_bytes_per_token / 2
    assert kv_capacity_tokens(fp8, H200, 1) == pytest.approx(2 * kv_capacity_tokens(LLAMA_70B, H200, 1))


def test_weights_that_do_not_fit_leave_no_kv_capacity() -> None:
    bf16 = LLAMA_70B.with_dtypes(weight_dtype="bf16")  # 141 GB of weights
    assert kv_capacity_tokens(bf16, H100, 1) == 0
    assert kv_capacity_tokens(bf16, H100, 4) > 0
    assert decode_max_batch(bf16, H100, 1, 1000, 0.05) == 0


def test_tensor_parallelism_adds_prefill_throughput_with_diminishing_returns() -> None:
    one, two, eight = (prefill_tokens_per_s(LLAMA_70B, H100, tp, 2000) for tp in (1, 2, 8))
    assert two > 1.5 * one
    assert eight < 8 * one  # all-reduce traffic over NVLink is not free


def test_long_prompts_cost_more_per_token_through_attention() -> None:
    short = prefill_tokens_per_s(LLAMA_70B, H100, 2, 1000)
    long = prefill_tokens_per_s(LLAMA_70B, H100, 2, 100_000)
    assert long < 0.6 * short
    assert prefill_seconds(LLAMA_70B, H100, 2, 100_000) > 100 * prefill_seconds(LLAMA_70B, H100, 2, 1000)


def test_fp8_weights_double_the_prefill_roof() -> None:
    bf16 = LLAMA_70B.with_dtypes(weight_dtype="bf16")
    ratio = prefill_tokens_per_s(LLAMA_70B, H100, 2, 1) / prefill_tokens_per_s(bf16, H100, 2, 1)
    assert ratio == pytest.approx(2.0, rel=0.25)


def test_decode_step_grows_with_batch_and_context_and_more_bandwidth_is_faster() -> None:
    base = decode_step_seconds(LLAMA_70B, H200, 1, 8, 2000)
    assert decode_step_seconds(LLAMA_70B, H200, 1, 32, 2000) > base
    assert decode_step_seconds(LLAMA_70B, H200, 1, 8, 8000) > base
    # Weights are the floor: 70.6 GB at 70 % of 4.8 TB/s is ~21 ms.
    assert 0.020 < decode_step_seconds(LLAMA_70B, H200, 1, 1, 1) < 0.030
    h100_tp2 = decode_step_seconds(LLAMA_70B, H100, 2, 8, 2000)
    assert h100_tp2 < base  # two H100s read twice the bandwidth


def test_decode_max_batch_respects_the_itl_and_the_kv_cache() -> None:
    batch = decode_max_batch(LLAMA_70B, H200, 1, 300, 0.03)  # short contexts: the ITL binds
    assert decode_step_seconds(LLAMA_70B, H200, 1, batch, 300) <= 0.03 + 1e-9
    assert decode_step_seconds(LLAMA_70B, H200, 1, batch * 1.05, 300) > 0.03
    kv_bound = decode_max_batch(LLAMA_70B, H200, 1, 2000, 0.05)  # long contexts: the KV cache binds
    assert kv_bound * 2000 == pytest.approx(kv_capacity_tokens(LLAMA_70B, H200, 1))
    long = decode_max_batch(LLAMA_70B, H200, 1, 100_000, 0.5)
    assert long * 100_000 <= kv_capacity_tokens(LLAMA_70B, H200, 1) + 1


def test_mixture_of_experts_reads_few_experts_at_small_batch() -> None:
    qwen = builtin_model("qwen3-235b-a22b")
    b200 = DEFAULT_CATALOG["nvidia-b200"]
    assert decode_step_seconds(qwen, b200, 4, 1, 1000) < 0.5 * decode_step_seconds(qwen, b200, 4, 256, 1000)


def test_kv_transfer_time_scales_with_tokens_and_link() -> None:
    slow = kv_transfer_seconds(LLAMA_70B, 10_000, 12.5e9)
    fast = kv_transfer_seconds(LLAMA_70B, 10_000, 50e9)
    assert slow > 3 * (fast - 0.002)
    # 10k tokens x 320 KiB = 3.3 GB over 50 GB/s at 70 % efficiency: ~94 ms plus 2 ms latency.
    assert fast == pytest.approx(0.002 + 10_000 * 327_680 / (50e9 * 0.7))


def test_from_architecture_uses_the_spec_numbers() -> None:
    spec = ModelArchitecture.model_validate(
        {"parameters": 70.6e9, "layers": 80, "kvHeads": 8, "headDim": 128, "weightDtype": "fp8", "kvDtype": "fp8"}
    )
    shape = from_architecture(spec, "meta-llama/Llama-3.1-70B-Instruct")
    assert shape.attention_heads == 64  # from the matching built-in model
    assert shape.kv_bytes_per_token == LLAMA_70B.kv_bytes_per_token / 2
    unknown = from_architecture(
        ModelArchitecture.model_validate({"parameters": 13e9, "layers": 40, "kvHeads": 40, "headDim": 128}), "x"
    )
    assert 4000 < unknown.hidden_size < 6500  # estimated from 12 x hidden^2 per layer
    assert unknown.kv_bytes_per_token == 2 * 40 * 40 * 128 * 2


def test_hf_config_of_llama_70b_matches_the_builtin(tmp_path: Path) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    shape = from_hf_config(path)
    assert shape.parameters == pytest.approx(70.6e9, rel=0.01)
    assert shape.kv_bytes_per_token == LLAMA_70B.kv_bytes_per_token


def test_hf_config_of_a_moe_counts_active_parameters(tmp_path: Path) -> None:
    config = {
        "hidden_size": 4096, "num_attention_heads": 64, "num_hidden_layers": 94, "num_key_value_heads": 4,
        "head_dim": 128, "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
        "moe_intermediate_size": 1536, "intermediate_size": 12288,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    shape = from_hf_config(path, weight_dtype="fp8")
    assert shape.parameters == pytest.approx(235e9, rel=0.02)
    assert shape.active_parameters == pytest.approx(22e9, rel=0.05)
    assert shape.weight_dtype == "fp8"


def test_bad_model_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"llama-3\.1-70b"):
        builtin_model("gpt-17")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 10}))
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        from_hf_config(path)


def test_erlang_c_and_queue_wait() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert queue_wait_percentile(4, 1.0, 1.0, 90) == 0.0  # light load: the p90 arrival does not wait
    assert queue_wait_percentile(1, 2.0, 1.0, 90) == float("inf")  # overloaded
    assert queue_wait_percentile(2, 1.8, 1.0, 90) > queue_wait_percentile(3, 1.8, 1.0, 90)


def test_sizing_meets_its_targets() -> None:
    prefill = size_prefill(LLAMA_70B, H100, 2, prompt_tokens_per_s=50_000, mean_prompt_tokens=2000,
                           ttft_budget_s=0.8, percentile=90)
    assert prefill.predicted_ttft_s <= 0.8
    assert prefill.replicas * prefill.tokens_per_s_per_replica > 50_000
    smaller = size_prefill(LLAMA_70B, H100, 2, prompt_tokens_per_s=50_000, mean_prompt_tokens=2000,
                           ttft_budget_s=0.8, percentile=90, correction=1.0 / 3)
    assert smaller.replicas <= prefill.replicas
    decode = size_decode(LLAMA_70B, H200, 1, generation_tokens_per_s=20_000, concurrent_sequences=0,
                         mean_prompt_tokens=2000, mean_output_tokens=200, itl_target_s=0.045)
    assert decode.replicas * decode.tokens_per_s_per_replica >= 20_000
    assert decode.predicted_itl_s <= 0.045


def test_settled_utilization_is_lower_for_slow_service_and_small_pools() -> None:
    from disagg.capacity.sizing import settled_utilization

    fast = settled_utilization(40, 0.1, 15.0)
    slow = settled_utilization(4, 2.0, 15.0)
    assert 0.5 <= slow < fast <= 0.99
    assert settled_utilization(40, 0.1, 60.0) > fast  # a longer span settles closer to saturation


@pytest.mark.parametrize(
    ("budget_s", "expect_absorbed"),
    [
        (0.8, False),   # a one-second budget: the burst window must be served as it comes
        (20.0, True),   # a twenty-second budget: the queue carries the burst into the next windows
    ],
)
def test_replay_sizing_absorbs_short_bursts_only_with_a_long_budget(budget_s: float, expect_absorbed: bool) -> None:
    from disagg.capacity.sizing import prefill_miss_share, size_prefill_attainment

    per_replica, service = 10_000.0, 0.2
    calm = (50_000.0, 25.0)  # five replicas' worth
    burst = (80_000.0, 40.0)  # eight replicas' worth, for one 15-s window
    windows = [calm] * 9 + [burst] + [calm] * 10
    replicas, share = size_prefill_attainment(
        windows, step_s=15.0, service_s=service, tokens_per_replica_s=per_replica, ttft_budget_s=budget_s,
        miss_share=0.005,
    )
    assert share <= 0.005
    assert (replicas < 8) == expect_absorbed, replicas
    # More replicas never miss more, fewer never miss less.
    shares = [prefill_miss_share(n, windows, step_s=15.0, service_s=service, tokens_per_replica_s=per_replica,
                                 ttft_budget_s=budget_s) for n in range(5, 12)]
    assert shares == sorted(shares, reverse=True)


def test_replay_sizing_counts_the_floor_and_the_effective_load() -> None:
    from disagg.capacity.sizing import size_prefill_attainment

    windows = [(60_000.0, 30.0)] * 20
    kwargs: dict[str, Any] = {"step_s": 15.0, "service_s": 0.2, "tokens_per_replica_s": 10_000.0, "ttft_budget_s": 1.0,
              "miss_share": 0.005}
    plain, _ = size_prefill_attainment(windows, **kwargs)
    floored, _ = size_prefill_attainment(windows, floor_s=0.7, **kwargs)  # long prompts eat the budget
    bursty, _ = size_prefill_attainment(windows, load_factor=2.0, **kwargs)
    assert 6 < plain < floored
    assert bursty >= 2 * 6
