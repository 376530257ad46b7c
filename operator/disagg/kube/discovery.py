"""Kinds the operator uses only where the cluster serves them (LeaderWorkerSets: a CRD not every cluster
has). Discovery says whether it is served; once it is, the caller starts its watches, once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from disagg.kube.client import ApiError, Kind, Kube

log = logging.getLogger(__name__)


class OptionalKind:
    """Whether `kind` is served, asked of the API server at most every `recheck_s` (a CRD installed later
    is found without a restart); `on_served` runs once, the first time it is."""

    def __init__(
        self, kube: Kube, kind: Kind, on_served: Callable[[], None], recheck_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.on_served = on_served
        self.recheck_s = recheck_s
        self.clock = clock
        self._guard = threading.Lock()
        self._served = False
        self._checked_at: float | None = None

    def available(self) -> bool:
        with self._guard:
            if self._served:
                return True
            now = self.clock()
            if self._checked_at is not None and now - self._checked_at < self.recheck_s:
                return False
            self._checked_at = now
            try:
                served = self.kube.serves(self.kind)
            except ApiError as error:
                log.warning("discovery of %s failed: %s", self.kind.resource, error)
                return False
            if not served:
                return False
            self._served = True
        log.info("the API server serves %s: watching them", self.kind.resource)
        self.on_served()
        return True
