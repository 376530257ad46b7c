"""An engine restarted in place is replaced by a new pod while it loads (its peers would crash on its new
identity at the old address), once per pod, within a per-service budget; nothing else is touched."""

from __future__ import annotations

import copy
from typing import Any, cast
from urllib.parse import unquote

from disagg.kube.client import Kind, Kube
from disagg.reconcile.restarts import BURST, ReplacementBudget, restarted_engine
from disagg.runtime.pods import OperatorPods, PodView, RestartedEngines, RouterWorkers


def pod(name: str = "vllm-decode-abc", role: str = "decode", restarts: int = 1, ready: bool = False,
        **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "serving", "uid": f"uid-{name}",
                     "labels": {"app.kubernetes.io/managed-by": "disagg", "disagg.dev/service": "vllm",
                                "disagg.dev/role": role},
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "vllm-decode-5d", "controller": True}],
                     **meta},
        "status": {"containerStatuses": [
            {"name": "engine", "ready": ready, "restartCount": restarts,
             "lastState": {"terminated": {"reason": "Error", "exitCode": 139}} if restarts else {}}]},
    }


def test_a_restarted_engine_still_loading_is_replaced() -> None:
    found = restarted_engine(pod())
    assert found is not None
    assert (found.namespace, found.name, found.uid, found.service, found.role) == (
        "serving", "vllm-decode-abc", "uid-vllm-decode-abc", "vllm", "decode")
    assert "Error" in found.message() and "new address" in found.message()


def test_pods_that_need_no_replacement_are_left_alone() -> None:
    assert restarted_engine(pod(restarts=0)) is None, "never restarted"
    assert restarted_engine(pod(ready=True)) is None, "Ready again: replacing it would cut its streams"
    assert restarted_engine(pod(deletionTimestamp="2026-12-07T00:00:00Z")) is None, "already leaving"
    assert restarted_engine(pod(role="router")) is None, "not an engine"
    lws = pod()
    lws["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"] = "0"
    assert restarted_engine(lws) is None, "a multi-node worker: the LeaderWorkerSet restarts its group"
    bare = pod()
    bare["metadata"]["ownerReferences"] = []
    assert restarted_engine(bare) is None, "no ReplicaSet would make a new one"
    no_status = pod()
    no_status["status"] = {}
    assert restarted_engine(no_status) is None


def test_the_budget_bounds_replacements_per_service_and_window() -> None:
    budget = ReplacementBudget(burst=2, window_s=60.0)
    assert [budget.take("ns", "a", t) for t in (0.0, 1.0, 2.0)] == [True, True, False]
    assert budget.take("ns", "b", 2.0), "another service has its own budget"
    assert budget.take("ns", "a", 61.0), "the window moved on"


class FakeKube:
    def __init__(self) -> None:
        self.deleted: list[tuple[str, str, str, str | None]] = []

    def delete(self, kind: Kind, namespace: str, name: str, uid: str | None = None) -> None:
        self.deleted.append((kind.kind, namespace, name, uid))


def engines(active: bool = True) -> tuple[RestartedEngines, FakeKube, list[tuple[str, str, str]]]:
    kube, events = FakeKube(), []
    watcher = RestartedEngines(kube, lambda obj, kind, reason, message: events.append(  # type: ignore[arg-type]
        (obj["metadata"]["name"], kind, reason)), lambda: active, clock=lambda: 0.0)
    return watcher, kube, events


def test_each_restarted_pod_is_deleted_once_with_its_uid_and_an_event() -> None:
    watcher, kube, events = engines()
    watcher.seen(pod())
    watcher.seen(copy.deepcopy(pod()))  # the next status update of the same pod
    for other in (pod(ready=True, name="other"), pod(restarts=0, name="fresh")):
        watcher.seen(other)
    assert kube.deleted == [("Pod", "serving", "vllm-decode-abc", "uid-vllm-decode-abc")]
    assert events == [("vllm", "Normal", "EngineReplaced")]


def test_a_crash_loop_is_left_to_the_kubelet_after_the_budget() -> None:
    watcher, kube, events = engines()
    for i in range(BURST + 2):
        watcher.seen(pod(name=f"vllm-decode-{i}"))
    assert len(kube.deleted) == BURST
    assert [reason for _, _, reason in events] == ["EngineReplaced"] * BURST + ["EngineRestartLoop"] * 2


def test_a_standby_operator_replaces_nothing() -> None:
    watcher, kube, events = engines(active=False)
    watcher.seen(pod())
    assert not kube.deleted and not events


def view(name: str, role: str, url: str, service: str = "vllm", ready: bool = True) -> PodView:
    return PodView("serving", name, service, role, url, ready, deleting=False)


class FakeRouter:
    """A router's worker API: GET /workers and DELETE /workers/<id>."""

    def __init__(self, workers: list[tuple[str, str, str]]) -> None:
        self.workers = {worker_id: (url, role) for worker_id, url, role in workers}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, method: str, url: str) -> Any:
        self.calls.append((method, url))
        if method == "GET":
            return {"workers": [{"id": i, "url": u, "worker_type": r, "is_healthy": True}
                                for i, (u, r) in self.workers.items()]}
        self.workers.pop(url.rsplit("/", 1)[1])
        return {"status": "accepted"}


def test_a_worker_no_pod_is_behind_is_removed_from_the_router_after_two_checks() -> None:
    pods = [view("vllm-router-x", "router", "http://127.0.0.9:8000"),
            view("vllm-decode-a", "decode", "http://127.0.0.1:8000"),
            view("vllm-prefill-a", "prefill", "http://127.0.0.2:8000"),
            view("other-decode-a", "decode", "http://127.0.0.5:8000", service="other")]
    router = FakeRouter([("d1", "http://127.0.0.1:8000", "decode"), ("p1", "http://127.0.0.2:8000", "prefill"),
                         ("gone", "http://127.0.0.3:8000", "decode"),
                         ("reused", "http://127.0.0.5:8000", "decode")])  # another service's pod took the address
    events: list[tuple[str, str]] = []
    workers = RouterWorkers(lambda: pods, lambda obj, kind, reason, message: events.append(
        (obj["metadata"]["name"], reason)), lambda: True, api=router)
    assert workers.check() == [], "the first check only notes them (a new pod may not be seen yet)"
    removed = workers.check()
    assert sorted(w.worker_id for _, w in removed) == ["gone", "reused"]
    assert sorted(router.workers) == ["d1", "p1"]
    assert events == [("vllm", "RouterWorkerRemoved")] * 2
    assert workers.check() == [] and ("DELETE", "http://127.0.0.9:8000/workers/gone") in router.calls


def test_a_worker_whose_pod_appears_in_between_is_kept_and_routers_without_the_api_are_left_alone() -> None:
    pods = [view("vllm-router-x", "router", "http://127.0.0.9:8000")]
    router = FakeRouter([("new", "http://127.0.0.4:8000", "decode")])
    workers = RouterWorkers(lambda: pods, lambda *args: None, lambda: True, api=router)
    assert workers.check() == []
    pods.append(view("vllm-decode-new", "decode", "http://127.0.0.4:8000"))
    assert workers.check() == [] and workers.check() == []
    assert list(router.workers) == ["new"]

    def no_api(method: str, url: str) -> Any:
        raise OSError("404")

    quiet = RouterWorkers(lambda: pods, lambda *args: None, lambda: True, api=no_api)
    assert quiet.check() == [] and quiet.check() == []


class VllmRouter:
    """vllm-router's worker API: `GET /workers` without ids, `DELETE /workers/<percent-encoded URL>`."""

    def __init__(self, workers: list[tuple[str, str]]) -> None:
        self.workers = dict(workers)
        self.deleted: list[str] = []

    def __call__(self, method: str, url: str) -> Any:
        if method == "GET":
            return {"workers": [{"url": u, "worker_type": r, "is_healthy": True, "load": 0}
                                for u, r in self.workers.items()], "total": len(self.workers)}
        worker = unquote(url.split("/workers/", 1)[1])
        self.deleted.append(worker)
        self.workers.pop(worker)
        return {"success": True}


def leaving(name: str, role: str, url: str) -> PodView:
    return PodView("serving", name, "vllm", role, url, True, deleting=True)


def test_a_leaving_worker_leaves_every_router_at_the_next_check_vllm_router_included() -> None:
    pods = [view("vllm-router-x", "router", "http://127.0.0.9:8000"),
            view("vllm-router-y", "router", "http://127.0.0.8:8000"),
            view("vllm-prefill-a", "prefill", "http://127.0.0.2:8000"),
            leaving("vllm-prefill-b", "prefill", "http://127.0.0.3:8000"),
            view("vllm-decode-a", "decode", "http://127.0.0.1:8000")]
    listed = [("http://127.0.0.2:8000", "prefill"), ("http://127.0.0.3:8000", "prefill"),
              ("http://127.0.0.1:8000", "decode")]
    routers = {"http://127.0.0.9:8000": VllmRouter(listed), "http://127.0.0.8:8000": VllmRouter(listed)}

    def api(method: str, url: str) -> Any:
        return routers[url.split("/workers", 1)[0]](method, url)

    events: list[str] = []
    workers = RouterWorkers(lambda: pods, lambda obj, kind, reason, message: events.append(message), lambda: True,
                            api=api)
    removed = workers.check(count=False)
    assert sorted(router for router, _ in removed) == ["serving/vllm-router-x", "serving/vllm-router-y"]
    for router in routers.values():
        assert router.deleted == ["http://127.0.0.3:8000"]
        assert sorted(router.workers) == ["http://127.0.0.1:8000", "http://127.0.0.2:8000"]
    assert len(events) == 2 and all("being deleted" in message for message in events)


def test_a_check_between_rounds_removes_only_leaving_workers_and_counts_no_miss() -> None:
    pods = [view("vllm-router-x", "router", "http://127.0.0.9:8000")]
    router = FakeRouter([("gone", "http://127.0.0.3:8000", "decode")])
    workers = RouterWorkers(lambda: pods, lambda *args: None, lambda: True, api=router)
    assert workers.check(count=False) == [] and workers.check(count=False) == []
    assert workers.check() == [], "between-round checks are no misses: the first regular one only notes it"
    assert [w.worker_id for _, w in workers.check()] == ["gone"]


def test_a_pods_deletion_wakes_the_router_check_once() -> None:
    operator = OperatorPods(cast(Kube, None), ["serving"], lambda *args: None, lambda: False)
    decode = pod("vllm-decode-a", restarts=0, ready=True)
    operator._seen(decode)
    assert not operator.routers.wake.is_set()
    decode["metadata"]["deletionTimestamp"] = "2026-12-07T04:00:00Z"
    operator._seen(decode)
    assert operator.routers.wake.is_set()
    operator.routers.wake.clear()
    operator._seen(decode)
    assert not operator.routers.wake.is_set(), "only its first sight as leaving wakes the check"


class StatusKube:
    """An InferenceService's status, as the condition writer reads and merge-patches it."""

    def __init__(self) -> None:
        self.body: dict[str, Any] = {"metadata": {"namespace": "serving", "name": "vllm", "generation": 3},
                                     "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        self.writes = 0

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.body)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.writes += 1
        self.body["status"].update(status)
        return self.body

    def condition(self) -> tuple[str, str, str]:
        cond = next(c for c in self.body["status"]["conditions"] if c["type"] == "RouterWorkers")
        return cond["status"], cond["reason"], cond["message"]


def test_a_router_with_no_healthy_decode_says_so_in_the_status_once_and_recovers() -> None:
    pods = [view("vllm-router-x", "router", "http://127.0.0.9:8000"),
            view("vllm-prefill-a", "prefill", "http://127.0.0.2:8000"),
            view("vllm-decode-a", "decode", "http://127.0.0.1:8000")]
    healthy = {"http://127.0.0.2:8000": True, "http://127.0.0.1:8000": True}

    def router(method: str, url: str) -> Any:
        return {"workers": [{"url": u, "worker_type": "prefill" if u.endswith("2:8000") else "decode",
                             "is_healthy": ok} for u, ok in healthy.items()]}

    kube = StatusKube()
    events: list[tuple[str, str]] = []
    workers = RouterWorkers(lambda: pods, lambda obj, kind, reason, message: events.append((kind, reason)),
                            lambda: True, api=router, kube=cast(Kube, kube))
    workers.check()
    assert kube.condition()[:2] == ("True", "WorkersHealthy") and events == []
    healthy["http://127.0.0.1:8000"] = False  # the router's health checks failed on a Ready pod
    workers.check()
    status, reason, message = kube.condition()
    assert (status, reason) == ("False", "NoHealthyDecode") and "vllm-router-x" in message, message
    assert "1 decode pods Ready" in message and events == [("Warning", "NoHealthyDecode")]
    writes = kube.writes
    workers.check()
    workers.check()
    assert kube.writes == writes, "an unchanged condition is not written again"
    kube.body["status"]["conditions"] = [{"type": "Ready", "status": "True"}]  # another writer dropped it
    for _ in range(12):
        workers.check()
    assert kube.condition()[:2] == ("False", "NoHealthyDecode"), "a False condition is read back and restored"
    healthy["http://127.0.0.1:8000"] = True
    workers.check()
    assert kube.condition()[:2] == ("True", "WorkersHealthy")
    assert events[-1] == ("Normal", "RouterWorkersHealthy")
    assert [c["type"] for c in kube.body["status"]["conditions"]] == ["Ready", "RouterWorkers"]


def test_a_leaving_worker_that_is_a_routers_last_healthy_one_of_its_role_stays_until_another_is_listed() -> None:
    pods = [view("vllm-router-x", "router", "http://127.0.0.9:8000"),
            leaving("vllm-prefill-b", "prefill", "http://127.0.0.3:8000"),
            view("vllm-prefill-new", "prefill", "http://127.0.0.4:8000"),
            view("vllm-decode-a", "decode", "http://127.0.0.1:8000")]
    router = VllmRouter([("http://127.0.0.3:8000", "prefill"), ("http://127.0.0.1:8000", "decode")])
    workers = RouterWorkers(lambda: pods, lambda *args: None, lambda: True, api=router)
    assert workers.check(count=False) == [] and workers.check() == [] and workers.check() == [], \
        "the router added no replacement yet"
    router.workers["http://127.0.0.4:8000"] = "prefill"
    assert [w.url for _, w in workers.check(count=False)] == ["http://127.0.0.3:8000"]
