"""Workers a router still lists that no pod of its service is any more: to be removed through its API.

sglang-router (0.3.2) adds a worker when its pod turns Ready and removes it when a Ready pod gets a deletion
timestamp, but a pod that turns NotReady first (its engine died) and is deleted then is never removed: the
router keeps health-checking the old address, and when another pod gets that address and answers, the
router sends it requests meant for a worker of its service (seen on the local cluster: 8 requests of 170
failed with 404 from another pod at a reused address). The operator lists each router's workers and removes
those whose address has been no pod of the service's pool for two checks in a row (a pod made in between
reaches the router's watch and the operator's at about the same time; twice leaves room for either).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disagg.wellknown import ROLES

CHECKS_BEFORE_REMOVAL = 2
MAX_REMOVALS = 8
"""Workers removed from one router per check at most."""


@dataclass(frozen=True)
class StaleWorker:
    worker_id: str
    url: str
    role: str


def listed_workers(answer: Any) -> list[StaleWorker]:
    """The engine workers of a router's `GET /workers` answer (an unknown shape gives none)."""
    if not isinstance(answer, Mapping) or not isinstance(answer.get("workers"), list):
        return []
    out = []
    for worker in answer["workers"]:
        if not isinstance(worker, Mapping):
            continue
        worker_id, url, role = worker.get("id"), worker.get("url"), worker.get("worker_type")
        if isinstance(worker_id, str) and isinstance(url, str) and role in ROLES:
            out.append(StaleWorker(worker_id, url.rstrip("/"), str(role)))
    return out


class StaleTracker:
    """Per router pod: how many checks in a row each listed worker had no pod behind it."""

    def __init__(self) -> None:
        self._misses: dict[tuple[str, str], int] = {}

    def check(self, router: str, listed: list[StaleWorker], current: Mapping[str, set[str]]) -> list[StaleWorker]:
        """The workers of `router` to remove now; `current` is role -> the URLs of the pool's live pods."""
        stale = [w for w in listed if w.url not in current.get(w.role, set())]
        seen = {(router, w.worker_id) for w in stale}
        for key in [k for k in self._misses if k[0] == router and k not in seen]:
            del self._misses[key]
        due = []
        for worker in stale:
            key = (router, worker.worker_id)
            self._misses[key] = self._misses.get(key, 0) + 1
            if self._misses[key] >= CHECKS_BEFORE_REMOVAL:
                due.append(worker)
        return due[:MAX_REMOVALS]

    def removed(self, router: str, worker: StaleWorker) -> None:
        self._misses.pop((router, worker.worker_id), None)

    def forget(self, routers: set[str]) -> None:
        """Drops what is known of routers that are gone."""
        for key in [k for k in self._misses if k[0] not in routers]:
            del self._misses[key]
