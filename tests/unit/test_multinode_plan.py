"""Workers over several nodes and SRAM-class decoders in the capacity model and `disagg plan`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from disagg.capacity import builtin_model
from disagg.capacity.multinode import (
    Layout,
    UnknownEfficiency,
    decode_step_seconds,
    efficiency_for,
    kv_capacity_tokens,
    layouts,
    min_accelerators,
)
from disagg.capacity.plan import SLO, PlanError, Workload, plan
from disagg.capacity.plan_cli import plan_main
from disagg.catalog.accelerators import DEFAULT_CATALOG

H100, H200, TRN3, WSE3 = (DEFAULT_CATALOG[n] for n in ("nvidia-h100", "nvidia-h200", "aws-trainium3", "cerebras-wse3"))
DEEPSEEK = builtin_model("deepseek-v3")
LLAMA_70B = builtin_model("llama-3.1-70b")


def test_a_model_one_node_cannot_hold_gets_a_decode_worker_over_two_nodes() -> None:
    # 671 GB of fp8 weights against 8 x 80 GB: no one-node H100 worker exists
    result = plan(DEEPSEEK, Workload(10, 2000, 300), SLO(2.0, 0.05), [H100], [H100])
    assert result.decode.nodes == 2 and result.decode.per_worker == 16
    assert result.decode.accelerators == result.decode.replicas * 16
    assert "do not fit one node" in result.decode.why
    assert result.prefill.nodes == 2 and "do not fit one node of 8 x nvidia-h100" in result.prefill.why
    with pytest.raises(PlanError, match="over up to 1 nodes"):
        plan(DEEPSEEK, Workload(10, 2000, 300), SLO(2.0, 0.05), [H100], [H100], max_nodes=1)


def test_long_contexts_make_a_wide_expert_parallel_worker_cheaper_than_one_node_workers() -> None:
    load, slo = Workload(10, 32000, 1000), SLO(3.0, 0.05)
    result = plan(DEEPSEEK, load, slo, [H200], [H200])
    one_node = plan(DEEPSEEK, load, slo, [H200], [H200], max_nodes=1)
    assert result.decode.layout == Layout(data=16, expert=True, nodes=2)
    assert result.decode.usd_per_hour < one_node.decode.usd_per_hour
    assert one_node.decode.nodes == 1
    assert f"one-node workers would need {one_node.decode.replicas} x TP8" in result.decode.why


def test_data_parallel_attention_multiplies_the_kv_capacity_of_mla() -> None:
    # the MLA latent is replicated over TP but each DP rank holds only its own sequences
    tp8 = kv_capacity_tokens(DEEPSEEK, H200, Layout(tensor=8))
    dp16 = kv_capacity_tokens(DEEPSEEK, H200, Layout(data=16, expert=True, nodes=2))
    assert dp16 > 16 * tp8
    # and the expert all-to-all over EFA costs more per step than all-reduces inside one node
    wide = decode_step_seconds(DEEPSEEK, H200, Layout(data=16, expert=True, nodes=2), 1.0, 2000)
    assert wide > decode_step_seconds(DEEPSEEK, H200, Layout(data=8, expert=True), 1.0, 2000)


def test_cerebras_matches_its_published_figures_for_llama_70b_in_16_bit() -> None:
    bf16 = LLAMA_70B.with_dtypes(weight_dtype="bf16")
    # "70B models fit on as few as four systems", 450 tok/s per user at launch
    assert min_accelerators(bf16, WSE3, 0.0) == 4
    speed = 1.0 / decode_step_seconds(bf16, WSE3, Layout(pipeline=4, nodes=4), 1.0, 1000)
    assert speed == pytest.approx(450, rel=0.02)
    assert layouts(bf16, WSE3, 8, 0.0)[0] == Layout(pipeline=4, nodes=4)


def test_an_itl_no_gpu_reaches_is_met_by_sram_decode_and_the_reason_is_given() -> None:
    load, slo = Workload(10, 2000, 300), SLO(1.0, 0.005)
    with pytest.raises(PlanError, match=r"shortest step for one sequence is \d+\.\d ms \(nvidia-h200 TP8"):
        plan(LLAMA_70B, load, slo, [H100], [H200])
    result = plan(LLAMA_70B, load, slo, [TRN3], [WSE3])
    assert result.decode.predicted_latency_s < 0.005 and result.decode.accelerator.plan_only
    assert not result.priced and result.prefill.accelerator.name == "aws-trainium3"
    assert "SRAM" in result.decode.why and "80 layers" in result.decode.why


def test_unpriced_options_rank_after_priced_ones() -> None:
    result = plan(LLAMA_70B, Workload(10, 2000, 300), SLO(1.0, 0.05), [H100], [H200, WSE3])
    assert result.decode.accelerator.name == "nvidia-h200"


def test_compare_shows_each_pair_with_its_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "llama-3.1-70b", "--rate", "10", "--isl", "2000", "--osl", "300", "--itl-ms", "5",
            "--compare", "aws-trainium3/cerebras-wse3,nvidia-h100/nvidia-h200"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "aws-trainium3/cerebras-wse3" in out and "unpriced" in out
    assert "nvidia-h100/nvidia-h200            does not meet the SLO" in out
    assert "shortest step for one sequence" in out
    assert plan_main(["--rate", "1", "--isl", "10", "--osl", "10", "--compare", "nvidia-h100"]) == 2
    assert "PREFILL/DECODE" in capsys.readouterr().err


def test_json_output_carries_the_worker_layout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "deepseek-v3", "--rate", "10", "--isl", "2000", "--osl", "300", "--ttft-ms", "2000",
            "--prefill-accelerators", "nvidia-h100", "--decode-accelerators", "nvidia-h100", "-o", "json"]
    assert plan_main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["decode"]["nodesPerWorker"] == 2 and body["decode"]["acceleratorsPerWorker"] == 16
    assert "why" in body["decode"]


def test_the_catalogue_says_where_multi_node_figures_come_from() -> None:
    for name in DEFAULT_CATALOG.names():
        accelerator = DEFAULT_CATALOG[name]
        efficiency_for(accelerator)  # every override names a real factor
        if accelerator.memory_kind == "sram":
            assert accelerator.plan_only and not accelerator.priced and accelerator.sources, name
            assert accelerator.price_source.startswith("no public"), name
        elif accelerator.vendor in ("nvidia", "aws"):
            assert accelerator.topology_labels and accelerator.scale_out_bandwidth > 0, name


def test_an_unknown_efficiency_override_is_named() -> None:
    broken = dataclasses.replace(WSE3, efficiency={"layer_latencyy_s": 1.0})
    with pytest.raises(UnknownEfficiency, match="layer_latencyy_s"):
        efficiency_for(broken)


def test_a_pool_cannot_request_a_planner_only_accelerator() -> None:
    from disagg.api.validate import InvalidSpec, validate_service

    body = {
        "metadata": {"name": "svc", "namespace": "ns"},
        "spec": {
            "model": {"name": "m", "uri": "hf://org/m"},
            "prefill": {"accelerator": {"type": "aws-trainium3"}},
            "decode": {"accelerator": {"type": "cerebras-wse3"}},
        },
    }
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    [error] = [e for e in caught.value.errors if e.field.startswith("spec.decode")]
    assert error.field == "spec.decode.accelerator.type"
    assert "planner-only" in error.message and "cerebras.net/wse3" in error.message


def test_an_emitted_multi_node_plan_is_a_valid_service_and_planner_only_ones_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import yaml

    from disagg.api.validate import validate_service

    argv = ["--model", "deepseek-v3", "--rate", "10", "--isl", "32000", "--osl", "1000", "--ttft-ms", "3000",
            "--prefill-accelerators", "nvidia-h200", "--decode-accelerators", "nvidia-h200", "--emit-manifest"]
    assert plan_main(argv) == 0
    body = yaml.safe_load(capsys.readouterr().out)
    spec = validate_service(body, DEFAULT_CATALOG)
    assert spec.decode.worker_nodes == 2 and spec.decode.parallelism.expert
    assert spec.model.architecture is not None and spec.model.architecture.experts == 256
    argv = ["--rate", "10", "--isl", "2000", "--osl", "300", "--itl-ms", "5", "--prefill-accelerators",
            "aws-trainium3", "--decode-accelerators", "cerebras-wse3", "--emit-manifest"]
    assert plan_main(argv) == 2
    assert "planner-only" in capsys.readouterr().err
