"""An engine restarted in place is replaced by a new pod while it loads (its peers would crash on its new
identity at the old address), once per pod, within a per-service budget; nothing else is touched."""

from __future__ import annotations

import copy
from typing import Any

from disagg.kube.client import POD, Kind
from disagg.reconcile.restarts import BURST, ReplacementBudget, restarted_engine
from disagg.runtime.restarts import RestartedEngines


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
    watcher = RestartedEngines(kube, ["serving"], lambda obj, kind, reason, message: events.append(  # type: ignore[arg-type]
        (obj["metadata"]["name"], kind, reason)), lambda: active, clock=lambda: 0.0)
    return watcher, kube, events


def test_each_restarted_pod_is_deleted_once_with_its_uid_and_an_event() -> None:
    watcher, kube, events = engines()
    watcher._changed(POD, "MODIFIED", pod())
    watcher._changed(POD, "MODIFIED", copy.deepcopy(pod()))  # the next status update of the same pod
    watcher._listed(POD, "serving", [pod(ready=True, name="other"), pod(restarts=0, name="fresh")], True)
    assert kube.deleted == [("Pod", "serving", "vllm-decode-abc", "uid-vllm-decode-abc")]
    assert events == [("vllm", "Normal", "EngineReplaced")]


def test_a_crash_loop_is_left_to_the_kubelet_after_the_budget() -> None:
    watcher, kube, events = engines()
    for i in range(BURST + 2):
        watcher._changed(POD, "MODIFIED", pod(name=f"vllm-decode-{i}"))
    assert len(kube.deleted) == BURST
    assert [reason for _, _, reason in events] == ["EngineReplaced"] * BURST + ["EngineRestartLoop"] * 2


def test_a_standby_operator_replaces_nothing() -> None:
    watcher, kube, events = engines(active=False)
    watcher._changed(POD, "MODIFIED", pod())
    assert not kube.deleted and not events
