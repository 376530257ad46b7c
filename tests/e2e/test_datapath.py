"""e2e: real requests through what the operator configures, for vLLM and SGLang.

One namespace holds three InferenceServices: `vllm-a` (examples/01: one prefill, two decode workers),
`vllm-b` (the same model, one of each) and `sglang-a` (examples/02: SGLang over Mooncake, one of each),
each with two router replicas. This module's operator creates their children; `disagg-lab fleet` plays
the engines and `disagg-lab routers` runs the real vllm-router 0.1.17 and sglang-router 0.3.2 of every
router pod (the pod's command, arguments, environment and ServiceAccount token; kubelet-like probes). The
client is the `openai` package, reaching each service through its ready endpoints (`disagg_lab.load`).

(a)+(b) steady load on all three at once: every request succeeds, goes prefill -> decode inside its own
        service (the pods the decode engine names), with the KV cache handed off, never recomputed (the
        engines' counters agree with the client), and TTFT and ITL are what the engine model predicts
        within the tolerances stated below;
(c)     one of vllm-a's two decode engines goes down under load: both routers stay Ready throughout, the
        errors are bounded and stop (the routers drop the worker after their health checks);
(d)     a router pod of sglang-a is deleted under load: the Service is back to two ready endpoints within
        a measured time (the ReplicaSet's new pod, started and probed), the errors are counted;
(e)     a router process that exits is restarted (the pod's restartCount 1) and Ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client as kclient

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import from_architecture
from disagg.capacity.roofline import DecodeCost, kv_link_bytes_per_s, kv_transfer_seconds, prefill_seconds
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg_lab.load import LoadClient, Result, Schedule
from support.lab_services import LabServices, lab_services
from support.operators import (
    EXAMPLES,
    in_namespace,
    load_docs,
    routers_ready,
    wait_until,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

SERVICES = {"vllm-a": "01-", "vllm-b": "01-", "sglang-a": "02-"}
PROMPT_TOKENS, OUTPUT_TOKENS = 512, 32
RATE = 3.0
STEADY_S = 12.0
TTFT_SLACK_S = 0.35
"""TTFT may exceed the model's (prefill + KV transfer + one decode step) by this much: the two router hops,
the client and the lab's scheduling on a shared 2-core machine."""
ITL_RANGE = (0.7, 1.6)
"""Median ITL within this factor of the model's decode step (one sequence at the prompt's context)."""


def manifest(namespace: str, name: str) -> dict[str, Any]:
    (example,) = [p for p in EXAMPLES if p.name.startswith(SERVICES[name])]
    (service,) = [in_namespace(d, namespace) for d in load_docs(example) if d.get("kind") == "InferenceService"]
    service["metadata"]["name"] = name
    spec = service["spec"]
    spec["router"] = {**(spec.get("router") or {}), "replicas": 2}
    spec["prefill"]["replicas"] = 1
    spec["decode"]["replicas"] = 2 if name == "vllm-a" else 1
    for role in ("prefill", "decode"):
        spec[role].pop("autoscaling", None)
    return service


@pytest.fixture(scope="module")
def datapath(cluster: LocalCluster, kube_api: kclient.ApiClient,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServices]:
    def fleet_ready(served: list[tuple[str, str]]) -> None:
        assert len(set(served)) == 2 * len(SERVICES), f"the fleet serves {sorted(set(served))}"

    with lab_services(cluster, kube_api, tmp_path_factory.mktemp("datapath-e2e"), "datapath-e2e",
                      lambda namespace: [manifest(namespace, name) for name in SERVICES], fleet_ready) as env:
        yield env


def _model(name: str, namespace: str) -> tuple[float, float, float]:
    """(prefill seconds, KV transfer seconds, decode step of one sequence) of the service's engine model."""
    spec = InferenceServiceSpec.model_validate(manifest(namespace, name)["spec"])
    assert spec.model.architecture is not None
    model = from_architecture(spec.model.architecture, spec.model.name)
    prefill = DEFAULT_CATALOG[spec.prefill.accelerator.type or ""]
    decode = DEFAULT_CATALOG[spec.decode.accelerator.type or ""]
    p_tp, d_tp = spec.prefill.parallelism.tensor, spec.decode.parallelism.tensor
    return (prefill_seconds(model, prefill, p_tp, PROMPT_TOKENS),
            kv_transfer_seconds(model, PROMPT_TOKENS, kv_link_bytes_per_s(p_tp, d_tp)),
            DecodeCost.of(model, decode, d_tp).step_seconds(1.0, PROMPT_TOKENS + OUTPUT_TOKENS / 2))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def test_a_steady_load_goes_prefill_to_decode_inside_each_service(datapath: LabServices) -> None:
    env = datapath
    before = {name: env.lab.pods(name) for name in SERVICES}
    schedule = Schedule(steps=((0.0, RATE),), prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)

    async def all_services() -> list[list[Result]]:
        return await asyncio.gather(*(env.load(name, schedule, STEADY_S, seed) for seed, name in
                                      enumerate(SERVICES)))

    results = dict(zip(SERVICES, asyncio.run(all_services()), strict=True))
    for name, got in results.items():
        assert len(got) >= RATE * STEADY_S * 0.5, f"{name}: only {len(got)} requests sent"
        failed = [r.record() for r in got if not r.ok]
        assert not failed, f"{name}: {len(failed)} of {len(got)} failed, first: {failed[:3]}\n{env.diagnostics()}"
        for r in got:
            assert r.prefill_pod.startswith(f"{env.namespace}/{name}-prefill-"), (name, r.record())
            assert r.decode_pod.startswith(f"{env.namespace}/{name}-decode-"), (name, r.record())
            assert r.kv == "transferred", (name, r.record())
        after = {p["pod"]: p for p in env.lab.pods(name)}
        old = {p["pod"]: p for p in before[name]}

        def delta(key: str, role: str, after: dict[str, Any] = after, old: dict[str, Any] = old) -> int:
            return sum(p[key] - old.get(pod, {}).get(key, 0) for pod, p in after.items() if p["role"] == role)

        assert delta("prefills_total", "prefill") == len(got), (name, after)
        assert delta("kv_handed_off_total", "prefill") == len(got), (name, after)
        assert delta("kv_received_total", "decode") == len(got), (name, after)
        assert delta("prompts_recomputed_total", "decode") == 0, (name, after)
        prefill_s, transfer_s, step_s = _model(name, env.namespace)
        ttft = _median([r.ttft_s for r in got if r.ttft_s is not None])
        itl = _median([x for r in got for x in r.itl_s])
        model_ttft = prefill_s + transfer_s + step_s
        print(f"datapath e2e: {name}: {len(got)} requests, TTFT p50 {ttft * 1000:.0f} ms (model "
              f"{model_ttft * 1000:.0f} ms), ITL p50 {itl * 1000:.1f} ms (model step {step_s * 1000:.1f} ms)")
        assert model_ttft * 0.9 <= ttft <= model_ttft + TTFT_SLACK_S, (name, ttft, model_ttft)
        assert ITL_RANGE[0] * step_s <= itl <= ITL_RANGE[1] * step_s, (name, itl, step_s)


class ReadyWatch(threading.Thread):
    """Samples the routers' Ready conditions every second; remembers every NotReady seen."""

    def __init__(self, env: LabServices, service: str) -> None:
        super().__init__(daemon=True)
        self.env, self.service = env, service
        self.not_ready: list[tuple[float, str]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            with contextlib.suppress(Exception):
                for pod in self.env.pods(self.service, "router"):
                    if not any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                        self.not_ready.append((time.time(), pod.metadata.name))


def test_c_one_decode_down_keeps_the_routers_ready_and_errors_stop(datapath: LabServices) -> None:
    env = datapath
    name = "vllm-a"
    (victim, *_) = [p["pod"] for p in env.lab.pods(name) if p["role"] == "decode"]
    schedule = Schedule(steps=((0.0, 4.0),), prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
    watch = ReadyWatch(env, name)
    watch.start()
    fault_at: list[float] = []

    async def scenario() -> list[Result]:
        load = asyncio.create_task(env.load(name, schedule, 40.0, 11))
        await asyncio.sleep(5.0)
        fault_at.append(time.time())
        await asyncio.to_thread(env.lab.put, f"/fault/{env.namespace}/{victim}", {"fault": "down"})
        return await load

    try:
        got = asyncio.run(scenario())
    finally:
        watch.stop_event.set()
        watch.join(timeout=5)
        with contextlib.suppress(Exception):
            env.lab.put(f"/fault/{env.namespace}/{victim}", {"fault": None})
    failed = [r for r in got if not r.ok]
    late = [r.record() for r in failed if r.sent_at > fault_at[0] + 20.0]
    print(f"datapath e2e: one of two decode engines down under 4 requests/s: {len(failed)} of {len(got)} "
          f"failed, the last {max((r.sent_at for r in failed), default=fault_at[0]) - fault_at[0]:.1f} s after "
          f"the fault; routers NotReady samples: {len(watch.not_ready)}")
    assert not watch.not_ready, f"a router left its Service: {watch.not_ready[:5]}\n{env.diagnostics()}"
    assert len(failed) <= 40, f"{len(failed)} of {len(got)} failed\n{env.diagnostics()}"
    assert not late, f"errors went on 20 s after the fault: {late[:3]}"


def test_d_a_deleted_router_pod_is_replaced_and_its_endpoint_returns(datapath: LabServices) -> None:
    env = datapath
    name = "sglang-a"
    schedule = Schedule(steps=((0.0, 3.0),), prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
    endpoints = env.endpoints(name).start()
    deleted_at: list[float] = []

    async def scenario() -> list[Result]:
        client = LoadClient(endpoints, timeout_s=60.0)
        try:
            load = asyncio.create_task(client.run(schedule.plan(40.0, 1000, 21)))
            await asyncio.sleep(5.0)
            (victim, *_) = env.pods(name, "router")
            deleted_at.append(time.time())
            await asyncio.to_thread(env.session.cluster.core.delete_namespaced_pod, victim.metadata.name,
                                    env.namespace)
            return await load
        finally:
            await client.close()

    try:
        got = asyncio.run(scenario())
    finally:
        endpoints.stop()
    history = [(t - deleted_at[0], n) for t, n in endpoints.history if t >= deleted_at[0]]
    back = next((t for t, n in history if n >= 2 and t > 0), None)
    failed = [r for r in got if not r.ok]
    print(f"datapath e2e: a router pod of {name} deleted under 3 requests/s: ready endpoints after the delete "
          f"{[(round(t, 1), n) for t, n in history]}, two again after {back if back is None else round(back, 1)} s; "
          f"{len(failed)} of {len(got)} requests failed")
    assert back is not None and back <= 30.0, f"endpoints after the delete: {history}\n{env.diagnostics()}"
    assert len(failed) <= 5, [r.record() for r in failed][:5]


def test_e_an_exited_router_is_restarted(datapath: LabServices) -> None:
    env = datapath
    (pod, *_) = env.pods("vllm-b", "router")
    name = pod.metadata.name
    log = (env.lab.workdir / "routers.log").read_text()
    pids = re.findall(rf"{env.namespace}/{name}: started \S+ \(pid (\d+)\)", log)
    assert pids, f"no start of {name} in the supervisor's log\n{env.lab.log_tail()}"
    killed_at = time.time()
    os.kill(int(pids[-1]), signal.SIGKILL)  # the router process the lab started for this test's pod

    def restarted() -> bool:
        (now,) = [p for p in env.pods("vllm-b", "router") if p.metadata.name == name]
        status = now.status.container_statuses[0]
        assert status.restart_count == 1, f"restartCount {status.restart_count}"
        assert routers_ready([now]), "not Ready again yet"
        return True

    wait_until(restarted, 60, f"{name} restarted and Ready", env.diagnostics, interval=0.5)
    print(f"datapath e2e: a router process killed: restarted and Ready again after {time.time() - killed_at:.1f} s")
    results = asyncio.run(env.load("vllm-b", Schedule(steps=((0.0, 2.0),), prompt_tokens=PROMPT_TOKENS,
                                                          output_tokens=OUTPUT_TOKENS), 4.0, 31))
    assert results and all(r.ok for r in results), [r.record() for r in results if not r.ok]
