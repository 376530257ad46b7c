"""Which workers leave on a scale-down: the one choice the operator makes and the simulator models.

Workers that are not ready yet go first (the newest first: they have loaded least), then the least busy: the
fewest requests in flight, then the least KV cache held; a busy worker leaves last, so the drain of a
scale-down is short and cuts nothing. The operator makes the ReplicaSet controller take exactly this choice
with the `controller.kubernetes.io/pod-deletion-cost` annotation (the controller deletes not-ready pods first,
then the lowest cost, `deletion_costs`); the simulator drains the same replicas (`choose_victims`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"


@dataclass(frozen=True)
class WorkerLoad:
    """One worker of a pool as the choice sees it."""

    name: str
    ready: bool
    in_flight: float = math.inf
    """Requests running and waiting on it (inf: not known, as busy as can be)."""
    kv_usage: float = 0.0
    """Share of its KV cache in use, 0 to 1."""
    started: float = 0.0
    """When it was created (seconds, any clock): among workers not ready, the newest leaves first."""


def victim_order(workers: Sequence[WorkerLoad]) -> list[WorkerLoad]:
    """Every worker, the first to leave first."""
    return sorted(workers, key=lambda w: (w.ready, -w.started if not w.ready else 0.0, w.in_flight, w.kv_usage,
                                          -w.started, w.name))


def choose_victims(workers: Sequence[WorkerLoad], count: int) -> list[str]:
    """The names of the `count` workers that leave."""
    return [w.name for w in victim_order(workers)[:max(0, count)]]


def deletion_costs(workers: Sequence[WorkerLoad]) -> dict[str, int]:
    """A pod-deletion-cost per worker: its place in `victim_order` (the controller deletes the lowest first)."""
    return {w.name: rank for rank, w in enumerate(victim_order(workers))}
