"""e2e: failures and disruptions under steady streaming load, for both engines (issue 21, items 4 and 5).

One namespace holds `fail-vllm` (examples/01: vLLM over NIXL) and `fail-sglang` (examples/02: SGLang over
Mooncake), each with three prefill workers, two decode workers and one router pod; this module's operator,
`disagg-lab fleet` (the engines and their kubelet: lab/disagg_lab/kubelet.py), `disagg-lab routers` (the real
vllm-router and sglang-router) and the `openai` client streaming RATE requests/s into each service
(tests/support/service_events.py counts what it saw). In order:

(a) SIGKILL of one decode engine of each service: only requests in flight on the killed pod fail, none after.
    The kubelet restarts the engine in place (same address, new identity); the operator replaces that pod
    while it loads, so its peers never meet the new engine at the old address: with SGLang the prefill that
    sent to the old decode would crash on the new one (smg#2503) and lose everything it holds. No engine
    restart is left in either service afterwards (no peer crashed), and no router lists the killed pod's
    address any more: sglang-router never drops a pod deleted while NotReady, and would send requests to
    whatever pod gets that address next; the operator removes such workers through the router's API.
(b) SIGKILL of one prefill engine of each (the NIXL peer restart): the same; with vLLM every decode that
    pulled from the old prefill would crash on its first pull from the restarted one (vllm#49238).
(c) `kubectl drain` of the nodes of the decode workers in one command (limited to this service's pods: the
    nodes are shared; one node of the kind is left for the replacements), through the eviction API: the
    pool's PodDisruptionBudget (maxUnavailable 1) lets one worker go at a time (at most one unavailable,
    sampled every 0.5 s; in the lab a replacement is Ready at once, so the budget does not have to refuse
    an eviction here); no request fails.
(d) prefill scaled down by two (3 -> 1): no request fails (decode by two: test_operations.py).
(e) every decode engine of each service answers 503 (the lab's fault `unhealthy`, same engines): the service's
    RouterWorkers condition turns False with reason NoHealthyDecode naming the router, and Ready False; when
    the engines answer again both turn True and requests are served.
Each prints its row: requests, failed (in flight on a killed pod / after), mixed-version hand-offs, seconds
until the service was whole again. bench/operations.py runs the same events into bench/results/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client as kclient

from disagg_lab.load import Schedule
from support.lab_services import LabServices
from support.operators import condition, is_ready, wait_until
from support.service_events import (
    Event,
    Outcome,
    drain_nodes,
    example_services,
    kill_one,
    run_event,
    scale_down,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

ENGINES = {"fail-vllm": "vllm", "fail-sglang": "sglang"}
PREFILL, DECODE = 3, 2
RATE = 4.0
LOAD_S = 30.0
EVENT_AT_S = 6.0


@pytest.fixture(scope="module")
def failures(cluster: LocalCluster, kube_api: kclient.ApiClient,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServices]:
    with example_services(cluster, kube_api, tmp_path_factory.mktemp("failures-e2e"), "failures-e2e", ENGINES,
                          PREFILL, DECODE) as env:
        yield env


def run(env: LabServices, name: str, event: Event) -> list[Outcome]:
    outcomes = asyncio.run(run_event(env, name, event, ENGINES, rate=RATE, load_s=LOAD_S, event_at_s=EVENT_AT_S))
    for outcome in outcomes:
        print(f"failures e2e: {outcome.row()}")
    return outcomes


def check(env: LabServices, outcomes: list[Outcome], planned: bool) -> None:
    for outcome in outcomes:
        what = f"{outcome.event} on {outcome.service}: {outcome.row()}"
        assert outcome.requests >= RATE * LOAD_S * 0.5, what
        assert outcome.failed_after == 0, f"{what}; first: {outcome.first_failures}\n{env.diagnostics()}"
        if planned:
            assert outcome.failed == 0, what
        assert outcome.mixed == 0, what
        assert outcome.duration_s < 85, f"{what}: the service was not whole again\n{env.diagnostics()}"


def check_kill(env: LabServices, outcomes: list[Outcome]) -> None:
    check(env, outcomes, planned=False)
    for outcome in outcomes:
        assert outcome.notes["victim_replaced"], f"{outcome.service}: the restarted pod was not replaced"
        assert outcome.notes["restarts_left"] == 0, f"{outcome.service}: a peer crashed: {outcome.row()}"
        assert outcome.notes["stale_router_workers"] == 0, f"{outcome.service}: a router kept a gone worker"


def test_a_sigkill_of_a_decode_engine_loses_only_its_requests(failures: LabServices) -> None:
    check_kill(failures, run(failures, "SIGKILL of one decode pod", kill_one("decode")))


def test_b_a_prefill_restart_does_not_break_its_peers(failures: LabServices) -> None:
    check_kill(failures, run(failures, "SIGKILL of one prefill pod (NIXL peer restart)", kill_one("prefill")))


def test_c_kubectl_drain_of_the_decode_nodes_honours_the_pdb_and_loses_no_request(failures: LabServices) -> None:
    outcomes = run(failures, "kubectl drain of the decode workers' nodes", drain_nodes("decode"))
    check(failures, outcomes, planned=True)
    for outcome in outcomes:
        assert outcome.notes["drain_exit"] == 0, outcome.row()
        assert outcome.notes["workers_on_nodes"] >= 1, outcome.row()
        assert outcome.notes["max_unavailable"] <= 1, f"the PDB lets one decode worker go at a time: {outcome.row()}"


def test_d_prefill_scale_down_by_two_loses_no_request(failures: LabServices) -> None:
    check(failures, run(failures, "prefill scale-down by two", scale_down("prefill", 2)), planned=True)


def test_e_a_router_with_no_healthy_decode_says_so_in_the_status(failures: LabServices) -> None:
    env = failures
    faulty = {name: [p.metadata.name for p in env.pods(name, "decode")] for name in ENGINES}

    def fault(value: str | None) -> None:
        for pods in faulty.values():
            for pod in pods:
                env.lab.put(f"/fault/{env.namespace}/{pod}", {"fault": value})

    def conditions(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        body = env.session.cluster.service(env.namespace, name)
        return condition(body, "RouterWorkers") or {}, condition(body, "Ready") or {}

    def all_down() -> dict[str, dict[str, Any]] | None:
        seen = {name: conditions(name) for name in ENGINES}
        for name, (workers, ready) in seen.items():
            assert workers.get("reason") == "NoHealthyDecode", f"{name}: RouterWorkers {workers}"
            assert ready.get("status") == "False", f"{name}: Ready {ready}"
        return {name: workers for name, (workers, _) in seen.items()}

    def all_back() -> bool:
        for name in ENGINES:
            workers, ready = conditions(name)
            assert workers.get("status") == "True", f"{name}: RouterWorkers {workers}"
            assert is_ready(env.session.cluster.service(env.namespace, name)), f"{name}: Ready {ready}"
        return True

    fault("unhealthy")
    try:
        down = wait_until(all_down, 60, "RouterWorkers NoHealthyDecode and Ready False", env.diagnostics, 0.5)
    finally:
        fault(None)
    for name, workers in down.items():
        print(f"failures e2e: {name}: every decode answers 503: RouterWorkers {workers.get('message')}")
        assert f"{name}-router" in workers.get("message", ""), workers
        if "(0 decode pods Ready)" not in workers.get("message", ""):  # Ready pods kept out: a Warning says so
            events = env.session.cluster.core.list_namespaced_event(
                env.namespace, field_selector=f"involvedObject.name={name},reason=NoHealthyDecode").items
            assert [e for e in events if e.type == "Warning"], f"{name}: no Warning Event NoHealthyDecode"
    wait_until(all_back, 90, "RouterWorkers True and Ready again after the decode engines answer", env.diagnostics, 0.5)
    for name in ENGINES:
        results = asyncio.run(env.load(name, Schedule(steps=((0.0, 2.0),), prompt_tokens=64, output_tokens=16),
                                       5.0, 7))
        failed = [r.record() for r in results if not r.ok]
        assert results and not failed, f"{name}: {len(failed)} failed: {failed[:3]}\n{env.diagnostics()}"
