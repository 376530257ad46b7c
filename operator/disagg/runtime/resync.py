"""The periodic resync: every service reconciled again every `interval_s`, the level-triggered safety net.

One thread over the index, not a kopf timer: kopf timers put a finalizer on every object (a write per
object, and deletions that hang while no operator runs) and keep one task per object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

ServiceKey = tuple[str, str]


class Resync:
    """Calls `resync(namespace, name)` for each of `services()` every `interval_s`, while `is_active()`
    (a standby replica of a peering group leaves it to the active one)."""

    def __init__(
        self, interval_s: float, services: Callable[[], Iterable[ServiceKey]],
        resync: Callable[[str, str], None], is_active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.interval_s = interval_s
        self.services = services
        self.resync = resync
        self.is_active = is_active
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disagg-resync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.is_active():
                continue
            for namespace, name in list(self.services()):
                if self._stop.is_set():
                    return
                self.resync(namespace, name)
