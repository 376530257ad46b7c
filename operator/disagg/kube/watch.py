"""List-then-watch of one kind in one namespace (or all), on a thread: the operator's own informer.

kopf's indexes would do this, but kopf runs no handler before every listed object of every indexed kind
went through its own worker, holding each object's whole event meanwhile: a restart over 1,000
services held ~14,000 objects at once (peak RSS ~440-520 MiB against ~220 steady), and with a worker
limit below the objects of one kind it never started at all (kopf#1243). Here a listing arrives in
pages of `PAGE` objects, each handed to the callback and dropped.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from disagg.kube.client import ApiError, Kind, Kube

log = logging.getLogger(__name__)

PAGE = 100
"""Objects per list request: with pages of 500 (seven kinds listing at once at start-up) a restart over
1,000 services peaked at 315 MiB, with 100 at 219 MiB."""
RETRY_MAX_S = 10.0
"""An interrupted watch resumes after 0.5 s, doubling up to this."""
WATCH_TIMEOUT_S = 290
"""The API server ends a watch after this long; the next one starts from the last resourceVersion."""

Listed = Callable[[Kind, str | None, list[dict[str, Any]], bool], None]
"""(kind, namespace or None for all, one page of a listing, whether it was the last): a listing's pages
together are the scope's complete set, replacing the last one's."""
Changed = Callable[[Kind, str, dict[str, Any]], None]
"""(kind, ADDED | MODIFIED | DELETED, object)."""


class Gone(Exception):
    """The resourceVersion to watch from is too old (410): list again."""


class KindWatch:
    """Keeps one kind's objects matching `label_selector` flowing to `listed`/`changed` until stopped:
    a paged list, then watches from its resourceVersion (bookmarks keep that current); a 410 or an
    error that lost the position lists again. Every other error waits (up to 10 s) and resumes."""

    def __init__(self, kube: Kube, kind: Kind, namespace: str | None, label_selector: str,
                 listed: Listed, changed: Changed) -> None:
        self.kube, self.kind, self.namespace = kube, kind, namespace
        self.path = kind.collection(namespace)
        self.label_selector = label_selector
        self.listed, self.changed = listed, changed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"disagg-watch-{kind.plural}-{namespace or 'all'}")
        self._open: Any = None
        """The watch response being read, if any."""

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stops the thread now: a watch waiting for its next event is cut (it would wait up to
        WATCH_TIMEOUT_S), and the connection goes back to the API server."""
        self.stop.set()
        response = self._open
        if response is not None:
            response.shutdown()

    def _run(self) -> None:
        version: str | None = None
        backoff = 0.5
        refused = ""  # the last refusal warned about: one WARNING per refusal, not one every 10 s
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
                backoff = 0.5
                refused = ""
            except Gone:
                version = None
            except Exception as error:  # the API server restarting, a dropped connection: wait, resume
                if self.stop.is_set():
                    return
                scope = self.namespace or "all namespaces"
                if isinstance(error, ApiError) and error.status in (401, 403):
                    # Not transient: a Role without list/watch on a child kind leaves every reconcile in
                    # the scope waiting for its first listing; say which permission is missing.
                    if str(error) != refused:
                        refused = str(error)
                        log.warning("cannot list and watch %s in %s (%s): the operator's RBAC must allow list and "
                                    "watch on them (the chart's role does); reconciles there wait until it can; "
                                    "retrying every %.0fs", self.kind.resource, scope, error, RETRY_MAX_S)
                else:
                    log.info("watch of %s in %s interrupted (%s); resuming in %.1fs", self.kind.plural, scope,
                             error, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)

    def _list(self) -> str:
        token = ""
        while True:
            query = [("labelSelector", self.label_selector), ("limit", str(PAGE))]
            if token:
                query.append(("continue", token))
            try:
                page = self.kube.request("GET", self.path, query=query)
            except ApiError as error:
                if error.status == 410:  # the continue token expired: start over (the pages so far
                    token = ""           # count again; what they had and the rest lacks is dropped)
                    continue
                raise
            items = [self._typed(item) for item in page.get("items", [])]
            token = (page.get("metadata") or {}).get("continue") or ""
            self.listed(self.kind, self.namespace, items, not token)
            if not token:
                return str((page.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> str:
        query = [("labelSelector", self.label_selector), ("watch", "true"), ("resourceVersion", version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(WATCH_TIMEOUT_S))]
        for event in self._events(query):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ApiError(int(obj.get("code") or 0), str(obj.get("message")), "WATCH", self.path)
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self.changed(self.kind, kind, self._typed(obj))
            if self.stop.is_set():
                break
        return version

    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The object with its apiVersion and kind (a list's items come without them)."""
        obj.setdefault("apiVersion", self.kind.api_version)
        obj.setdefault("kind", self.kind.kind)
        return obj

    def _events(self, query: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        response = self.kube.open_stream(self.path, query, read_timeout_s=WATCH_TIMEOUT_S + 30)
        self._open = response
        if self.stop.is_set():  # closed while the watch was being opened
            response.shutdown()
        try:
            pending = b""
            for chunk in response.stream(65536, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            self._open = None
            response.release_conn()
