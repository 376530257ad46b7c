"""The simulated engine fleet (disagg.sim.fleet): engine state evolution, exposition format, loads, the
targets file, and the HTTP shell (pod sites on loopback, control API) without a cluster."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes import client as kclient
from prometheus_client.parser import text_string_to_metric_families

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.roofline import decode_step_seconds, kv_transfer_seconds, prefill_seconds
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.catalog.accelerators import load_catalog
from disagg.catalog.engines import ENGINES
from disagg.scaling.policy import PolicySettings
from disagg.sim.fleet import (
    ENGINE_METRICS,
    FLEET_LABEL,
    DecodeEngine,
    Event,
    FleetServer,
    FleetSim,
    Histogram,
    LoadError,
    LoadSpec,
    PodObservation,
    PrefillEngine,
    Request,
    ServiceObservation,
    base_load,
    build_parser,
    parse_load_arg,
    parse_load_spec,
    pod_observation,
    write_targets,
)

REPO = Path(__file__).resolve().parents[2]
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


def test_prefill_queue_serves_at_the_roofline_rate_and_ttft_includes_queue_and_transfer() -> None:
    spec = InferenceServiceSpec.model_validate(spec_dict())
    sim = make_sim("1x", 1, 1)
    config = sim.services[("ns", "svc")].configs["prefill"]
    engine = PrefillEngine(config)
    service = prefill_seconds(config.model, config.accelerator, 2, 1024.0)
    transfer = kv_transfer_seconds(config.model, 1024.0, config.kv_link_bytes_per_s)
    for _ in range(3):  # three prompts at once: FIFO
        assert engine.submit(Request(0.0, 1024, 16, received=0.0))
    done = engine.step(0.0, 1.0)
    assert len(done) == 3
    assert [r.ready_at for r in done] == pytest.approx([(i + 1) * service + transfer for i in range(3)])
    assert engine.stats.ttft.sum == pytest.approx(sum((i + 1) * service + transfer for i in range(3)))
    assert engine.stats.prefill_time.sum == pytest.approx(3 * service)
    assert engine.stats.queue_time.sum == pytest.approx(service * (0 + 1 + 2))
    assert engine.stats.prompt_tokens == 3 * 1024 and engine.stats.generation_tokens == 3
    assert spec.slo.ttft_ms / 1000 > service + transfer


def test_prefill_waiting_grows_only_when_overloaded() -> None:
    calm = make_sim("1x", 1, 1)
    busy = make_sim("4x", 1, 1)  # ~12 requests/s offered to a replica that prefills ~11 per second
    (calm_prefill,) = engines(calm, "prefill")
    (busy_prefill,) = engines(busy, "prefill")
    backlog = []
    for _ in range(3):
        for sim in (calm, busy):
            sim.run(60)
        assert calm_prefill.gauges()[1] <= 5
        running, waiting, _ = busy_prefill.gauges()
        assert 1 <= running <= 8  # one 8192-token batch of 1024-token prompts runs, the rest waits
        backlog.append(waiting)
    assert backlog == sorted(backlog) and backlog[-1] > 50, backlog
    assert busy_prefill.stats.ttft.quantile(0.9) > 2.0 > calm_prefill.stats.ttft.quantile(0.9)


def test_decode_batch_is_bounded_by_the_kv_cache_and_usage_stays_within_0_and_1() -> None:
    sim = make_sim("4x", 3, 1)  # prefill keeps up, one decode replica cannot
    (decode,) = engines(sim, "decode")
    capacity = decode.config.kv_capacity_tokens
    peak = 0.0
    for _ in range(400):
        sim.tick()
        running, waiting, usage = decode.gauges()
        assert 0.0 <= usage <= 1.0
        assert decode.held_tokens() <= capacity
        assert running <= decode.config.max_num_seqs
        peak = max(peak, usage)
    assert peak > 0.9
    assert waiting > 0  # KV full: requests wait
    assert running * 1024 < capacity < running * (1024 + 1024)


def test_decode_itl_is_the_roofline_step_at_the_current_batch_and_context() -> None:
    sim = make_sim("1x", 1, 1)
    sim.run(60)
    (decode,) = engines(sim, "decode")
    c = decode.config
    batch = decode.running
    context = (decode.sum_prompt + batch * decode.clock - decode.sum_start) / batch
    expected = decode_step_seconds(c.model, c.accelerator, c.tensor_parallel, float(batch), context)
    itl = decode.stats.itl
    sum0, count0 = itl.sum, itl.count
    sim.tick()
    assert decode.step_seconds == pytest.approx(expected, rel=0.05)
    sim.run(5)
    assert (itl.sum - sum0) / (itl.count - count0) == pytest.approx(expected, rel=0.05)
    assert sim.services[("ns", "svc")].spec.slo.itl_ms / 1000 > expected


def test_steady_state_token_rates_match_the_offered_load() -> None:
    sim = make_sim("2", 2, 2, output_tokens=128)
    sim.run(40)
    before = {id(p.engine): (p.engine.stats.prompt_tokens, p.engine.stats.generation_tokens)
              for p in sim.pods.values()}
    sim.run(120)
    rates: dict[str, list[float]] = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}
    for p in sim.pods.values():
        prompt0, gen0 = before[id(p.engine)]
        rates[p.pod.role][0] += (p.engine.stats.prompt_tokens - prompt0) / 120
        rates[p.pod.role][1] += (p.engine.stats.generation_tokens - gen0) / 120
    offered_prompt = 2 * 1024
    assert rates["prefill"][0] == pytest.approx(offered_prompt, rel=0.15)
    assert rates["decode"][0] == pytest.approx(offered_prompt, rel=0.15)
    assert rates["decode"][1] == pytest.approx(2 * 128, rel=0.15)
    assert rates["prefill"][1] == pytest.approx(2, rel=0.15)  # one sampled token per prefill


def test_load_is_split_evenly_over_ready_pods_of_each_role() -> None:
    sim = make_sim("6", 2, 3, output_tokens=64)
    sim.run(120)
    prefill = [e.stats.prompt_tokens // 1024 for e in engines(sim, "prefill")]  # requests done
    decode = [e.stats.prompt_tokens // 1024 for e in engines(sim, "decode")]  # requests admitted
    assert len(prefill) == 2 and len(decode) == 3
    assert max(prefill) - min(prefill) <= 2  # round-robin (up to one in flight each)
    assert max(decode) - min(decode) <= 2
    assert sum(prefill) == pytest.approx(6 * 120, rel=0.12)
    svc = sim.services[("ns", "svc")]
    assert svc.unserved == 0 and svc.offered >= sum(prefill) >= sum(decode)


def test_removed_pods_get_no_more_work_and_no_pods_means_unserved() -> None:
    sim = make_sim("4", 2, 1, output_tokens=32)
    sim.run(10)
    gone = sim.remove_pod("svc-prefill-1")
    assert gone is not None
    requests = gone.engine.stats.requests
    sim.run(10)
    assert gone.engine.stats.requests == requests
    sim.remove_pod("svc-prefill-0")
    svc = sim.services[("ns", "svc")]
    unserved = svc.unserved
    sim.run(5)
    assert svc.unserved > unserved


def test_no_load_is_offered_before_the_first_pod_is_ready() -> None:
    sim = FleetSim(CATALOG, seed=0, default_load=parse_load_spec("5"))
    sim.upsert_service("ns", "svc", spec_dict())
    sim.run(10)
    svc = sim.services[("ns", "svc")]
    assert svc.offered == 0 and svc.unserved == 0


def test_same_seed_same_state_other_seed_other_state() -> None:
    def fingerprint(seed: int) -> str:
        sim = make_sim("2x", 2, 2, seed=seed)
        sim.run(30)
        return json.dumps(sim.state(), sort_keys=True)

    assert fingerprint(3) == fingerprint(3)
    assert fingerprint(3) != fingerprint(4)


def test_decode_preempts_the_youngest_when_the_cache_overflows() -> None:
    sim = make_sim("1x", 1, 1)
    config = sim.services[("ns", "svc")].configs["decode"]
    engine = DecodeEngine(dataclasses.replace(config, kv_capacity_tokens=40_000.0))
    for _ in range(30):  # 30 x 1000-token prompts, long outputs: the batch outgrows 40k tokens
        engine.submit(Request(0.0, 1000, 3000, received=0.0, ready_at=0.0))
    t = 0.0
    for _ in range(400):
        engine.step(t, 0.25)
        t += 0.25
        assert engine.held_tokens() <= 40_000
    assert engine.stats.preemptions > 0
    assert engine.stats.prompt_tokens == 30 * 1000  # preempted requests are not counted twice
    assert engine.stats.ttft.count == 30


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


def test_default_base_load_is_comfortable_at_min_replicas_and_4x_needs_more() -> None:
    spec = InferenceServiceSpec.model_validate(spec_dict())
    base = base_load(spec, CATALOG)
    assert base.prompt_tokens == base.output_tokens == 1024
    assert base.rps == pytest.approx(0.6 * min(base.prefill_capacity_rps, base.decode_capacity_rps))
    assert 1.0 < base.rps < 10.0
    assert _policy_sizing(base.rps) == (1, 1)
    prefill, decode = _policy_sizing(4 * base.rps)
    assert prefill >= 2 and decode >= 2


def test_base_load_meets_the_slo_on_one_pair_and_4x_does_not() -> None:
    slo = InferenceServiceSpec.model_validate(spec_dict()).slo
    calm = make_sim("1x", 1, 1)
    calm.run(120)
    (p,) = engines(calm, "prefill")
    (d,) = engines(calm, "decode")
    assert p.stats.ttft.quantile(slo.percentile / 100) < slo.ttft_ms / 1000
    assert d.stats.itl.quantile(slo.percentile / 100) < slo.itl_ms / 1000
    assert d.gauges()[1] == 0 and p.gauges()[1] <= 5
    busy = make_sim("4x", 1, 1)
    busy.run(120)
    (p,) = engines(busy, "prefill")
    (d,) = engines(busy, "decode")
    assert p.stats.ttft.quantile(slo.percentile / 100) > slo.ttft_ms / 1000
    assert d.gauges()[1] > 0 and d.gauges()[2] > 0.9
    scaled = make_sim("4x", 2, 2)  # what the sizing asks for
    scaled.run(120)
    for e in engines(scaled, "prefill"):
        assert e.stats.ttft.quantile(slo.percentile / 100) < slo.ttft_ms / 1000
    for e in engines(scaled, "decode"):
        assert e.gauges()[1] == 0


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
    v1pod.status.conditions[0].status = "False"
    unready = pod_observation(v1pod)
    assert unready is not None and not unready.ready
    v1pod.metadata.labels = {"disagg.dev/role": "router", "disagg.dev/service": "svc"}
    assert pod_observation(v1pod) is None


# ----------------------------------------------------------------------------------------------------
# the HTTP shell: pod sites on loopback addresses, control API (no cluster needed)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_server_serves_ready_loopback_pods_and_follows_their_lifecycle(tmp_path: Path) -> None:
    port, control = free_port(), free_port()
    spec = spec_dict()
    spec["engine"]["port"] = port
    sim = FleetSim(CATALOG, seed=0, default_load=parse_load_spec("1x"))
    targets = tmp_path / "engines.json"
    server = FleetServer(sim, namespaces=["ns"], kubeconfig=None, targets_file=targets, control_port=control)
    await server.start_http()
    try:
        server.apply(Event("services", "SYNC", "ns", (ServiceObservation("ns", "svc", spec),)))
        pods = (
            pod("prefill", 0, ip="127.100.250.1"),
            pod("decode", 0, ip="127.100.250.2"),
            pod("decode", 1, ip="127.100.250.3", ready=False),
            pod("decode", 2, ip="10.0.0.7"),
        )
        server.apply(Event("pods", "SYNC", "ns", pods))
        await server.reconcile()
        assert sorted(p.pod.name for p in sim.pods.values()) == ["svc-decode-0", "svc-prefill-0"]
        assert "not a loopback address" in server.problems["svc-decode-2"]
        groups = json.loads(targets.read_text())
        assert sorted(g["targets"][0] for g in groups) == [f"127.100.250.1:{port}", f"127.100.250.2:{port}"]
        for _ in range(40):
            sim.tick()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.100.250.2:{port}/metrics") as resp:
                assert resp.status == 200
                parsed = families(await resp.text())
                (running,) = parsed["vllm:num_requests_running"].samples
                assert running.labels["pod"] == "svc-decode-0" and running.labels["disagg_role"] == "decode"
            async with http.get(f"http://127.100.250.1:{port}/health") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.100.250.1:{port}/v1/models") as resp:
                models = await resp.json()
                assert models["data"][0]["id"] == spec["model"]["name"]
            before = engines(sim, "prefill")[0].stats.prompt_tokens
            body = {"model": spec["model"]["name"], "prompt": "x" * 400, "max_tokens": 4}
            async with http.post(f"http://127.100.250.1:{port}/v1/completions", json=body) as resp:
                reply = await resp.json()
                assert reply["object"] == "text_completion" and reply["usage"]["prompt_tokens"] == 100
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "kv_transfer_params": {"do_remote_decode": True}}
            async with http.post(f"http://127.100.250.1:{port}/v1/chat/completions", json=chat) as resp:
                reply = await resp.json()
                assert reply["choices"][0]["message"]["role"] == "assistant"
                assert reply["kv_transfer_params"]["remote_host"] == "127.100.250.1"
            async with http.post(f"http://127.100.250.1:{port}/v1/completions",
                                 json={"model": "other", "prompt": "x"}) as resp:
                assert resp.status == 404
            async with http.post(f"http://127.100.250.1:{port}/v1/completions", data=b"{") as resp:
                assert resp.status == 400
            for _ in range(8):
                sim.tick()
            assert engines(sim, "prefill")[0].stats.prompt_tokens > before  # the API's requests were served

            # control API
            base = f"http://127.0.0.1:{control}"
            async with http.put(f"{base}/load/ns/svc", json={"rps": 8, "prompt_tokens": 2048,
                                                              "output_tokens": 64}) as resp:
                assert resp.status == 200
                result = await resp.json()
                assert result["known"] and result["prompt_tokens"] == 2048 and result["applied_at_unix"] > 0
            async with http.get(f"{base}/load") as resp:
                loads = await resp.json()
                assert loads["ns/svc"]["rps_now"] == 8 and loads["ns/svc"]["output_tokens"] == 64
            async with http.put(f"{base}/load/ns/svc", json={"x": 4}) as resp:
                expected = 4 * sim.services[("ns", "svc")].base.rps
                assert (await resp.json())["steps"][0]["rps"] == pytest.approx(expected, abs=1e-3)
            for bad in ({"rps": -1}, {"rps": 1, "x": 2}, {"rps": "fast"}, {"rps": 1, "bogus": 1},
                        {"spec": "steps:9s@1,1s@2"}, {"rps": 1, "prompt_tokens": 0}):
                async with http.put(f"{base}/load/ns/svc", json=bad) as resp:
                    assert resp.status == 400, bad
            async with http.put(f"{base}/load/other/later", json={"rps": 2}) as resp:
                assert (await resp.json())["known"] is False  # kept for when the service appears
            async with http.delete(f"{base}/load/ns/svc") as resp:
                assert (await resp.json())["spec"] == "1x"
            async with http.get(f"{base}/state") as resp:
                state = await resp.json()
                assert {p["pod"] for p in state["pods"]} == {"svc-decode-0", "svc-prefill-0"}
                assert "ns/svc-decode-2" in state["not_served"] and state["cpu_seconds"] > 0

        # a pod stops being Ready, another goes away: their servers stop and their targets go
        server.apply(Event("pods", "MODIFIED", None, (pod("decode", 0, ip="127.100.250.2", ready=False),)))
        server.apply(Event("pods", "DELETED", None, (pod("prefill", 0, ip="127.100.250.1"),)))
        await server.reconcile()
        assert not sim.pods and not server.sites
        assert json.loads(targets.read_text()) == []
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"http://127.100.250.2:{port}/metrics",
                                    timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    assert resp.status == 404  # only reached if a kept-alive connection survived

        # the service goes away with its pods
        server.apply(Event("pods", "MODIFIED", None, (pod("decode", 0, ip="127.100.250.2"),)))
        await server.reconcile()
        assert len(sim.pods) == 1
        server.apply(Event("services", "DELETED", None, (ServiceObservation("ns", "svc", spec),)))
        await server.reconcile()
        assert not sim.pods and not server.sites and not sim.services
    finally:
        await server.shutdown()
    assert json.loads(targets.read_text()) == []


async def test_bind_conflicts_are_reported_and_retried(tmp_path: Path) -> None:
    port = free_port()
    spec = spec_dict()
    spec["engine"]["port"] = port
    sim = FleetSim(CATALOG, seed=0)
    server = FleetServer(sim, namespaces=None, kubeconfig=None, targets_file=None, control_port=free_port())
    await server.start_http()
    blocker = socket.socket()
    blocker.bind(("127.100.250.9", port))
    blocker.listen()
    try:
        server.apply(Event("services", "SYNC", None, (ServiceObservation("ns", "svc", spec),)))
        server.apply(Event("pods", "SYNC", None, (pod("prefill", 0, ip="127.100.250.9"),)))
        await server.reconcile()
        assert "cannot listen" in server.problems["svc-prefill-0"] and not sim.pods
        blocker.close()
        await server.reconcile()
        assert not server.problems and len(sim.pods) == 1
    finally:
        blocker.close()
        await server.shutdown()


def test_cli_parses_and_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from disagg.sim.fleet import fleet_main

    args = build_parser().parse_args(["-n", "a", "-n", "b", "--load", "a/x=4x", "--control-port", "1"])
    assert args.namespace == ["a", "b"] and args.load == ["a/x=4x"]
    assert fleet_main(["--load", "a/x=fast"]) == 2
    assert fleet_main(["--control-host", "0.0.0.0"]) == 2
    assert fleet_main(["--load", "a/x=trace:/nonexistent/trace.csv"]) == 2
    err = capsys.readouterr().err
    assert "bad rate" in err and "loopback" in err and "not found" in err

