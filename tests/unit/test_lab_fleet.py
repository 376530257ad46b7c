"""The lab's simulated engines (disagg_lab): exposition format, injected loads, the
targets file, and the HTTP shell (pod sites on loopback, control API) without a cluster."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient
from prometheus_client.parser import text_string_to_metric_families

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.roofline import kv_transfer_seconds
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.catalog.accelerators import load_catalog
from disagg.engines import ENGINES
from disagg.scaling.policy import PolicySettings
from disagg_lab.engines import FleetSim
from disagg_lab.kube import PodObservation, pod_observation
from disagg_lab.metrics import ENGINE_METRICS, Histogram
from disagg_lab.offered import LoadError, LoadSpec, parse_load_arg, parse_load_spec
from disagg_lab.targets import FLEET_LABEL, write_targets
from support.paths import REPO

EXAMPLE = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
SGLANG_EXAMPLE = next(
    d for d in yaml.safe_load_all((REPO / "examples" / "02-sglang-mooncake.yaml").read_text())
    if d and d.get("kind") == "InferenceService"
)
CATALOG = load_catalog()
SHARED_TRACES = REPO.parent / "shared" / "traces"


def spec_dict(kind: str = "vllm") -> dict[str, Any]:
    return copy.deepcopy((EXAMPLE if kind == "vllm" else SGLANG_EXAMPLE)["spec"])


def make_sim(
    load: str = "1x", prefill: int = 1, decode: int = 1, *, seed: int = 1, kind: str = "vllm", **kwargs: Any
) -> FleetSim:
    sim = FleetSim(CATALOG, seed=seed, default_load=parse_load_spec(load), **kwargs)
    assert sim.upsert_service("ns", "svc", spec_dict(kind)) is None
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            sim.add_pod(pod(role, i))
    return sim


def pod(role: str, i: int, *, service: str = "svc", ip: str | None = None, ready: bool = True) -> PodObservation:
    third = 0 if role == "prefill" else 1
    return PodObservation(
        uid=f"{service}-{role}-{i}", namespace="ns", name=f"{service}-{role}-{i}", service=service,
        role="prefill" if role == "prefill" else "decode", ip=ip or f"127.100.{third}.{10 + i}", ready=ready,
    )


def engines(sim: FleetSim, role: str) -> list[Any]:
    return [p.engine for p in sorted(sim.pods.values(), key=lambda p: p.pod.name) if p.pod.role == role]


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


# ----------------------------------------------------------------------------------------------------
# exposition


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_exposition_parses_with_the_engines_real_names_and_our_labels(kind: str) -> None:
    sim = make_sim("1x", 1, 1, kind=kind)
    sim.run(40)
    names = ENGINES[kind].metrics
    for sim_pod in sim.pods.values():
        parsed = families(sim_pod.metrics_page())
        expected_types = {
            names.running_requests[0]: "gauge",
            names.waiting_requests[0]: "gauge",
            names.kv_cache_usage[0]: "gauge",
            names.prompt_tokens_total.removesuffix("_total"): "counter",
            names.generation_tokens_total.removesuffix("_total"): "counter",
            names.ttft_histogram: "histogram",
            names.itl_histogram[0]: "histogram",
            names.e2e_histogram: "histogram",
        }
        for name, kind_of in expected_types.items():
            assert name in parsed, (name, sorted(parsed))
            assert parsed[name].type == kind_of, name
        # never the legacy names next to the current ones: the autoscaler's regexes would count twice
        assert "vllm:time_per_output_token_seconds" not in parsed
        assert "vllm:gpu_cache_usage_perc" not in parsed
        for family in parsed.values():
            for sample in family.samples:
                labels = sample.labels
                assert labels["namespace"] == "ns"
                assert labels["pod"] == sim_pod.pod.name
                assert labels["disagg_service"] == "svc"
                assert labels["disagg_role"] == sim_pod.pod.role
                assert labels["model_name"] == sim.services[("ns", "svc")].spec.model.name
                assert math.isfinite(sample.value) and sample.value >= 0


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_histogram_buckets_are_cumulative_and_end_with_the_count(kind: str) -> None:
    sim = make_sim("4x", 1, 1, kind=kind)  # overloaded: observations spread over many buckets
    sim.run(60)
    checked = 0
    for sim_pod in sim.pods.values():
        for family in families(sim_pod.metrics_page()).values():
            if family.type != "histogram":
                continue
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
            count = next(s.value for s in family.samples if s.name.endswith("_count"))
            total = next(s.value for s in family.samples if s.name.endswith("_sum"))
            bounds = [b for b, _ in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, family.name
            values = [v for _, v in buckets]
            assert all(a <= b for a, b in itertools.pairwise(values)), family.name
            assert values[-1] == count, family.name
            assert total >= 0 and (count > 0 or total == 0), family.name
            checked += 1
    assert checked >= 6


def test_vllm_buckets_are_vllms() -> None:
    vllm = ENGINE_METRICS["vllm"]
    assert vllm.itl_buckets[:3] == (0.01, 0.025, 0.05) and vllm.itl_buckets[-1] == 80.0
    assert vllm.ttft_buckets[0] == 0.001 and vllm.ttft_buckets[-1] == 2560.0
    assert vllm.e2e_buckets[0] == 0.3 and vllm.e2e_buckets[-1] == 7680.0
    sglang = ENGINE_METRICS["sglang"]
    assert sglang.itl_buckets[0] == 0.002 and sglang.ttft_buckets[0] == 0.1


def test_counters_never_decrease_and_page_is_cached_per_step() -> None:
    sim = make_sim("2x", 1, 1)
    previous: dict[str, float] = {}
    for _ in range(20):
        sim.run(2)
        for sim_pod in sim.pods.values():
            page = sim_pod.metrics_page()
            assert sim_pod.metrics_page() is page  # same step: rendered once
            for family in families(page).values():
                if family.type in ("counter", "histogram"):
                    for sample in family.samples:
                        key = f"{sim_pod.pod.name}/{sample.name}/{sorted(sample.labels.items())}"
                        assert sample.value >= previous.get(key, 0.0), key
                        previous[key] = sample.value


def test_label_values_are_escaped() -> None:
    spec = spec_dict()
    spec["model"]["name"] = 'weird "model"\\name'
    sim = FleetSim(CATALOG, seed=0)
    assert sim.upsert_service("ns", "svc", spec) is None
    sim_pod = sim.add_pod(pod("prefill", 0))
    (sample, *_) = families(sim_pod.metrics_page())["vllm:num_requests_running"].samples
    assert sample.labels["model_name"] == 'weird "model"\\name'


def test_histogram_quantile_matches_prometheus_interpolation() -> None:
    h = Histogram((0.1, 0.2, 0.4))
    h.observe(0.15, 10)
    assert h.quantile(0.5) == pytest.approx(0.15)
    assert h.count == 10 and h.sum == pytest.approx(1.5)
    h.observe(5.0)  # into +Inf
    assert h.cumulative() == [0, 10, 10, 11]
    assert Histogram((1.0,)).quantile(0.9) is None


# ----------------------------------------------------------------------------------------------------
# engine state evolution


# ----------------------------------------------------------------------------------------------------
# base load and SLO


def _policy_sizing(rps: float) -> tuple[int, int]:
    """Replicas the autoscaler's sizing asks for at `rps` of 1024/1024-token requests (examples/01)."""
    spec = InferenceServiceSpec.model_validate(spec_dict())
    sim = make_sim("1x", 0, 0)
    config = sim.services[("ns", "svc")].configs
    settings = PolicySettings()
    handoff = kv_transfer_seconds(config["prefill"].model, 1024, config["prefill"].kv_link_bytes_per_s)
    budget = spec.slo.ttft_ms / 1000 * settings.target_fraction - handoff - spec.slo.itl_ms / 1000
    p = size_prefill(config["prefill"].model, config["prefill"].accelerator, 2, prompt_tokens_per_s=rps * 1024,
                     mean_prompt_tokens=1024, ttft_budget_s=budget, percentile=spec.slo.percentile,
                     headroom=settings.prefill_headroom)
    d = size_decode(config["decode"].model, config["decode"].accelerator, 2, generation_tokens_per_s=rps * 1024,
                    concurrent_sequences=0, mean_prompt_tokens=1024, mean_output_tokens=1024,
                    itl_target_s=spec.slo.itl_ms / 1000 * settings.target_fraction,
                    headroom=settings.decode_headroom)
    return p.replicas, d.replicas


def test_service_without_a_capacity_model_is_reported_not_simulated() -> None:
    spec = spec_dict()
    spec["prefill"]["accelerator"] = {"resourceName": "example.com/npu", "nodeSelector": {"npu": "yes"}, "count": 2}
    sim = FleetSim(CATALOG)
    reason = sim.upsert_service("ns", "odd", spec)
    assert reason is not None and "resourceName" in reason
    assert ("ns", "odd") not in sim.services and ("ns", "odd") in sim.unsupported


# ----------------------------------------------------------------------------------------------------
# load specifications


def test_parse_load_specs() -> None:
    assert parse_load_spec("8") == LoadSpec(steps=((0.0, 8.0, False),))
    assert parse_load_spec("4x") == LoadSpec(steps=((0.0, 4.0, True),))
    steps = parse_load_spec("steps:0s@2,60s@8,2m@1x")
    assert steps.steps == ((0.0, 2.0, False), (60.0, 8.0, False), (120.0, 1.0, True))
    assert parse_load_spec(steps.text()) == steps
    trace = parse_load_spec("trace:/a/b.csv:2.5")
    assert (trace.trace, trace.time_scale) == ("/a/b.csv", 2.5)
    assert parse_load_spec("trace:b.jsonl").time_scale == 1.0
    key, spec = parse_load_arg("serving/llama-70b=steps:0s@2,30s@8")
    assert key == ("serving", "llama-70b") and len(spec.steps) == 2
    for bad in ("-1", "fast", "steps:10s@2,5s@3", "steps:10s", "1e9", "trace:x.csv:0", "2y"):
        with pytest.raises(LoadError):
            parse_load_spec(bad)
    for bad_arg in ("serving/llama-70b", "Serving/x=1", "noslash=1"):
        with pytest.raises(LoadError):
            parse_load_arg(bad_arg)


def test_steps_follow_their_schedule_from_when_the_load_was_set() -> None:
    sim = make_sim("steps:0s@2,20s@8,40s@0", 2, 1, output_tokens=16, arrivals="uniform")
    svc = sim.services[("ns", "svc")]
    counts = []
    for _ in range(3):
        before = svc.offered
        sim.run(20)
        counts.append(svc.offered - before)
    assert counts == [pytest.approx(40, abs=1), pytest.approx(160, abs=1), 0]
    sim.set_load("ns", "svc", parse_load_spec("steps:0s@1,10s@3"))  # a new schedule starts now
    assert svc.load.rps_at(sim.time) == 1.0
    assert svc.load.rps_at(sim.time + 10) == 3.0


def test_poisson_arrivals_average_to_the_rate() -> None:
    sim = make_sim("5", 2, 2, output_tokens=8)
    sim.run(200)
    assert sim.services[("ns", "svc")].offered == pytest.approx(1000, rel=0.1)


def test_trace_replay_uses_the_traces_sizes_and_loops(tmp_path: Path) -> None:
    azure = tmp_path / "tiny.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00.0000000,100,10\n"
        "2023-11-16 18:00:01.0000000,200,20\n"
        "2023-11-16 18:00:02.0000000,300,30\n"
    )
    sim = make_sim(f"trace:{azure}", 1, 1)
    load = sim.services[("ns", "svc")].load
    got = load.arrivals(0.0, 9.0, sim.services[("ns", "svc")].rng)
    assert [(round(t, 6), p, o) for t, p, o in got] == [
        (0.0, 100, 10), (1.0, 200, 20), (2.0, 300, 30), (3.0, 100, 10), (4.0, 200, 20), (5.0, 300, 30),
        (6.0, 100, 10), (7.0, 200, 20), (8.0, 300, 30),
    ]
    mooncake = tmp_path / "tiny.jsonl"
    mooncake.write_text("".join(json.dumps({"timestamp": i * 500, "input_length": 50 + i, "output_length": 5,
                                            "hash_ids": []}) + "\n" for i in range(4)))
    sim2 = make_sim(f"trace:{mooncake}:2", 1, 1, traces_dir=tmp_path)  # twice as fast
    got2 = sim2.services[("ns", "svc")].load.arrivals(0.0, 1.0, sim2.services[("ns", "svc")].rng)
    assert [round(t, 6) for t, _, _ in got2] == [0.0, 0.25, 0.5, 0.75]
    sim2.run(10)
    assert sim2.services[("ns", "svc")].offered == 40
    with pytest.raises(LoadError):
        make_sim("trace:missing.csv", traces_dir=tmp_path)


@pytest.mark.skipif(not (SHARED_TRACES / "azure2023_conv.csv").is_file(), reason="shared traces not present")
def test_trace_replay_of_a_shared_trace_by_relative_name() -> None:
    sim = make_sim("trace:azure2023_conv.csv:2", 2, 2)
    load = sim.services[("ns", "svc")].load
    assert load.workload is not None and load.workload.requests > 1000
    sim.run(30)
    assert sim.services[("ns", "svc")].offered > 0


# ----------------------------------------------------------------------------------------------------
# CPU


def test_fifty_pods_cost_a_small_share_of_one_core() -> None:
    sim = FleetSim(CATALOG, seed=0, default_load=parse_load_spec("2x"))
    for s in range(5):
        sim.upsert_service("ns", f"s{s}", spec_dict())
        for i in range(5):
            sim.add_pod(pod("prefill", i, service=f"s{s}", ip=f"127.100.{s}.{i}"))
            sim.add_pod(pod("decode", i, service=f"s{s}", ip=f"127.100.{s}.{100 + i}"))
    assert len(sim.pods) == 50
    sim.run(20)
    started = time.process_time()
    for _ in range(30):  # 60 simulated seconds, every pod scraped every 2 s
        sim.run(2)
        for sim_pod in sim.pods.values():
            sim_pod.metrics_page()
    cpu = time.process_time() - started
    assert cpu < 0.05 * 60, f"{cpu:.2f}s of CPU for 60 s of 50 pods"


# ----------------------------------------------------------------------------------------------------
# targets file, pod observations


def test_targets_file_replaces_only_our_groups_atomically(tmp_path: Path) -> None:
    path = tmp_path / "prometheus" / "engines.json"
    path.parent.mkdir()
    foreign = {"targets": ["127.0.0.1:9999"], "labels": {"job_hint": "someone"}}
    dead = {"targets": ["127.100.9.9:8000"], "labels": {FLEET_LABEL: "999999999"}}
    alive = {"targets": ["127.100.9.8:8000"], "labels": {FLEET_LABEL: str(os.getppid())}}
    path.write_text(json.dumps([foreign, dead, alive]))
    sim = make_sim("1x", 1, 1)
    ours = [{"targets": [f"{p.pod.ip}:{p.port}"], "labels": {**p.labels, FLEET_LABEL: "me"}}
            for p in sim.pods.values()]
    write_targets(path, ours, "me")
    groups = json.loads(path.read_text())
    assert foreign in groups and alive in groups and dead not in groups
    assert sum(1 for g in groups if g["labels"].get(FLEET_LABEL) == "me") == 2
    write_targets(path, [], "me")
    assert json.loads(path.read_text()) == [foreign, alive]
    assert sorted(p.name for p in path.parent.iterdir()) == ["engines.json", "engines.json.lock"]  # no temp files


def test_pod_observation_reads_role_service_readiness_and_ip() -> None:
    v1pod = kclient.V1Pod(
        metadata=kclient.V1ObjectMeta(uid="u1", namespace="ns", name="svc-decode-x",
                                      labels={"disagg.dev/role": "decode", "disagg.dev/service": "svc"}),
        status=kclient.V1PodStatus(phase="Running", pod_ip="127.100.3.4",
                                   conditions=[kclient.V1PodCondition(type="Ready", status="True")]),
    )
    obs = pod_observation(v1pod)
    assert obs == PodObservation("u1", "ns", "svc-decode-x", "svc", "decode", "127.100.3.4", True, False)
    assert v1pod.status is not None and v1pod.status.conditions and v1pod.metadata is not None
    v1pod.status.conditions[0].status = "False"
    unready = pod_observation(v1pod)
    assert unready is not None and not unready.ready
    v1pod.metadata.labels = {"disagg.dev/role": "router", "disagg.dev/service": "svc"}
    assert pod_observation(v1pod) is None


# ----------------------------------------------------------------------------------------------------
# the HTTP shell: pod sites on loopback addresses, control API (no cluster needed)




