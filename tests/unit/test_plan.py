"""`disagg plan`: cheapest per-phase choices, the aggregated comparison, and a valid manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity import builtin_model
from disagg.capacity.plan import SLO, PlanError, Workload, plan
from disagg.capacity.plan_cli import plan_main
from disagg.catalog.accelerators import DEFAULT_CATALOG

H100, H200, B200 = (DEFAULT_CATALOG[n] for n in ("nvidia-h100", "nvidia-h200", "nvidia-b200"))


def test_plan_meets_the_slo_and_scales_with_load() -> None:
    model = builtin_model("llama-3.1-70b")
    small = plan(model, Workload(5, 2000, 200), SLO(1.0, 0.05), [H100], [H200])
    big = plan(model, Workload(50, 2000, 200), SLO(1.0, 0.05), [H100], [H200])
    assert small.prefill.predicted_latency_s <= 1.0 and small.decode.predicted_latency_s <= 0.05
    assert big.prefill.replicas > 5 * small.prefill.replicas // 2
    assert big.usd_per_hour > 5 * small.usd_per_hour
    assert big.tokens_per_dollar > 0 and ":" in big.pd_ratio


def test_plan_picks_the_cheaper_candidate_per_phase() -> None:
    model = builtin_model("llama-3.1-70b")
    result = plan(model, Workload(30, 2000, 300), SLO(1.0, 0.05), [H100, B200], [H100, H200])
    options = plan(model, Workload(30, 2000, 300), SLO(1.0, 0.05), [result.prefill.accelerator],
                   [result.decode.accelerator])
    for other_prefill in (H100, B200):
        alternative = plan(model, Workload(30, 2000, 300), SLO(1.0, 0.05), [other_prefill],
                           [result.decode.accelerator])
        assert options.prefill.usd_per_hour <= alternative.prefill.usd_per_hour
    assert result.aggregated is not None


def test_impossible_slo_is_explained() -> None:
    with pytest.raises(PlanError, match="ITL 5 ms"):
        plan(builtin_model("llama-3.1-70b"), Workload(5, 2000, 200), SLO(1.0, 0.005), [H100], [H200])


def test_cli_outputs_and_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main(["--rate", "10", "--isl", "2000", "--osl", "200", "--ttft-ms", "1000", "-o", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert {"prefill", "decode", "pdRatio", "usdPerHour", "tokensPerDollar", "aggregated"} <= set(body)
    assert plan_main(["--rate", "10", "--isl", "2000", "--osl", "200", "--ttft-ms", "1000", "--emit-manifest",
                      "--name", "llama"]) == 0
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert manifest["kind"] == "InferenceService" and manifest["metadata"]["name"] == "llama"
    spec = InferenceServiceSpec.model_validate(manifest["spec"])
    assert spec.prefill.replicas == body["prefill"]["replicas"]
    assert spec.decode.accelerator.type == body["decode"]["accelerator"]
    assert spec.model.architecture is not None and spec.model.architecture.layers == 80
    assert plan_main(["--rate", "10"]) == 2
    assert "--isl" in capsys.readouterr().err


def test_plan_of_a_trace_says_up_front_which_requests_no_replica_count_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # one prompt in ten is 60k tokens: on one H100 its prefill alone takes seconds, over the 1-s target
    trace = tmp_path / "long.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": i * 200, "input_length": 60_000 if i % 10 == 0 else 1_000,
                    "output_length": 100, "hash_ids": []}) + "\n" for i in range(200)
    ))
    args = ["--trace", str(trace), "--ttft-ms", "1000", "--percentile", "99", "--prefill-accelerators", "nvidia-h100",
            "--decode-accelerators", "nvidia-h200", "--model", "llama-3.1-8b"]
    assert plan_main(args) == 0
    text = capsys.readouterr().out
    assert "out of reach: 10 % of the trace's requests" in text and "prompts over" in text
    assert "no replica count meets it" in text  # 10 % is more than the 1 % a p99 SLO allows
    assert plan_main([*args, "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)["outOfReach"]
    assert out["percent"] == 10.0 and out["longPrompts"]["percent"] == 10.0 and not out["sloReachable"]
    assert 1_000 < out["longPrompts"]["overTokens"] < 60_000
