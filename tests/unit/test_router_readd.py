"""A router that keeps a healthy worker out of its rotation gets it back: the decision (disagg.reconcile.router_workers)
and the calls to each router's API (disagg.runtime.pods.RouterWorkers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from disagg.reconcile.router_workers import (
    MAX_READDS,
    READD_BACKOFF_S,
    KeptOut,
    KeptOutTracker,
    StaleWorker,
    kept_out,
    listed_workers,
    open_circuits,
)
from disagg.runtime.pods import PodView, RouterWorkers, pod_view

DECODE_A, DECODE_B = "http://127.0.0.1:8000", "http://127.0.0.3:8000"
PREFILL_A, PREFILL_B = "http://127.0.0.2:8000", "http://127.0.0.4:8000"
ROUTER_URL = "http://127.0.0.9:8000"

METRICS = f"""# TYPE smg_worker_cb_state gauge
smg_worker_cb_state{{worker="{DECODE_A}"}} 1
smg_worker_cb_state{{worker="{PREFILL_A}"}} 2
smg_worker_cb_state{{worker="{DECODE_B}"}} 0
smg_worker_health{{worker="{DECODE_A}"}} 1
"""


def test_open_and_half_open_circuits_are_read_from_sglang_routers_metrics() -> None:
    assert open_circuits(METRICS) == {DECODE_A, PREFILL_A}
    assert open_circuits("") == set() and open_circuits("vllm_router_worker_health{worker=\"x\"} 1\n") == set()


def test_a_ready_worker_is_kept_out_when_unlisted_unhealthy_or_its_circuit_is_open() -> None:
    listed = [StaleWorker("d1", DECODE_A, "decode"), StaleWorker("d2", DECODE_B, "decode", healthy=False),
              StaleWorker("p1", PREFILL_A, "prefill", bootstrap_port=8998)]
    ready: dict[str, dict[str, int | None]] = {
        "decode": {DECODE_A: None, DECODE_B: None, "http://127.0.0.5:8000": None},
        "prefill": {PREFILL_A: 8998, PREFILL_B: None}}
    out = {w.url: w for w in kept_out(listed, ready, {DECODE_A})}
    assert out[DECODE_A].why == "its circuit breaker open" and out[DECODE_A].listed == listed[0]
    assert out[DECODE_B].why == "listed unhealthy"
    assert out["http://127.0.0.5:8000"].why == "not listed" and out["http://127.0.0.5:8000"].listed is None
    assert out[PREFILL_B].bootstrap_port == 8998, "an unlisted prefill without its annotation takes its peers' port"
    assert PREFILL_A not in out, "listed, healthy, circuit closed: in the rotation"
    assert kept_out(listed[:1], {"decode": {DECODE_A: None}}, set()) == []


def test_the_listing_keeps_a_prefills_bootstrap_port() -> None:
    answer = {"workers": [{"id": "p1", "url": PREFILL_A + "/", "worker_type": "prefill", "is_healthy": True,
                           "bootstrap_port": 8998},
                          {"url": DECODE_A, "worker_type": "decode", "is_healthy": True, "bootstrap_port": None}]}
    assert [(w.worker_id, w.url, w.bootstrap_port) for w in listed_workers(answer)] == [
        ("p1", PREFILL_A, 8998), (DECODE_A, DECODE_A, None)]


def decode(url: str = DECODE_A) -> KeptOut:
    return KeptOut(url, "decode", None, None, "not listed")


def test_a_worker_kept_out_two_checks_in_a_row_is_due_then_backs_off() -> None:
    tracker = KeptOutTracker()
    assert tracker.check("r", [decode()], 0.0) == [], "one check is not enough"
    assert tracker.check("r", [], 5.0) == [], "back in the rotation: the count starts again"
    assert tracker.check("r", [decode()], 10.0) == []
    assert tracker.check("r", [decode()], 15.0) == [decode()]
    tracker.readded("r", DECODE_A, 15.0)
    for now in (20.0, 25.0, 30.0, 35.0, 40.0):
        assert tracker.check("r", [decode()], now) == [], f"re-added at 15 s, due again at {now} s"
    assert tracker.check("r", [decode()], 15.0 + READD_BACKOFF_S) == [decode()]
    tracker.readded("r", DECODE_A, 45.0)
    assert tracker.next_allowed("r", DECODE_A) == 45.0 + 2 * READD_BACKOFF_S, "the back-off doubles"
    assert tracker.check("other", [decode()], 50.0) == [] and tracker.check("other", [decode()], 55.0) == [decode()], \
        "the back-off is per router"
    tracker.forget({"other"})
    assert tracker.next_allowed("r", DECODE_A) == 0.0


def test_at_most_a_few_workers_are_put_back_per_router_and_check() -> None:
    tracker = KeptOutTracker()
    many = [decode(f"http://127.0.1.{i}:8000") for i in range(MAX_READDS + 3)]
    tracker.check("r", many, 0.0)
    assert len(tracker.check("r", many, 5.0)) == MAX_READDS


class SglangRouter:
    """sglang-router 0.3.2's worker API as the binary answered: `GET /workers` with ids and bootstrap ports,
    `DELETE /workers/<id>` (202, queued), `POST /workers {url, worker_type, bootstrap_port}` (202, a new id)."""

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, Any]] = {
            "d1": {"url": DECODE_A, "worker_type": "decode", "is_healthy": True},
            "d2": {"url": DECODE_B, "worker_type": "decode", "is_healthy": True},
            "p1": {"url": PREFILL_A, "worker_type": "prefill", "is_healthy": True, "bootstrap_port": 8998},
            "p2": {"url": PREFILL_B, "worker_type": "prefill", "is_healthy": True, "bootstrap_port": 8998}}
        self.open: set[str] = set()
        self.calls: list[tuple[str, str, Any]] = []
        self.sick: set[str] = set()
        self.added = 0

    def __call__(self, method: str, url: str) -> Any:
        self.calls.append((method, url, None))
        if method == "GET":
            return {"workers": [{"id": i, **w} for i, w in self.workers.items()]}
        self.workers.pop(url.rsplit("/", 1)[1])
        return {"status": "accepted"}

    def text(self, url: str) -> str:
        assert url == "http://127.0.0.9:29000/metrics", url
        return "".join(f'smg_worker_cb_state{{worker="{w["url"]}"}} {int(w["url"] in self.open)}\n'
                       for w in self.workers.values())

    def healthy(self, url: str) -> bool:
        self.calls.append(("HEALTH", url, None))
        return url not in self.sick

    def post(self, url: str, body: Mapping[str, Any]) -> Any:
        self.calls.append(("POST", url, dict(body)))
        self.added += 1
        self.workers[f"new{self.added}"] = {**body, "is_healthy": True}
        self.open.discard(str(body["url"]))  # a new worker starts with a closed circuit
        return {"status": "accepted"}


def service_pods(app: str = "sglang-router", ready: bool = True) -> list[PodView]:
    return [PodView("serving", "sglang-router-x", "sglang", "router", ROUTER_URL, True, False, app=app),
            PodView("serving", "sglang-decode-a", "sglang", "decode", DECODE_A, ready, False),
            PodView("serving", "sglang-decode-b", "sglang", "decode", DECODE_B, True, False),
            PodView("serving", "sglang-prefill-a", "sglang", "prefill", PREFILL_A, True, False, bootstrap_port=8998),
            PodView("serving", "sglang-prefill-b", "sglang", "prefill", PREFILL_B, True, False, bootstrap_port=8998)]


def watching(router: SglangRouter, pods: list[PodView], clock: list[float]) -> tuple[RouterWorkers, list[Any]]:
    events: list[Any] = []
    workers = RouterWorkers(lambda: pods, lambda obj, kind, reason, message: events.append(
        (obj["metadata"]["name"], kind, reason, message)), lambda: True, api=router, clock=lambda: clock[0],
        http=router)
    return workers, events


def rounds(workers: RouterWorkers, clock: list[float], n: int) -> None:
    for _ in range(n):
        workers.check()
        clock[0] += 5.0


def test_a_recovered_decode_and_its_collateral_prefill_are_removed_and_added_again_with_an_event() -> None:
    router, clock = SglangRouter(), [0.0]
    router.open = {DECODE_A, PREFILL_A}  # the router's circuits stayed open after the decode recovered
    workers, events = watching(router, service_pods(), clock)
    rounds(workers, clock, 1)
    assert not [c for c in router.calls if c[0] in ("POST", "DELETE")], "one check is not enough"
    rounds(workers, clock, 1)
    changes = [c for c in router.calls if c[0] in ("POST", "DELETE")]
    assert changes == [
        ("DELETE", f"{ROUTER_URL}/workers/p1", None),
        ("POST", f"{ROUTER_URL}/workers", {"url": PREFILL_A, "worker_type": "prefill", "bootstrap_port": 8998}),
        ("DELETE", f"{ROUTER_URL}/workers/d1", None),
        ("POST", f"{ROUTER_URL}/workers", {"url": DECODE_A, "worker_type": "decode"})]
    assert [(name, kind, reason) for name, kind, reason, _ in events] == [
        ("sglang", "Normal", "RouterWorkerReadded")] * 2
    assert "sglang-router-x" in events[1][3] and "decode worker " + DECODE_A in events[1][3], events[1][3]
    assert not router.open
    rounds(workers, clock, 4)
    assert len(events) == 2, "back in the rotation: nothing more to do"


def test_an_unlisted_ready_prefill_is_added_with_its_bootstrap_port() -> None:
    router, clock = SglangRouter(), [0.0]
    del router.workers["p2"]
    workers, events = watching(router, service_pods(), clock)
    rounds(workers, clock, 2)
    assert [c for c in router.calls if c[0] in ("POST", "DELETE")] == [
        ("POST", f"{ROUTER_URL}/workers", {"url": PREFILL_B, "worker_type": "prefill", "bootstrap_port": 8998})]
    assert "not listed" in events[0][3]


def test_no_worker_is_put_back_when_its_pod_is_not_ready_or_it_fails_its_own_health_check() -> None:
    router, clock = SglangRouter(), [0.0]
    router.open = {DECODE_A}
    workers, events = watching(router, service_pods(ready=False), clock)
    rounds(workers, clock, 4)
    assert not [c for c in router.calls if c[0] != "GET"] and not events, "a NotReady pod is the kubelet's business"

    router = SglangRouter()
    router.workers["d1"]["is_healthy"] = False
    router.sick = {DECODE_A}
    workers, events = watching(router, service_pods(), clock)
    rounds(workers, clock, 4)
    assert ("HEALTH", DECODE_A, None) in router.calls, "the operator asked the worker itself"
    assert not [c for c in router.calls if c[0] in ("POST", "DELETE")] and not events, "still failing: left out"
    router.sick = set()
    rounds(workers, clock, 1)
    assert [e[2] for e in events] == ["RouterWorkerReadded"]


def test_a_flapping_worker_is_not_put_back_every_check() -> None:
    router, clock = SglangRouter(), [0.0]
    workers, events = watching(router, service_pods(), clock)
    for _ in range(16):  # 80 s in which the router opens the decode's circuit again at every check
        router.open.add(DECODE_A)
        rounds(workers, clock, 1)
    assert len(events) == 2, f"put back at 5 s, then not before 35 s, then not before 95 s (back-off): {events}"


def test_a_worker_of_another_revision_or_a_multi_node_follower_is_never_added() -> None:
    router, clock = SglangRouter(), [0.0]
    pods = [replace(p, revision="r1") for p in service_pods()]
    pods += [PodView("serving", "sglang--decode-b-x", "sglang", "decode", "http://127.0.0.6:8000", True, False,
                     revision="r2"),  # a rollout's new pool, Ready before the routers switch
             PodView("serving", "sglang-decode-a-1", "sglang", "decode", "http://127.0.0.7:8000", True, False,
                     revision="r1", leader=False)]
    workers, events = watching(router, pods, clock)
    rounds(workers, clock, 4)
    assert not [c for c in router.calls if c[0] in ("POST", "DELETE")] and not events, events
    pods[0] = replace(pods[0], revision="r2")  # the routers switched: the new pool's decode is theirs
    rounds(workers, clock, 2)
    assert [c[2]["url"] for c in router.calls if c[0] == "POST"] == ["http://127.0.0.6:8000"]


def test_vllm_router_workers_are_never_removed_to_be_put_back() -> None:
    router, clock = SglangRouter(), [0.0]  # vllm-router in PD mode answers POST /workers with 400
    router.workers["d1"]["is_healthy"] = False
    workers, events = watching(router, service_pods(app="vllm-router"), clock)
    rounds(workers, clock, 4)
    assert not [c for c in router.calls if c[0] != "GET"] and not events


def test_a_pods_router_name_and_bootstrap_port_come_from_its_labels_and_annotation() -> None:
    labels = {"disagg.dev/service": "sglang", "disagg.dev/role": "prefill", "app.kubernetes.io/name": "sglang"}
    pod: dict[str, Any] = {
        "metadata": {"namespace": "serving", "name": "sglang-prefill-a", "labels": labels,
                     "annotations": {"sglang.ai/bootstrap-port": "8998"}},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 30000}]}]},
        "status": {"podIP": "127.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]}}
    view = pod_view(pod)
    assert view is not None and view.bootstrap_port == 8998 and view.app == "sglang" and view.ready
    assert view.revision == "" and view.leader
    labels.update({"disagg.dev/revision": "abc", "leaderworkerset.sigs.k8s.io/worker-index": "1"})
    view = pod_view(pod)
    assert view is not None and view.revision == "abc" and not view.leader
