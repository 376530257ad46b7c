"""What the operator says when its RBAC does not let it watch a child kind."""

from __future__ import annotations

import logging
import threading
from typing import Any, cast

import pytest

from disagg.kube.client import KINDS_BY_NAME, ApiError, Kube
from disagg.kube.watch import KindWatch


class _RefusingThenAllowing:
    """An API server that refuses the first `refusals` listings (403), then lists nothing and holds the
    watch open until the test ends."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.released = threading.Event()

    def request(self, method: str, path: str, query: list[tuple[str, str]]) -> dict[str, Any]:
        if self.refusals > 0:
            self.refusals -= 1
            raise ApiError(403, 'deployments.apps is forbidden: User "system:serviceaccount:ops:disagg" cannot list '
                                'resource "deployments" in API group "apps" in the namespace "serving"', method, path)
        return {"items": [], "metadata": {"resourceVersion": "7"}}

    def open_stream(self, path: str, query: list[tuple[str, str]], read_timeout_s: float) -> Any:
        released = self.released

        class _Held:
            def stream(self, size: int, decode_content: bool) -> Any:
                released.wait(30)
                return iter(())

            def release_conn(self) -> None:
                pass

        return _Held()


def test_a_refused_listing_is_one_warning_naming_the_permission_and_the_watch_recovers_once_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = _RefusingThenAllowing(refusals=2)
    listed = threading.Event()
    watch = KindWatch(cast(Kube, server), KINDS_BY_NAME[("apps/v1", "Deployment")], "serving", "app=x",
                      lambda kind, namespace, items, last: listed.set() if last else None,
                      lambda kind, event, obj: None)
    with caplog.at_level(logging.INFO, logger="disagg.kube.watch"):
        watch.start()
        try:
            assert listed.wait(20), "the listing never arrived after the permission came"
        finally:
            watch.stop.set()
            server.released.set()
            watch.thread.join(10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # the same refusal twice: said once
    assert "cannot list and watch deployments.apps in serving" in warnings[0]
    assert "RBAC must allow list and watch" in warnings[0]
