"""Kubernetes Events about the operator's objects: what `kubectl describe` and `kubectl get events` show.

Posted from any thread without holding it up: a reconcile or an autoscaler tick hands the Event to a
bounded queue, and one thread posts them in order. An Event is auxiliary: one that cannot be posted
is logged and dropped, and never fails the work that recorded it.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from disagg import GROUP, KIND, VERSION
from disagg.kube.client import Kind, Kube

log = logging.getLogger(__name__)

EVENT = Kind("v1", "Event", "events")
REPORTING_COMPONENT = "disagg"
"""The Events' source (`kubectl describe` shows it under From)."""
MAX_MESSAGE = 1024
"""The API server refuses longer messages; longer ones keep their start and end."""
QUEUED = 1000
"""Events waiting to be posted at most; more are dropped (and logged) while the API server lags."""

EventRecorder = Callable[[Mapping[str, Any], str, str, str], None]
"""(the object, Normal | Warning, reason, message)."""


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shortened(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    half = (MAX_MESSAGE - 3) // 2
    return f"{message[:half]}...{message[-(MAX_MESSAGE - 3 - half):]}"


def event_manifest(
    obj: Mapping[str, Any], event_type: str, reason: str, message: str, instance: str, now: datetime.datetime
) -> dict[str, Any]:
    """A core/v1 Event about `obj` (an InferenceService unless its body says otherwise)."""
    meta = obj.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    involved = {
        "apiVersion": obj.get("apiVersion") or f"{GROUP}/{VERSION}",
        "kind": obj.get("kind") or KIND,
        "name": meta.get("name", ""),
        "namespace": namespace,
    }
    if meta.get("uid"):
        involved["uid"] = meta["uid"]
    stamp = _timestamp(now)
    return {
        "apiVersion": EVENT.api_version,
        "kind": EVENT.kind,
        "metadata": {"generateName": f"{meta.get('name') or 'disagg'}.", "namespace": namespace},
        "involvedObject": involved,
        "type": event_type,
        "reason": reason,
        "message": shortened(message),
        "source": {"component": REPORTING_COMPONENT},
        "reportingComponent": REPORTING_COMPONENT,
        "reportingInstance": instance[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventPoster:
    """Posts Events through `kube` on its own thread; `record` is an `EventRecorder` for any thread."""

    def __init__(
        self, kube: Kube, instance: str, capacity: int = QUEUED,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.kube = kube
        self.instance = instance
        """Which operator process posts (its peering identity)."""
        self.clock = clock
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="disagg-events", daemon=True)
        self._dropped = 0

    def record(self, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        manifest = event_manifest(obj, event_type, reason, message, self.instance, self.clock())
        try:
            self._queue.put_nowait(manifest)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                log.warning("%d Events dropped (the API server takes them slower than they come): %s %s",
                            self._dropped, reason, message[:200])

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Posts what is queued (for at most `timeout_s`), then stops."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def post(self, manifest: dict[str, Any]) -> None:
        namespace = manifest["metadata"]["namespace"]
        try:
            self.kube.request("POST", EVENT.collection(namespace), body=manifest)
        except Exception as error:  # ApiError, or a bug: the posting thread outlives either
            log.warning("Event %s %s about %s/%s not posted: %s", manifest["type"], manifest["reason"], namespace,
                        manifest["involvedObject"]["name"], error)

    def _run(self) -> None:
        while True:
            manifest = self._queue.get()
            if manifest is None:
                return
            self.post(manifest)
