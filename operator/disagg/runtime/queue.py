"""The reconcile work queue: worker threads taking InferenceServices to reconcile, spec changes first,
each service at most once at a time."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("disagg")

Entry = tuple[int, int, tuple[str, str], Mapping[str, Any], str]
"""(priority, order of arrival, (namespace, name), the body to start from, the trigger)."""

class ServiceLocks:
    """One lock per InferenceService: an event, a timer and a child event never reconcile it at once."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def __call__(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())


class ReconcileQueue:
    """Worker threads taking reconciles by priority: a spec change (`SPEC`) before status-only work
    (`STATUS`: child events, resyncs), so a user's edit is applied within moments even while thousands
    of Deployments roll out. A service is never reconciled twice at once and waits in the queue once:
    triggers that arrive while it waits or runs fold into that one entry or into one re-run at their
    best priority (a burst of child events costs two reconciles, not fifty); the reconcile reads the
    newest version of the service from the index when it runs. `spec_workers` more threads take spec
    changes only: with every other worker in a slow status reconcile (an API server busy with a mass
    rollout), an edit would otherwise wait for one of them to finish. Status-only work enters the
    queue `status_delay_s` after its first trigger: a rollout's many Deployment events fold into a
    reconcile or two, and the threads an edit needs are not busy with the same status over and over."""

    SPEC, STATUS = 0, 1

    def __init__(self, workers: int, run: Callable[[Mapping[str, Any], str], None], spec_workers: int = 0,
                 status_delay_s: float = 0.0) -> None:
        self._run = run
        self._status_delay_s = status_delay_s
        self._delayed: list[tuple[float, int, tuple[str, str], Mapping[str, Any], str]] = []
        """Status-only entries (a heap by due time), already counted as waiting in `_queued`."""
        self._due = threading.Condition()
        self._queue: queue.PriorityQueue[Entry] = queue.PriorityQueue()
        self._spec_queue: queue.PriorityQueue[Entry] = queue.PriorityQueue()
        """Spec changes again (also in `_queue`): whichever worker takes an entry first runs it."""
        self._queued: dict[tuple[str, str], int] = {}
        """Services waiting in the queue, at the priority of their entry."""
        self._rerun: dict[tuple[str, str], tuple[int, Mapping[str, Any], str]] = {}
        """Services being reconciled: None, or the trigger to run again when done."""
        self._running: set[tuple[str, str]] = set()
        self._guard = threading.Lock()
        self._order = itertools.count()
        self._stopped = False
        self._spec_workers = spec_workers
        self._threads = [threading.Thread(target=self._work, args=(self._queue,), name=f"disagg-reconcile-{i}",
                                          daemon=True) for i in range(workers)]
        self._threads += [threading.Thread(target=self._work, args=(self._spec_queue,), daemon=True,
                                           name=f"disagg-reconcile-spec-{i}") for i in range(spec_workers)]
        if status_delay_s > 0:
            self._threads.append(threading.Thread(target=self._release_delayed, name="disagg-reconcile-delay",
                                                  daemon=True))

    def start(self) -> ReconcileQueue:
        """Starts the worker threads (entries submitted before wait for them)."""
        for thread in self._threads:
            thread.start()
        return self

    def submit(self, body: Mapping[str, Any], trigger: str, priority: int) -> None:
        meta = body.get("metadata", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._guard:
            if self._stopped:
                return
            if key in self._running:
                pending = self._rerun.get(key)
                if pending is None or priority <= pending[0]:
                    self._rerun[key] = (priority, body, trigger)
                return
            if self._queued.get(key, priority + 1) <= priority:
                return
            self._queued[key] = priority
        entry: Entry = (priority, next(self._order), key, body, trigger)
        if priority == self.STATUS and self._status_delay_s > 0:
            with self._due:
                heapq.heappush(self._delayed, (time.monotonic() + self._status_delay_s, *entry[1:]))
                self._due.notify()
            return
        self._queue.put(entry)
        if priority == self.SPEC and self._spec_workers:
            self._spec_queue.put(entry)

    def waiting(self) -> int:
        return self._queue.qsize() + len(self._delayed)

    def _release_delayed(self) -> None:
        """Moves status-only entries into the queue when due (a spec change that came meanwhile has
        taken their place in `_queued`: the workers then skip them)."""
        while True:
            with self._due:
                while not self._stopped and (not self._delayed or self._delayed[0][0] > time.monotonic()):
                    self._due.wait(self._delayed[0][0] - time.monotonic() if self._delayed else None)
                if self._stopped:
                    return
                _, order, key, body, trigger = heapq.heappop(self._delayed)
            self._queue.put((self.STATUS, order, key, body, trigger))

    def stop(self) -> None:
        with self._guard:
            self._stopped = True
        with self._due:
            self._due.notify()
        for _ in self._threads:
            self._queue.put((-1, next(self._order), ("", ""), {}, "stop"))
            self._spec_queue.put((-1, next(self._order), ("", ""), {}, "stop"))

    def _work(self, source: queue.PriorityQueue[Entry]) -> None:
        while True:
            priority, _, key, body, trigger = source.get()
            if trigger == "stop":
                return
            with self._guard:
                if self._queued.get(key) != priority:
                    continue  # superseded by an entry of a better priority, which ran or runs
                del self._queued[key]
                self._running.add(key)
            try:
                self._run(body, trigger)
            except Exception:  # a worker outlives any one service's failure
                log.exception("reconcile of %s/%s failed", *key)
            finally:
                with self._guard:
                    self._running.discard(key)
                    again = self._rerun.pop(key, None)
            if again is not None:
                self.submit(again[1], again[2], again[0])

