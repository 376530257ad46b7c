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

A router can also keep out a worker that is healthy again. sglang-router (0.3.2) opens a worker's circuit
breaker after request failures, on the failing decode and on the healthy prefill paired with it, and after the
decode recovered both stayed open (no request for 100+ s, `smg_worker_cb_state` 1) while `/workers` listed them
healthy. When a router keeps out a worker whose pod is Ready (not listed, listed unhealthy, or its circuit not
closed per the router's `/metrics`) for two checks in a row and the worker answers its own `/health`, the
operator removes it and adds it again (`POST /workers {url, worker_type, bootstrap_port}`), which resets the
router's health and circuit state; with a back-off per worker. vllm-router (0.1.17) in PD mode has no add API
(`POST /workers` and `/add_worker` answer 400 "PD router requires specific add_prefill_server or
add_decode_server methods"), so a worker removed there would stay out: it is left alone (in PD mode it opens no
circuit and marks a worker healthy again within seconds of its health checks passing).
"""

from __future__ import annotations

import re
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
    bootstrap_port: int | None = None


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
        port = worker.get("bootstrap_port")
        if isinstance(worker_id, str) and isinstance(url, str) and role in ROLES:
            out.append(StaleWorker(worker_id, url.rstrip("/"), str(role), worker.get("is_healthy") is not False,
                                   port if isinstance(port, int) and not isinstance(port, bool) else None))
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


READD_CHECKS = 2
"""Regular checks in a row a router must keep a Ready worker out before it is put back."""
MAX_READDS = 2
"""Workers put back into one router per check at most."""
READD_BACKOFF_S = 30.0
READD_BACKOFF_MAX_S = 300.0
"""A worker put back into a router is not put back into it again within the back-off, which doubles with every
time it is (a worker that keeps failing is not re-added every check); after the longest back-off spent in the
rotation it starts again from the shortest."""
READD_ROUTERS = frozenset({"sglang-router"})
"""Routers whose API adds a worker (`POST /workers`) in PD mode."""
_CB_STATE = re.compile(r'^smg_worker_cb_state\{[^}]*worker="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)\s*$', re.MULTILINE)


def open_circuits(metrics: str) -> set[str]:
    """The worker URLs whose circuit breaker sglang-router's `/metrics` shows not closed (0 closed, 1 open,
    2 half-open: a half-open circuit lets a few requests through, but one stuck there keeps the worker out)."""
    return {url.rstrip("/") for url, value in _CB_STATE.findall(metrics) if float(value) != 0}


@dataclass(frozen=True)
class KeptOut:
    """A Ready worker a router keeps out of its rotation."""

    url: str
    role: str
    listed: StaleWorker | None
    """As the router lists it (removed first), or None when it does not list it."""
    bootstrap_port: int | None
    why: str


def kept_out(listed: list[StaleWorker], ready: Mapping[str, Mapping[str, int | None]],
             circuits: set[str]) -> list[KeptOut]:
    """The Ready workers (`ready`: role -> the URL of each Ready pod of the pool that is not being deleted -> its
    bootstrap port annotation) the router does not list, lists unhealthy, or whose circuit is not closed."""
    by_url = {(w.role, w.url): w for w in listed}
    ports = [w.bootstrap_port for w in listed if w.role == "prefill" and w.bootstrap_port is not None]
    out = []
    for role in ROLES:
        for url, annotated in sorted(ready.get(role, {}).items()):
            worker = by_url.get((role, url))
            port = worker.bootstrap_port if worker is not None and worker.bootstrap_port is not None else (
                annotated if annotated is not None else ports[0] if ports and role == "prefill" else None)
            if worker is None:
                out.append(KeptOut(url, role, None, port, "not listed"))
            elif not worker.healthy:
                out.append(KeptOut(url, role, worker, port, "listed unhealthy"))
            elif url in circuits:
                out.append(KeptOut(url, role, worker, port, "its circuit breaker open"))
    return out


class KeptOutTracker:
    """Per router pod: how many regular checks in a row it kept each Ready worker out, and when each was last put
    back (the back-off)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._readded: dict[tuple[str, str], tuple[float, int]] = {}
        """(router, url) -> when it was last put back and how many times in a row."""

    def check(self, router: str, out: list[KeptOut], now: float) -> list[KeptOut]:
        """The workers to put back into `router` now (if they answer their own health check): kept out for
        `READD_CHECKS` checks in a row and not put back within their back-off; `MAX_READDS` at most."""
        seen = {(router, w.url) for w in out}
        for key in [k for k in self._counts if k[0] == router and k not in seen]:
            del self._counts[key]
        for key in [k for k, (at, _) in self._readded.items()
                    if k[0] == router and k not in seen and now - at >= READD_BACKOFF_MAX_S]:
            del self._readded[key]
        due = []
        for worker in out:
            key = (router, worker.url)
            self._counts[key] = self._counts.get(key, 0) + 1
            if self._counts[key] >= READD_CHECKS and now >= self.next_allowed(router, worker.url):
                due.append(worker)
        return due[:MAX_READDS]

    def next_allowed(self, router: str, url: str) -> float:
        at, times = self._readded.get((router, url), (0.0, 0))
        if not times:
            return 0.0
        return at + min(READD_BACKOFF_S * 2.0 ** (times - 1), READD_BACKOFF_MAX_S)

    def readded(self, router: str, url: str, now: float) -> None:
        _, times = self._readded.get((router, url), (0.0, 0))
        self._readded[(router, url)] = (now, times + 1)
        self._counts.pop((router, url), None)

    def forget(self, routers: set[str]) -> None:
        for table in (self._counts, self._readded):
            for key in [k for k in table if k[0] not in routers]:
                del table[key]
