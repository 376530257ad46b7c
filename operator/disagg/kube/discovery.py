"""Kinds the operator uses only where the cluster serves them and its identity may manage them
(LeaderWorkerSets: a CRD not every cluster has, rules not every installation grants). Once both hold,
the caller starts the kind's watches, once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from disagg.kube.client import ApiError, Kind, Kube

log = logging.getLogger(__name__)

VERBS = ("get", "list", "watch", "create", "patch", "delete")


class OptionalKind:
    """Whether `kind` can be used, asked of the API server at most every `recheck_s` (a CRD installed or
    a rule granted later is found without a restart); `on_served` runs once, the first time it can.
    `reason` says why not, with what would fix it."""

    def __init__(
        self, kube: Kube, kind: Kind, namespaces: list[str | None], on_served: Callable[[], None],
        recheck_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.namespaces = namespaces
        self.on_served = on_served
        self.recheck_s = recheck_s
        self.clock = clock
        self.reason = f"not checked yet whether the API server serves {kind.resource}"
        self._guard = threading.Lock()
        self._served = False
        self._checked_at: float | None = None

    def _check(self) -> str | None:
        """None when usable, else why not."""
        group_version = self.kind.api_version
        try:
            if not self.kube.serves(self.kind):
                return (f"the API server does not serve {self.kind.plural} ({group_version}): install the "
                        "LeaderWorkerSet controller and its CRDs (sigs.k8s.io/lws)")
            missing = sorted({verb for verb in VERBS for namespace in self.namespaces
                              if not self.kube.may(verb, self.kind, namespace)})
        except ApiError as error:
            return f"discovery of {self.kind.resource} failed: {error.message}"
        if missing:
            return (f"the operator may not {'/'.join(missing)} {self.kind.resource}: grant it the rules "
                    "`disagg rbac` prints (the chart's RBAC has them)")
        return None

    def available(self) -> bool:
        with self._guard:
            if self._served:
                return True
            now = self.clock()
            if self._checked_at is not None and now - self._checked_at < self.recheck_s:
                return False
            self._checked_at = now
            reason = self._check()
            if reason is not None:
                if reason != self.reason:
                    log.info("%s not used: %s", self.kind.resource, reason)
                self.reason = reason
                return False
            self._served = True
        log.info("the API server serves %s and the operator may manage them: watching them", self.kind.resource)
        self.on_served()
        return True
