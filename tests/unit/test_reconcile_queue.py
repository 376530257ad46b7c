"""The reconcile queue: a user's spec change goes ahead of status-only work, and a service waits in it once."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from disagg.handlers import ReconcileQueue


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

    work = ReconcileQueue(1, run)
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

    work = ReconcileQueue(1, run)
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
