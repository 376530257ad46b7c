"""e2e: planned events under steady streaming load lose no request, for both engines.

One namespace holds `vllm` (examples/01: vLLM over NIXL) and `sglang` (examples/02: SGLang over Mooncake),
each with one prefill worker, three decode workers and one router pod. This module's operator creates their
children; `disagg-lab fleet` plays the engines and their pods' kubelet (finalizer, the preStop hook run for
real, SIGTERM, SIGKILL at the grace period's end: lab/disagg_lab/kubelet.py), `disagg-lab routers` runs the
real vllm-router and sglang-router of the router pods, and the `openai` client streams through the
Service's ready endpoints.

(a) both decode pools scaled down by two (spec.decode.replicas 3 -> 1) while the client streams into both:
    no request fails, the leaving workers finish the requests they hold (some end after the edit: the
    drain carried them), no request is sent to a leaving worker once the routers dropped it, every request
    goes prefill -> decode with the KV handed off, and no engine refused a mixed hand-off. Without the
    drain (preStop hook, vLLM's --shutdown-timeout) the lab's kubelet kills what is in flight at SIGTERM
    and requests fail.
(b) the decode image of `vllm` changed in place under load (the operator runs `--rollouts in-place` until (c),
    what it did for every change before version-safe rollouts): the operator's KV-path check, from the decode
    workers' counters in the real Prometheus, goes from `Transferring` to `KVTransferDegraded` with a Warning
    Event while the new decode workers refuse the old prefill's KV and recompute every prompt (the engines count
    the mixed hand-offs: what a version-safe rollout prevents). No request fails: vLLM recomputes and the old
    decode worker drains.
(c) with the operator restarted as it runs by default (`--rollouts versioned`), three planned events in turn, each to
    both services at once under steady streaming load: a model-revision rollout (`spec.model.revision`), an engine
    image change (`spec.engine.image`) and a resources-only change (decode's CPU request). The two revision changes
    come up beside the serving pools and the routers switch once both new pools are ready; the resources change
    rolls in place. No request fails, none is served by a mixed-revision pair (the client's answers and the
    engines' refusal counters), and each event ends with one revision's pools and routers left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client as kclient

from disagg_lab.load import Result, Schedule
from support.lab_services import LabServices, lab_services
from support.operators import (
    EXAMPLES,
    GROUP,
    PLURAL,
    VERSION,
    condition,
    in_namespace,
    is_ready,
    load_docs,
    wait_until,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

SERVICES = {"vllm": "01-", "sglang": "02-"}
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 128
RATE = 4.0
LOAD_S = 24.0
EDIT_AT_S = 6.0
DECODE_BEFORE, DECODE_AFTER = 3, 1
KV_WAIT_S = 20.0
"""The KV-path verdict follows traffic within this: two scrapes (2 s), the 10-s rate window, a 2-s tick."""
ROLL_WAIT_S = 60.0
"""...and the new decode worker takes traffic within this after the edit: vllm-router handles pod events one at a
time and waits for a new worker's health check (30 s apart) before it takes the next one (here the old
worker's deletion); the lab's pods are Ready before their engine answers."""
PROMETHEUS_FLAGS = ("--prometheus-url", "http://127.0.0.1:9090", "--autoscale-tick", "2",
                    "--prometheus-rate-window", "10s", "--scrape-interval", "2", "--prometheus-timeout", "2")
ROUTERS_DROP_S = 5.0
"""After the edit, the routers have dropped the leaving workers within this (their pod watch sees the
deletion within a second; the preStop hook's first wait is 3 s)."""


def manifest(namespace: str, name: str) -> dict[str, Any]:
    (example,) = [p for p in EXAMPLES if p.name.startswith(SERVICES[name])]
    (service,) = [in_namespace(d, namespace) for d in load_docs(example) if d.get("kind") == "InferenceService"]
    service["metadata"]["name"] = name
    spec = service["spec"]
    spec["router"] = {**(spec.get("router") or {}), "replicas": 1}
    spec["prefill"]["replicas"] = 1
    spec["decode"]["replicas"] = DECODE_BEFORE
    for role in ("prefill", "decode"):
        spec[role].pop("autoscaling", None)
    return service


@pytest.fixture(scope="module")
def operations(cluster: LocalCluster, kube_api: kclient.ApiClient,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServices]:
    def fleet_ready(served: list[tuple[str, str]]) -> None:
        for name in SERVICES:
            assert served.count((name, "decode")) == DECODE_BEFORE, f"the fleet serves {sorted(served)}"

    with lab_services(cluster, kube_api, tmp_path_factory.mktemp("operations-e2e"), "operations-e2e",
                      lambda namespace: [manifest(namespace, name) for name in SERVICES], fleet_ready,
                      operator_args=(*PROMETHEUS_FLAGS, "--rollouts", "in-place"), scrape=True) as env:
        yield env


def _set_decode_replicas(env: LabServices, service: str, replicas: int) -> None:
    env.session.cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, env.namespace, PLURAL, service, {"spec": {"decode": {"replicas": replicas}}},
        _content_type="application/merge-patch+json")


def test_a_decode_scale_down_by_two_under_load_loses_no_request(operations: LabServices) -> None:
    env = operations
    before = {name: {p.metadata.name for p in env.pods(name, "decode")} for name in SERVICES}
    counters_before = {p["pod"]: p for p in env.lab.get("/state")["pods"]}
    schedule = Schedule(steps=((0.0, RATE),), prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
    edited_at: list[float] = []
    gone_at: dict[str, float] = {}

    async def watch_pods() -> None:
        while len(gone_at) < len(SERVICES):
            for name in SERVICES:
                if name not in gone_at and len(await asyncio.to_thread(env.pods_left, name, "decode")) == DECODE_AFTER:
                    gone_at[name] = time.time()
            await asyncio.sleep(0.5)

    async def scenario() -> list[list[Result]]:
        loads = [asyncio.create_task(env.load(name, schedule, LOAD_S, seed)) for seed, name in enumerate(SERVICES)]
        await asyncio.sleep(EDIT_AT_S)
        edited_at.append(time.time())
        for name in SERVICES:
            await asyncio.to_thread(_set_decode_replicas, env, name, DECODE_AFTER)
        watch = asyncio.create_task(watch_pods())
        done = list(await asyncio.gather(*loads))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch, timeout=60.0)
        return done

    results = dict(zip(SERVICES, asyncio.run(scenario()), strict=True))
    edit = edited_at[0]

    def scaled_down() -> bool:
        for name in SERVICES:
            left = env.pods_left(name, "decode")
            assert len(left) == DECODE_AFTER, f"{name}: decode pods {[p.metadata.name for p in left]}"
        return True

    wait_until(scaled_down, 30, "both decode pools down to one pod", env.diagnostics, interval=0.5)
    counters = {p["pod"]: p for p in env.lab.get("/state")["pods"]}
    for name, got in results.items():
        remaining = {p.metadata.name for p in env.pods(name, "decode")}
        removed = {f"{env.namespace}/{pod}" for pod in before[name] - remaining}
        failed = [r.record() for r in got if not r.ok]
        carried = [r for r in got if r.decode_pod in removed and r.sent_at + (r.duration_s or 0.0) > edit]
        late = [r.record() for r in got if r.decode_pod in removed and r.sent_at > edit + ROUTERS_DROP_S]
        refused = sum(p.get("kv_refused_total", 0) - counters_before.get(pod, {}).get("kv_refused_total", 0)
                      for pod, p in counters.items() if p["service"] == name)
        print(f"operations e2e: {name}: decode {DECODE_BEFORE} -> {DECODE_AFTER} under {RATE:g} requests/s: "
              f"{len(failed)} of {len(got)} failed; {len(carried)} requests on the leaving workers ended after the "
              f"edit; the pods gone {gone_at.get(name, time.time()) - edit:.1f} s after it; mixed hand-offs refused "
              f"{refused}")
        assert len(got) >= RATE * LOAD_S * 0.5, f"{name}: only {len(got)} requests sent"
        assert not failed, f"{name}: {len(failed)} of {len(got)} failed, first: {failed[:3]}\n{env.diagnostics()}"
        assert len(removed) == DECODE_BEFORE - DECODE_AFTER, (name, removed)
        assert carried, f"{name}: no request was in flight on a leaving worker: the drain was not exercised"
        assert not late, f"{name}: requests sent to a leaving worker {ROUTERS_DROP_S:g} s after the edit: {late[:3]}"
        assert all(r.kv == "transferred" for r in got), [r.record() for r in got if r.kv != "transferred"][:3]
        assert refused == 0, (name, refused)


def _kv_condition(env: LabServices, service: str) -> dict[str, Any]:
    return condition(env.session.cluster.service(env.namespace, service), "KVTransferReady") or {}


def test_b_a_mixed_version_decode_is_seen_as_kv_transfer_degraded(operations: LabServices) -> None:
    env = operations
    name = "vllm"
    schedule = Schedule(steps=((0.0, 3.0),), prompt_tokens=PROMPT_TOKENS, output_tokens=32)
    seen: list[tuple[float, str]] = []

    async def wait_kv(reason: str, within: float) -> bool:
        end = time.time() + within
        while time.time() < end:
            cond = await asyncio.to_thread(_kv_condition, env, name)
            if not seen or seen[-1][1] != cond.get("reason"):
                seen.append((time.time(), str(cond.get("reason"))))
            if cond.get("reason") == reason:
                return True
            await asyncio.sleep(1.0)
        return False

    async def scenario() -> tuple[list[Result], bool, float, bool]:
        load = asyncio.create_task(env.load(name, schedule, KV_WAIT_S + ROLL_WAIT_S, 41))
        transferring = await wait_kv("Transferring", KV_WAIT_S)
        edited = time.time()
        await asyncio.to_thread(
            env.session.cluster.custom.patch_namespaced_custom_object, GROUP, VERSION, env.namespace, PLURAL, name,
            {"spec": {"decode": {"image": "vllm/vllm-openai:v0.33.0"}}}, _content_type="application/merge-patch+json")
        degraded = await wait_kv("KVTransferDegraded", ROLL_WAIT_S)
        return await load, transferring, edited, degraded

    got, transferring, edited, degraded = asyncio.run(scenario())
    failed = [r.record() for r in got if not r.ok]
    mixed = [r for r in got if r.kv == "refused"]
    events = env.session.cluster.core.list_namespaced_event(
        env.namespace, field_selector=f"involvedObject.name={name},reason=KVTransferDegraded").items
    print(f"operations e2e: {name}: decode image changed in place under 3 requests/s: {len(mixed)} of {len(got)} "
          f"requests served by a mixed-revision pair (KV refused, prompt recomputed), {len(failed)} failed; "
          f"KVTransferReady {[(round(t - edited, 1), r) for t, r in seen]} (s after the edit)")
    assert transferring, f"KVTransferReady never Transferring under load: {seen}\n{env.diagnostics()}"
    assert mixed, "no mixed hand-off: the in-place rollout did not pair an old prefill with a new decode"
    assert degraded, f"KVTransferReady never KVTransferDegraded while decode recomputed: {seen}\n{env.diagnostics()}"
    assert events and all(e.type == "Warning" for e in events), [(e.type, e.message) for e in events]
    assert not failed, f"{len(failed)} of {len(got)} failed: {failed[:3]}"


ROLLOUT_RATE = 3.0
ROLLOUT_OUTPUT_TOKENS = 32
EVENT_MAX_S = 150.0
"""An event's load stops at the latest this long after it starts (and `EVENT_TAIL_S` after it settled)."""
EVENT_TAIL_S = 4.0
EVENT_EDIT_AT_S = 4.0
ENDPOINT_READY_FOR_S = 2.0
"""The client takes a router pod as an endpoint once it has been Ready this long (the routers are replaced in a
rollout): endpoints reach clients a moment after a pod turns Ready, and kwok reports a new pod Ready before the
lab's probe turns it NotReady until the router answers (1 of 115 requests failed on that in one run)."""
IMAGES = {"vllm": "vllm/vllm-openai:v0.33.0", "sglang": "lmsysorg/sglang:v0.6.0"}
EVENTS: dict[str, Any] = {
    "model-revision rollout": lambda name: {"model": {"revision": "2026-12-01"}},
    "engine-image change": lambda name: {"engine": {"image": IMAGES[name]}},
    "resources-only change": lambda name: {"decode": {"resources": {"requests": {"cpu": "12", "memory": "128Gi"}}}},
}
NEW_REVISION = {"model-revision rollout": True, "engine-image change": True, "resources-only change": False}


def _settled(env: LabServices, name: str, generation: int, revision_changes: bool | None, before: str,
             decode_cpu: str | None) -> bool:
    """One revision left: the service's status at `generation` with no rollout (a revision other than `before`
    if `revision_changes`, the same if False), and every pod of both pools and the router (terminating ones
    included) of the serving revision (with `decode_cpu`, on the new resources)."""
    body = _service(env, name)
    status = body.get("status") or {}
    if status.get("observedGeneration") != generation or status.get("rollout") or not status.get("revision"):
        return False
    revision = status["revision"]
    if revision_changes is not None and (revision != before) != revision_changes:
        return False
    for role in ("prefill", "decode", "router"):
        pods = env.pods_left(name, role)
        if not pods or any((p.metadata.labels or {}).get("disagg.dev/revision") != revision for p in pods):
            return False
        if role == "router" and len(pods) != 1:
            return False
        if role == "decode" and decode_cpu is not None and any(
                p.spec.containers[0].resources.requests.get("cpu") != decode_cpu for p in pods):
            return False
    return is_ready(body)


def _restart_operator(env: LabServices, *flags: str) -> None:
    env.operator.stop()
    env.operator.extra_args = (*PROMETHEUS_FLAGS, *flags)
    env.operator.start().wait_healthy(timeout=30)


def _service(env: LabServices, name: str) -> dict[str, Any]:
    body = env.session.cluster.service(env.namespace, name)
    assert body is not None, name
    return body


def _event_under_load(env: LabServices, event: str) -> list[dict[str, Any]]:
    """One planned event to both services at once under steady streaming load: its row per engine."""
    counters_before = {p["pod"]: p for p in env.lab.get("/state")["pods"]}
    revisions = {name: _service(env, name)["status"]["revision"] for name in SERVICES}
    settled_at: dict[str, float] = {}
    phases: dict[str, list[str]] = {name: [] for name in SERVICES}
    cpu = None if NEW_REVISION[event] else "12"

    async def scenario() -> tuple[float, dict[str, list[Result]]]:
        stops = {name: asyncio.Event() for name in SERVICES}
        loads = {name: asyncio.create_task(env.load_until(name, ROLLOUT_RATE, PROMPT_TOKENS, ROLLOUT_OUTPUT_TOKENS,
                                                          stops[name], EVENT_MAX_S, ENDPOINT_READY_FOR_S))
                 for name in SERVICES}
        await asyncio.sleep(EVENT_EDIT_AT_S)
        edited = time.time()
        generations = {}
        for name in SERVICES:
            patched = await asyncio.to_thread(
                env.session.cluster.custom.patch_namespaced_custom_object, GROUP, VERSION, env.namespace, PLURAL,
                name, {"spec": EVENTS[event](name)}, _content_type="application/merge-patch+json")
            generations[name] = patched["metadata"]["generation"]
        end = edited + EVENT_MAX_S - EVENT_EDIT_AT_S
        while not all(stop.is_set() for stop in stops.values()) and time.time() < end:
            for name in SERVICES:
                if name in settled_at:
                    if time.time() > settled_at[name] + EVENT_TAIL_S:
                        stops[name].set()
                    continue
                body = await asyncio.to_thread(_service, env, name)
                phase = ((body.get("status") or {}).get("rollout") or {}).get("phase")
                if phase and (not phases[name] or phases[name][-1].split("@")[0] != phase):
                    phases[name].append(f"{phase}@{time.time() - edited:.1f}")
                if await asyncio.to_thread(_settled, env, name, generations[name], NEW_REVISION[event],
                                           revisions[name], cpu):
                    settled_at[name] = time.time()
            await asyncio.sleep(0.5)
        for stop in stops.values():
            stop.set()
        return edited, {name: await load for name, load in loads.items()}

    edited, results = asyncio.run(scenario())
    counters = {p["pod"]: p for p in env.lab.get("/state")["pods"]}
    rows = []
    for name, got in results.items():
        failed = [r.record() for r in got if not r.ok]
        refused = sum(p.get("kv_refused_total", 0) - counters_before.get(pod, {}).get("kv_refused_total", 0)
                      for pod, p in counters.items() if p["service"] == name)
        rows.append({"event": event, "engine": name, "requests": len(got), "failed": len(failed),
                     "mixed": sum(r.kv == "refused" for r in got), "refused_by_engines": refused,
                     "duration_s": round(settled_at[name] - edited, 1) if name in settled_at else None,
                     "phases": phases[name]})
        print(f"operations e2e: {json.dumps(rows[-1])}")
        for record in failed[:5]:
            print(f"  failed {record['sent_at'] - edited:+.1f} s after the edit, {record['duration_s']:.2f} s: "
                  f"{record['error']} via {record['endpoint']} ({record['prefill_pod']} -> {record['decode_pod']})")
    return rows


def test_c_rollouts_under_load_never_mix_revisions(operations: LabServices) -> None:
    env = operations
    _restart_operator(env, "--rollouts", "versioned")
    # (b) left vLLM's decode on another image than its prefill: both on the engine's image again
    env.session.cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, env.namespace, PLURAL, "vllm", {"spec": {"decode": {"image": None}}},
        _content_type="application/merge-patch+json")

    def pinned() -> bool:  # the routers now select one revision: settle before the events
        for name in SERVICES:
            body = _service(env, name)
            status = body.get("status") or {}
            assert _settled(env, name, body["metadata"]["generation"], None, "", None), f"{name}: {status}"
        return True

    wait_until(pinned, 180, "both services on one revision with pinned routers", env.diagnostics, interval=1.0)
    table: list[dict[str, Any]] = []
    for event in EVENTS:
        rows = _event_under_load(env, event)
        table += rows
        for row in rows:
            assert row["duration_s"] is not None, f"{event}: {row['engine']} never settled\n{env.diagnostics()}"
            assert row["requests"] >= ROLLOUT_RATE * row["duration_s"] * 0.5, row
            assert row["failed"] == 0, row
            assert row["mixed"] == 0 and row["refused_by_engines"] == 0, row
            if NEW_REVISION[event]:
                # the new revision came up beside the serving one (a 1-s sample may miss Starting; the routers
                # switch only once both new pools are ready)
                assert any(p.startswith(("Starting@", "Switching@")) for p in row["phases"]), row
    if out := os.environ.get("DISAGG_OPERATIONS_JSON"):
        with open(out, "w") as handle:
            json.dump(table, handle, indent=1)
    for name in SERVICES:
        reasons = {e.reason for e in env.session.cluster.core.list_namespaced_event(
            env.namespace, field_selector=f"involvedObject.name={name}").items}
        assert {"RolloutStarting", "RolloutSwitching", "RevisionServing"} <= reasons, (name, sorted(reasons))
