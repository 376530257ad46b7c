"""Workers a router still lists that no pod of its service is any more: to be removed through its API.

sglang-router (0.3.2) adds a worker when its pod turns Ready and removes it when a Ready pod gets a deletion
timestamp, but a pod that turns NotReady first (its engine died) and is deleted then is never removed: the
router keeps health-checking the old address, and when another pod gets that address and answers, the
router sends it requests meant for a worker of its service (seen on the local cluster: 8 requests of 170
failed with 404 from another pod at a reused address). The operator lists each router's workers and removes
those whose address has been no pod of the service's pool for two checks in a row (a pod made in between
reaches the router's watch and the operator's at about the same time; twice leaves room for either).

A worker whose pod is leaving (it has a deletion timestamp: scale-down, rollout, node drain, eviction) is
removed at the next check, from every router that lists another healthy worker of its role: vllm-router
(0.1.17) handles its pod events one at a time and was seen to drop a leaving prefill 21 s after its deletion,
after the engine's drain had ended, and 6 requests of 159 it still sent there failed. Removing the last one
instead fails every request until the router adds a replacement (49 of 159 in the same drain).

The two routers' APIs: `GET /workers` lists `{"workers": [{url, worker_type, is_healthy, ...}]}`; sglang-router
names each worker with an `id` and removes it with `DELETE /workers/<id>`, vllm-router has no id and removes
it with `DELETE /workers/<url, percent-encoded>`.
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
    """A worker as a router lists it."""

    worker_id: str
    """What the router's `DELETE /workers/<...>` takes: sglang-router's id, or vllm-router's URL."""
    url: str
    role: str
    healthy: bool = True


def listed_workers(answer: Any) -> list[StaleWorker]:
    """The engine workers of a router's `GET /workers` answer (an unknown shape gives none)."""
    if not isinstance(answer, Mapping) or not isinstance(answer.get("workers"), list):
        return []
    out = []
    for worker in answer["workers"]:
        if not isinstance(worker, Mapping):
            continue
        url, role = worker.get("url"), worker.get("worker_type")
        worker_id = worker.get("id", url)
        if isinstance(worker_id, str) and isinstance(url, str) and role in ROLES:
            out.append(StaleWorker(worker_id, url.rstrip("/"), str(role), worker.get("is_healthy") is not False))
    return out


class StaleTracker:
    """Per router pod: how many checks in a row each listed worker had no pod behind it."""

    def __init__(self) -> None:
        self._misses: dict[tuple[str, str], int] = {}

    def check(self, router: str, listed: list[StaleWorker], current: Mapping[str, set[str]],
              leaving: Mapping[str, set[str]], count: bool = True) -> list[StaleWorker]:
        """The workers of `router` to remove now: `current` is role -> the URLs of the pool's live pods,
        `leaving` those of its pods being deleted (removed at once). With `count` false (a check between the
        regular ones) only leaving workers are due and no miss is counted. A leaving worker stays while it is the
        router's last healthy one of its role: it still answers while it drains, and a router may add a
        replacement late (vllm-router waits for a new worker's health check before it handles the next pod)."""
        stale = [w for w in listed if w.url not in current.get(w.role, set()) | leaving.get(w.role, set())]
        going = [w for w in listed if w.url in leaving.get(w.role, set())]
        staying = {w.role for w in listed if w.healthy and w.url in current.get(w.role, set())}
        due = [w for w in going if w.role in staying]
        if count:
            seen = {(router, w.worker_id) for w in stale}
            for key in [k for k in self._misses if k[0] == router and k not in seen]:
                del self._misses[key]
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
