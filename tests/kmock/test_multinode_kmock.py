"""A multi-node spec on a cluster that cannot run LeaderWorkerSets: the real reconcile against kmock (no
LWS CRD there) writes only the status, and the discovery that decides it."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from disagg.kube.client import LEADER_WORKER_SET, Kind
from disagg.kube.discovery import OptionalKind
from disagg.reconcile.run import Reconciler, reconcile_service
from support.kmock import ApplyingEmulator, writes
from support.kmock_harness import CATALOG, ISVC, NOW, STATUS, Harness, condition
from support.paths import REPO

pytestmark = pytest.mark.kmock(cls=ApplyingEmulator)

DEEPSEEK = yaml.safe_load((REPO / "tests" / "golden" / "input" / "multinode-vllm-deepseek.yaml").read_text())


async def test_without_leaderworkersets_a_multi_node_spec_only_gets_a_condition(harness: Harness) -> None:
    events: list[tuple[str, str, str]] = []
    lws = OptionalKind(harness.kube, LEADER_WORKER_SET, ["serving"], lambda: None)
    reconciler = Reconciler(kube=harness.kube, catalog=CATALOG, clock=lambda: NOW,
                            record_event=lambda obj, kind, reason, message: events.append((kind, reason, message)),
                            lws_available=lws.available, lws_reason=lambda: lws.reason)
    body = copy.deepcopy(DEEPSEEK)
    del body["metadata"]["uid"]
    harness.api.put_object(ISVC, body)

    async def reconcile() -> list[str]:
        stored = harness.api.get_object(ISVC, "serving", "deepseek")
        assert stored is not None
        mark = harness.api.mark()
        await asyncio.to_thread(reconcile_service, reconciler, stored)
        return [w.name for w in writes(harness.api.requests_since(mark))]

    assert await reconcile() == [STATUS.replace("llama-70b", "deepseek")]
    assert harness.children() == {}
    stored = harness.api.get_object(ISVC, "serving", "deepseek")
    assert stored is not None
    ready = condition(stored["status"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "LeaderWorkerSetUnavailable")
    assert "the decode workers span several nodes" in ready["message"]
    assert "does not serve leaderworkersets" in ready["message"] and "sigs.k8s.io/lws" in ready["message"]
    assert [e[:2] for e in events] == [("Warning", "LeaderWorkerSetUnavailable")]
    assert await reconcile() == [] and len(events) == 1  # a resync: no write, no second Event
    # kmock records the one discovery of a kind it does not serve as an error: the 404 that says so
    assert [getattr(e, "status", None) for e in harness.api.errors] == [404]
    harness.api.errors.clear()


@dataclass
class FakeKube:
    """Discovery and access reviews as a cluster answers them."""

    served: bool
    denied: set[str] = field(default_factory=set)
    asked: list[str] = field(default_factory=list)

    def serves(self, kind: Kind) -> bool:
        self.asked.append("discovery")
        return self.served

    def may(self, verb: str, kind: Kind, namespace: str | None) -> bool:
        return verb not in self.denied


def test_an_optional_kind_is_used_once_served_and_permitted_and_rechecked_meanwhile() -> None:
    now = [0.0]
    started: list[int] = []
    kube: Any = FakeKube(served=False)
    lws = OptionalKind(kube, LEADER_WORKER_SET, [None], lambda: started.append(1), recheck_s=30, clock=lambda: now[0])
    assert not lws.available() and "install the LeaderWorkerSet controller" in lws.reason
    kube.served = True
    now[0] = 10
    assert not lws.available() and kube.asked == ["discovery"]  # within the recheck interval: not asked again
    kube.denied = {"watch", "patch"}
    now[0] = 31
    assert not lws.available() and "may not patch/watch leaderworkersets" in lws.reason
    kube.denied = set()
    now[0] = 62
    assert lws.available() and lws.available() and started == [1]  # the watches start once
