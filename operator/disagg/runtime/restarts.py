"""Engines restarted in place, replaced by new pods (`disagg.reconcile.restarts`): a watch of the pools' pods
per scope, and a delete of each pod whose engine restarted while it is still loading."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from disagg.kube.client import POD, ApiError, Kind, Kube
from disagg.kube.events import EventRecorder
from disagg.kube.watch import KindWatch
from disagg.reconcile.restarts import WINDOW_S, Replacement, ReplacementBudget, restarted_engine
from disagg.wellknown import MANAGED_SELECTOR, ROLE_LABEL, ROLES

log = logging.getLogger(__name__)

ENGINE_PODS_SELECTOR = f"{MANAGED_SELECTOR},{ROLE_LABEL} in ({','.join(ROLES)})"
HANDLED_MAX = 10_000
"""Pods remembered as replaced (or left to the kubelet) at most; the oldest are forgotten first."""


class RestartedEngines:
    """Watches the engine pods of every scope and replaces those whose engine restarted in place."""

    def __init__(self, kube: Kube, scopes: list[str | None], record_event: EventRecorder,
                 is_active: Callable[[], bool], clock: Callable[[], float] = time.monotonic) -> None:
        self.kube, self.scopes = kube, scopes
        self.record_event, self.is_active, self.clock = record_event, is_active, clock
        self.budget = ReplacementBudget()
        self._handled: dict[str, None] = {}
        """uids acted on (insertion-ordered, bounded): one action per restarted pod."""
        self._guard = threading.Lock()
        self.watches: list[KindWatch] = []

    def start(self) -> None:
        for namespace in self.scopes:
            watch = KindWatch(self.kube, POD, namespace, ENGINE_PODS_SELECTOR, self._listed, self._changed)
            watch.start()
            self.watches.append(watch)

    def stop(self) -> None:
        for watch in self.watches:
            watch.close()

    def _listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        for pod in items:
            self.seen(pod)

    def _changed(self, kind: Kind, event: str, pod: dict[str, Any]) -> None:
        if event != "DELETED":
            self.seen(pod)

    def seen(self, pod: Mapping[str, Any]) -> Replacement | None:
        """Replaces `pod` if its engine restarted in place (once per pod, within the service's budget);
        what was decided."""
        replacement = restarted_engine(pod)
        if replacement is None or not self.is_active():
            return None
        with self._guard:
            if replacement.uid in self._handled:
                return None
            self._handled[replacement.uid] = None
            while len(self._handled) > HANDLED_MAX:
                del self._handled[next(iter(self._handled))]
            allowed = self.budget.take(replacement.namespace, replacement.service, self.clock())
        service = {"metadata": {"namespace": replacement.namespace, "name": replacement.service}}
        if not allowed:
            self.record_event(service, "Warning", "EngineRestartLoop",
                              f"{replacement.role} worker {replacement.name}: its engine restarted in place again "
                              f"(restart {replacement.restarts}); {self.budget.burst} pods of this service were "
                              f"replaced in the last {WINDOW_S:.0f} s, so this one is left to the kubelet's back-off")
            return replacement
        try:
            self.kube.delete(POD, replacement.namespace, replacement.name, uid=replacement.uid)
        except ApiError as error:
            log.warning("cannot replace pod %s/%s: %s", replacement.namespace, replacement.name, error)
            with self._guard:
                self._handled.pop(replacement.uid, None)
            return None
        log.info("replaced %s/%s: %s", replacement.namespace, replacement.name, replacement.message())
        self.record_event(service, "Normal", "EngineReplaced", replacement.message())
        return replacement
