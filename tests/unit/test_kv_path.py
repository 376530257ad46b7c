"""KVTransferReady from traffic: the decode workers' own counters say whether prompts' KV comes from prefill."""

from __future__ import annotations

from typing import Any

from disagg.reconcile.status import compute_conditions, kv_traffic_condition
from disagg.scaling.prometheus import PrometheusSource
from support.autoscaler_fakes import FakeKube, FakePrometheus, autoscaler, sample, services

READY_POOL: dict[str, Any] = {
    "spec": {"replicas": 1}, "metadata": {"generation": 1},
    "status": {"readyReplicas": 1, "updatedReplicas": 1, "replicas": 1, "observedGeneration": 1},
}


def test_handed_off_kv_is_ready_recomputed_prompts_or_failed_transfers_are_degraded() -> None:
    assert kv_traffic_condition(0.0, 0.0, 0.0) is None  # no traffic: nothing to judge
    ok = kv_traffic_condition(5000.0, 10.0, 0.0)
    assert ok is not None and (ok.status, ok.reason) == ("True", "Transferring")
    recomputing = kv_traffic_condition(100.0, 4900.0, 0.0)
    assert recomputing is not None and (recomputing.status, recomputing.reason) == ("False", "KVTransferDegraded")
    assert "98%" in recomputing.message
    failing = kv_traffic_condition(5000.0, 0.0, 0.2)
    assert failing is not None and failing.reason == "KVTransferDegraded"


def _by_type(conds: list[Any]) -> dict[str, Any]:
    return {c.type: c for c in conds}


def test_reconcile_keeps_the_verdict_from_traffic_while_the_structure_holds() -> None:
    pools: dict[str, dict[str, Any] | None] = {"prefill": READY_POOL, "decode": READY_POOL, "router": READY_POOL}
    degraded = {"type": "KVTransferReady", "status": "False", "reason": "KVTransferDegraded", "message": "m"}
    conds = _by_type(compute_conditions(pools, {}, True, degraded))
    assert (conds["KVTransferReady"].status, conds["KVTransferReady"].reason) == ("False", "KVTransferDegraded")
    assert conds["Ready"].status == "True" and "degraded" in conds["Ready"].message  # it still serves
    # no Services any more: the structural verdict wins
    conds = _by_type(compute_conditions(pools, {}, False, degraded))
    assert conds["KVTransferReady"].reason == "ServicesMissing"
    conds = _by_type(compute_conditions(pools, {}, True, None))
    assert conds["KVTransferReady"].reason == "PeersReady"


def _with_peers_ready(index: Any) -> None:
    for body in index.services.values():
        body["status"] = {"conditions": [{"type": "KVTransferReady", "status": "True", "reason": "PeersReady",
                                          "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}


def test_the_loop_sets_kv_transfer_degraded_with_a_warning_from_the_decode_counters(
    prometheus: FakePrometheus,
) -> None:
    index = services(1)
    _with_peers_ready(index)
    for body in index.services.values():
        for role in ("prefill", "decode"):
            body["spec"][role].pop("autoscaling", None)  # checked for every service, autoscaled or not
    kube = FakeKube()
    scaler, events = autoscaler(index, PrometheusSource(url=prometheus.url), kube)
    verdicts: list[tuple[str, str, bool]] = []
    scaler.on_kv_path = lambda namespace, name, ok: verdicts.append((namespace, name, ok))
    prometheus.answers = {"kv_handed": [sample("svc-0", "decode", 5000.0)],
                          "kv_recomputed": [sample("svc-0", "decode", 20.0)]}
    scaler.tick()
    assert [s["conditions"][0]["reason"] for _, _, s in kube.status] == ["Transferring"]
    assert verdicts == [("ns", "svc-0", True)] and not events
    index.services[("ns", "svc-0")]["status"] = kube.status[-1][2]
    scaler.tick()
    assert len(kube.status) == 1, "no write while the verdict holds"
    prometheus.answers = {"kv_handed": [sample("svc-0", "decode", 50.0)],
                          "kv_recomputed": [sample("svc-0", "decode", 4950.0)]}
    scaler.tick()
    (cond,) = [c for c in kube.status[-1][2]["conditions"] if c["type"] == "KVTransferReady"]
    assert (cond["status"], cond["reason"]) == ("False", "KVTransferDegraded")
    assert [(kind, reason) for kind, reason, _ in events] == [("Warning", "KVTransferDegraded")]
    assert verdicts[-1] == ("ns", "svc-0", False)


def test_the_loop_leaves_a_structural_failure_to_reconcile(prometheus: FakePrometheus) -> None:
    index = services(1)
    for body in index.services.values():
        body["status"] = {"conditions": [{"type": "KVTransferReady", "status": "False", "reason": "NoPeers",
                                          "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    kube = FakeKube()
    scaler, _ = autoscaler(index, PrometheusSource(url=prometheus.url), kube)
    prometheus.answers = {"kv_handed": [sample("svc-0", "decode", 5000.0)]}
    scaler.tick()
    kv = [c for _, _, s in kube.status for c in s.get("conditions", []) if c["type"] == "KVTransferReady"]
    assert all(c["reason"] == "NoPeers" for c in kv), kv
