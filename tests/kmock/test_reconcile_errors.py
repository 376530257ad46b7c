"""Any exception in a reconcile ends on the service: Ready=False reason ReconcileError with the message
and a Warning Event, once; the log has the traceback once, not on every resync (issue 18, item 5)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import yaml

from disagg.kube.client import ApiError
from disagg.reconcile import run as run_module
from disagg.reconcile.run import Outcome, Reconciler, reconcile_service
from support.kmock import ApplyingEmulator, Write, writes
from support.kmock_harness import EXAMPLE, ISVC, STATUS, Harness, condition

pytestmark = pytest.mark.kmock(cls=ApplyingEmulator)


def example() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return manifest


async def reconcile(harness: Harness, reconciler: Reconciler) -> tuple[Outcome, list[Write]]:
    """One reconcile by the one long-lived reconciler (it remembers which failures it logged)."""
    mark = harness.api.mark()
    outcome = await asyncio.to_thread(reconcile_service, reconciler, harness.service())
    return outcome, writes(harness.api.requests_since(mark))


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "disagg.reconcile.run" and r.exc_info]


async def test_an_exception_in_reconcile_becomes_a_condition_and_one_event(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    harness.api.put_object(ISVC, example())

    def overflowing(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(run_module, "render_unplaced", overflowing)
    reconciler = harness.reconciler
    with caplog.at_level(logging.INFO, logger="disagg.reconcile.run"):
        outcome, found = await reconcile(harness, reconciler)
        assert outcome.failed == "OverflowError: int too large to convert to float"
        assert [w.name for w in found] == [STATUS]  # nothing but the status: no child touched
        ready = condition(harness.service()["status"], "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "ReconcileError")
        assert ready["message"] == "OverflowError: int too large to convert to float"
        assert [e[:2] for e in harness.events] == [("Warning", "ReconcileError")]
        assert "OverflowError" in harness.events[0][2]
        assert len(tracebacks(caplog)) == 1

        # a resync that fails the same way: no write, no event, one log line without a traceback
        outcome, found = await reconcile(harness, reconciler)
        assert outcome.failed is not None and found == [] and len(harness.events) == 1
        assert len(tracebacks(caplog)) == 1

    monkeypatch.undo()  # the cause is gone: the next reconcile creates the children and moves Ready on
    outcome, found = await reconcile(harness, reconciler)
    assert outcome.failed is None and len(outcome.applied) == 14  # every child, the router PDB with them
    assert condition(harness.service()["status"], "Ready")["reason"] != "ReconcileError"


async def test_an_api_error_is_reported_with_the_servers_message_and_no_traceback(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    harness.api.put_object(ISVC, example())

    def forbidden(manifest: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        raise ApiError(403, 'deployments.apps is forbidden: User "x" cannot patch resource', "PATCH", "/apis/x")

    monkeypatch.setattr(harness.kube, "apply", forbidden)
    with caplog.at_level(logging.INFO, logger="disagg.reconcile.run"):
        outcome, _ = await harness.reconcile()
    assert outcome.failed is not None and outcome.failed_status == 403
    ready = condition(harness.service()["status"], "Ready")
    assert ready["reason"] == "ReconcileError" and "403" in ready["message"] and "forbidden" in ready["message"]
    assert [e[:2] for e in harness.events] == [("Warning", "ReconcileError")]
    assert tracebacks(caplog) == []


async def test_a_disk_size_the_crd_once_accepted_is_invalid_spec_naming_the_field(harness: Harness) -> None:
    # stored before the schema's quantity bounds (kmock checks no schema): "1e400" crashed rendering
    manifest = example()
    manifest["spec"]["kvCache"] = {"cpuOffloadGiB": 64, "disk": {"size": "1e400"}}
    harness.api.put_object(ISVC, manifest)
    outcome, found = await harness.reconcile()
    assert outcome.failed is None
    assert outcome.invalid is not None and "spec.kvCache.disk.size" in outcome.invalid
    ready = condition(harness.service()["status"], "Ready")
    assert ready["reason"] == "InvalidSpec" and "1e400" in ready["message"] and "1Gi" in ready["message"]
    assert [w.name for w in found] == [STATUS]
