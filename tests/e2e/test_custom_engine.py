"""e2e: an `engine.kind: custom` service served end to end and autoscaled from its own metric names.

One namespace holds `megakernel`: example 01's model and pools with a custom engine (its own image, command
and argument templates, the vLLM P/D protocol, and its metric names `mk_*` mapped onto the autoscaler's
signals). This module's operator fills the templates per pool; `disagg-lab fleet` plays the engine (vLLM's
protocol and timing, the `mk_*` families on /metrics); the real vllm-router routes; the real Prometheus
scrapes the engines; the operator's autoscaler and its KV-path check read the mapped names from it.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client as kclient

from disagg_lab.load import Schedule
from support.lab_services import LabServices, lab_services
from support.operators import EXAMPLES, condition, in_namespace, load_docs, wait_until

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

NAME = "megakernel"
PORT = 8100
METRICS = {
    "waitingRequests": "mk_queue_depth", "runningRequests": "mk_active_requests",
    "kvCacheUsage": "mk_kv_pages_used_ratio", "promptTokensTotal": "mk_prompt_tokens_total",
    "generationTokensTotal": "mk_output_tokens_total", "ttftHistogram": "mk_first_token_seconds",
    "itlHistogram": "mk_token_gap_seconds", "e2eHistogram": "mk_request_seconds",
    "kvHandedOffTotal": "mk_kv_received_total", "kvRecomputedTotal": "mk_kv_recomputed_total",
    "kvTransferFailuresTotal": "mk_kv_failed_total",
}
PROMETHEUS_FLAGS = ("--prometheus-url", "http://127.0.0.1:9090", "--autoscale-tick", "2",
                    "--prometheus-rate-window", "10s", "--scrape-interval", "2", "--prometheus-timeout", "2")
RATE, LOAD_S = 3.0, 10.0
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 32
METRICS_WAIT_S = 60.0
"""The autoscaler reports the pools' metrics within this: scrapes every 2 s, a 10-s rate window, a 2-s tick."""


def manifest(namespace: str) -> dict[str, Any]:
    (example,) = [p for p in EXAMPLES if p.name.startswith("01-")]
    (service,) = [in_namespace(d, namespace) for d in load_docs(example) if d.get("kind") == "InferenceService"]
    service["metadata"]["name"] = NAME
    spec = service["spec"]
    spec["engine"] = {
        "kind": "custom", "image": "registry.example.com/acme/megakernel-server:2.1", "port": PORT,
        "custom": {
            "protocol": "vllm", "command": ["/opt/mk/serve"],
            "args": ["--listen", "0.0.0.0:{{port}}", "--phase", "{{role}}", "--kv-port", "{{kvPort}}",
                     "--weights", "{{model}}", "--name", "{{servedModelName}}", "--tp", "{{tensorParallel}}"],
            "metrics": METRICS,
        },
    }
    spec["router"] = {"replicas": 1}
    for role in ("prefill", "decode"):
        spec[role]["replicas"] = 1
        spec[role]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 2}
    return service


@pytest.fixture(scope="module")
def custom(cluster: LocalCluster, kube_api: kclient.ApiClient,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServices]:
    def fleet_ready(served: list[tuple[str, str]]) -> None:
        assert sorted(served) == [(NAME, "decode"), (NAME, "prefill")], f"the fleet serves {sorted(served)}"

    with lab_services(cluster, kube_api, tmp_path_factory.mktemp("custom-e2e"), "custom-e2e",
                      lambda namespace: [manifest(namespace)], fleet_ready,
                      operator_args=PROMETHEUS_FLAGS, scrape=True) as env:
        yield env


def test_a_custom_engine_runs_its_filled_templates_and_serves_prefill_to_decode(custom: LabServices) -> None:
    env = custom
    for role in ("prefill", "decode"):
        (pod,) = env.pods(NAME, role)
        engine = pod.spec.containers[0]
        assert engine.image == "registry.example.com/acme/megakernel-server:2.1"
        assert engine.command == ["/opt/mk/serve"]
        args = engine.args
        assert args[:4] == ["--listen", f"0.0.0.0:{PORT}", "--phase", role], args
        assert args[args.index("--name") + 1] == "meta-llama/Llama-3.1-70B-Instruct", args
        assert args[args.index("--tp") + 1] == "2", args
        assert args[args.index("--kv-port") + 1].isdigit(), args
        assert not any("{{" in a for a in args), args
    schedule = Schedule(steps=((0.0, RATE),), prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
    results = asyncio.run(env.load(NAME, schedule, LOAD_S, seed=7))
    assert len(results) >= RATE * LOAD_S * 0.5, f"only {len(results)} requests sent"
    failed = [r.record() for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} failed, first: {failed[:3]}\n{env.diagnostics()}"
    for r in results:
        assert r.prefill_pod.startswith(f"{env.namespace}/{NAME}-prefill-"), r.record()
        assert r.decode_pod.startswith(f"{env.namespace}/{NAME}-decode-"), r.record()
        assert r.kv == "transferred", r.record()


def test_b_the_autoscaler_and_the_kv_path_check_read_the_engines_own_metric_names(custom: LabServices) -> None:
    env = custom
    schedule = Schedule(steps=((0.0, RATE),), prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)

    def metrics_available() -> dict[str, Any] | None:
        body = env.session.cluster.service(env.namespace, NAME)
        cond, kv = condition(body, "ScalingActive"), condition(body, "KVTransferReady")
        if cond and cond["status"] == "True" and cond["reason"] == "MetricsAvailable" and kv and \
                kv["reason"] == "Transferring":
            return cond
        return None

    async def load_until_seen() -> dict[str, Any] | None:
        loads = asyncio.create_task(env.load(NAME, schedule, METRICS_WAIT_S, seed=8))
        try:
            for _ in range(int(METRICS_WAIT_S)):
                seen = await asyncio.to_thread(metrics_available)
                if seen:
                    return seen
                await asyncio.sleep(1.0)
            return None
        finally:
            loads.cancel()
            await asyncio.gather(loads, return_exceptions=True)

    seen = asyncio.run(load_until_seen())
    body = env.session.cluster.service(env.namespace, NAME)
    assert seen is not None, (f"ScalingActive {condition(body, 'ScalingActive')}, KVTransferReady "
                              f"{condition(body, 'KVTransferReady')}\n{env.diagnostics()}")
    assert "prefill" in seen["message"] and "decode" in seen["message"], seen
    # the engines exported only the spec's names: the autoscaler could not have read vLLM's
    (decode,) = [p for p in env.lab.pods(NAME) if p["role"] == "decode"]
    with urllib.request.urlopen(f"http://{decode['address']}/metrics", timeout=5) as response:
        page = response.read().decode()
    assert "mk_active_requests{" in page and "vllm:num_requests_running" not in page, page[:2000]
    assert "mk_kv_received_total{" in page and "vllm:prompt_tokens_by_source" not in page, page[:2000]
    wait_until(metrics_available, 10, "ScalingActive stays MetricsAvailable", env.diagnostics)
