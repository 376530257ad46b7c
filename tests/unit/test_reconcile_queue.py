"""The reconcile queue: a user's spec change goes ahead of status-only work, and a service waits in it once."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from disagg.runtime.queue import ReconcileQueue


def body(name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name}}


def release_and_wait(release: threading.Event, ran: list[Any], count: int) -> None:
    """Lets the busy reconcile finish, then waits (at most 5 s) until `count` reconciles ran."""
    release.set()
    deadline = time.monotonic() + 5
    while len(ran) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_spec_changes_go_ahead_of_status_work_and_waiting_services_are_not_queued_twice() -> None:
    release = threading.Event()
    ran: list[tuple[str, str]] = []

    def run(obj: Mapping[str, Any], trigger: str) -> None:
        if obj["metadata"]["name"] == "busy":
            release.wait(5)  # holds the only worker while the others queue up
        ran.append((obj["metadata"]["name"], trigger))

    work = ReconcileQueue(1, run).start()
    try:
        work.submit(body("busy"), "event", ReconcileQueue.SPEC)
        time.sleep(0.1)
        for i in range(20):  # a rollout's worth of child events for three services
            work.submit(body(f"rolling-{i % 3}"), "child", ReconcileQueue.STATUS)
        work.submit(body("edited"), "event", ReconcileQueue.SPEC)
        assert work.waiting() == 4
        release_and_wait(release, ran, 5)
    finally:
        work.stop()
    assert ran[:2] == [("busy", "event"), ("edited", "event")]
    assert sorted(ran[2:]) == [("rolling-0", "child"), ("rolling-1", "child"), ("rolling-2", "child")]


def test_a_spec_change_is_queued_even_when_the_service_waits_for_status_work() -> None:
    release = threading.Event()
    ran: list[str] = []

    def run(obj: Mapping[str, Any], trigger: str) -> None:
        if obj["metadata"]["name"] == "busy":
            release.wait(5)
        ran.append(f"{obj['metadata']['name']}/{trigger}")

    work = ReconcileQueue(1, run).start()
    try:
        work.submit(body("busy"), "event", ReconcileQueue.SPEC)
        time.sleep(0.1)
        work.submit(body("other"), "child", ReconcileQueue.STATUS)
        work.submit(body("svc"), "child", ReconcileQueue.STATUS)
        work.submit(body("svc"), "event", ReconcileQueue.SPEC)
        release_and_wait(release, ran, 4)
    finally:
        work.stop()
    assert ran[:2] == ["busy/event", "svc/event"]


def test_triggers_during_a_reconcile_fold_into_one_rerun_and_never_run_beside_it() -> None:
    release = threading.Event()
    ran: list[str] = []
    running: set[str] = set()
    overlaps: list[str] = []

    def run(obj: Mapping[str, Any], trigger: str) -> None:
        name = obj["metadata"]["name"]
        if name in running:
            overlaps.append(name)
        running.add(name)
        if not ran:
            release.wait(5)  # the first reconcile is slow: the burst arrives while it runs
        ran.append(f"{name}/{trigger}")
        running.discard(name)

    work = ReconcileQueue(4, run).start()  # idle workers that could take a second copy of the service
    try:
        work.submit(body("svc"), "event", ReconcileQueue.SPEC)
        time.sleep(0.1)
        for _ in range(50):  # a Deployment's events during a rollout
            work.submit(body("svc"), "child", ReconcileQueue.STATUS)
        release_and_wait(release, ran, 2)
        time.sleep(0.2)  # room for any further (wrong) re-run
    finally:
        work.stop()
    assert ran == ["svc/event", "svc/child"]
    assert overlaps == []


def test_a_failing_reconcile_does_not_stop_its_worker() -> None:
    ran: list[str] = []

    def run(obj: Mapping[str, Any], trigger: str) -> None:
        if obj["metadata"]["name"] == "broken":
            raise RuntimeError("a bug in one service's reconcile")
        ran.append(obj["metadata"]["name"])

    work = ReconcileQueue(1, run).start()
    try:
        work.submit(body("broken"), "event", ReconcileQueue.SPEC)
        work.submit(body("fine"), "event", ReconcileQueue.SPEC)
        release_and_wait(threading.Event(), ran, 1)
    finally:
        work.stop()
    assert ran == ["fine"]


def test_a_spec_change_runs_while_every_worker_is_in_slow_status_work_and_runs_once() -> None:
    release = threading.Event()
    ran: list[str] = []

    def run(obj: Mapping[str, Any], trigger: str) -> None:
        if trigger == "child":
            release.wait(5)  # status reconciles stuck behind a busy API server
        ran.append(f"{obj['metadata']['name']}/{trigger}")

    work = ReconcileQueue(2, run, spec_workers=1).start()
    try:
        for name in ("rolling-0", "rolling-1", "rolling-2"):
            work.submit(body(name), "child", ReconcileQueue.STATUS)
        time.sleep(0.1)
        work.submit(body("edited"), "event", ReconcileQueue.SPEC)
        deadline = time.monotonic() + 5
        while "edited/event" not in ran and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ran == ["edited/event"]  # before any status reconcile finished
        release_and_wait(release, ran, 4)
        time.sleep(0.2)  # room for a second (wrong) run of the edit from the general queue
    finally:
        work.stop()
    assert sorted(ran) == ["edited/event", "rolling-0/child", "rolling-1/child", "rolling-2/child"]


def test_status_work_waits_for_its_delay_folding_triggers_but_a_spec_change_does_not_wait() -> None:
    ran: list[tuple[str, str, float]] = []
    started = time.monotonic()

    def run(obj: Mapping[str, Any], trigger: str) -> None:
        ran.append((obj["metadata"]["name"], trigger, time.monotonic() - started))

    work = ReconcileQueue(2, run, status_delay_s=0.5).start()
    try:
        for _ in range(10):  # a rollout's Deployment events for one service, within 0.2 s
            work.submit(body("rolling"), "child", ReconcileQueue.STATUS)
            time.sleep(0.02)
        work.submit(body("settled"), "child", ReconcileQueue.STATUS)
        work.submit(body("settled"), "event", ReconcileQueue.SPEC)  # an edit while its status work waits
        deadline = time.monotonic() + 5
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.7)  # the edited service's delayed status entry comes due meanwhile
    finally:
        work.stop()
    assert [(name, trigger) for name, trigger, _ in ran] == [("settled", "event"), ("rolling", "child")]
    assert ran[0][2] < 0.45  # the edit did not wait for the delay
    assert 0.5 <= ran[1][2] < 1.0  # the rollout's ten triggers: one reconcile, after the delay
