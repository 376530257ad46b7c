"""The children's informers: the operator's own list-and-watch threads (`disagg.kube.watch.KindWatch`,
one per child kind and namespace) and the cache they fill, from which reconcile diffs without reading
the API server."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from typing import Any

from disagg.kube.client import CHILD_KINDS, LEADER_WORKER_SET, Kind, Kube
from disagg.kube.discovery import OptionalKind
from disagg.kube.watch import KindWatch
from disagg.reconcile import POOL_KINDS, ChildKey, child_key, pack, unpack
from disagg.wellknown import AUTOSCALER_FIELD_MANAGER, FIELD_MANAGER, MANAGED_SELECTOR, SERVICE_LABEL

PoolEvent = Callable[[str, dict[str, Any]], None]
"""(LISTED | RELISTED | ADDED | MODIFIED | DELETED, the pool's object)."""


def _claims_replicas(entry: Mapping[str, Any]) -> bool:
    return "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})


def slim_child(body: Mapping[str, Any], kind: Kind) -> dict[str, Any]:
    """What reconcile needs of a child, and no more (1,000 services hold ~13,000 of these)."""
    meta = body.get("metadata", {})
    slim_meta = {key: copy.deepcopy(meta[key]) for key in (
        "name", "namespace", "uid", "generation", "resourceVersion", "labels", "annotations",
        "ownerReferences", "deletionTimestamp") if key in meta}
    # only who owns replicas matters (see reconcile_service): the autoscaler's entry, and of the other
    # managers just their claim on spec.replicas; and whether the operator holds fields from a create
    slim_meta["managedFields"] = [
        copy.deepcopy(entry) if entry.get("manager") == AUTOSCALER_FIELD_MANAGER
        else {key: value for key, value in (
            ("manager", entry.get("manager")), ("operation", entry.get("operation")),
            ("fieldsV1", {"f:spec": {"f:replicas": {}}} if _claims_replicas(entry) else None)) if value is not None}
        for entry in meta.get("managedFields", []) or []
        if entry.get("manager") == AUTOSCALER_FIELD_MANAGER or _claims_replicas(entry)
        or (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (FIELD_MANAGER, "Update", None)
    ]
    slim: dict[str, Any] = {"apiVersion": kind.api_version, "kind": kind.kind, "metadata": slim_meta}
    for key in ("spec", "rules", "roleRef", "subjects"):
        if key in body:
            slim[key] = copy.deepcopy(body[key])
    if kind.kind in POOL_KINDS and "status" in body:
        slim["status"] = copy.deepcopy(body["status"])
    return slim


class ChildCache:
    """Every service's children, slim and packed, as the operator's own list-and-watch threads
    (`disagg.kube.watch.KindWatch`, one per kind and namespace) last saw them; reconcile diffs against
    it and reads nothing from the API server. `synced` is set once every scope has been listed."""

    def __init__(self, scopes: int, on_deployment: PoolEvent = lambda event, pool: None) -> None:
        self._guard = threading.Lock()
        self._by_service: dict[tuple[str, str], dict[ChildKey, bytes]] = {}
        self._where: dict[tuple[str, str, str], tuple[tuple[str, str], ChildKey]] = {}
        """(plural, namespace, name) -> (the service's key, the child's key)."""
        self._scopes = scopes
        self._listed_scopes: set[tuple[str, str | None]] = set()
        self._listing: dict[tuple[str, str | None], set[tuple[str, str, str]]] = {}
        """Scopes whose listing is under way: what its pages had so far."""
        self.synced = threading.Event()
        self.on_deployment = on_deployment
        """Called with (LISTED | RELISTED | ADDED | MODIFIED | DELETED, the Deployment) after the cache
        has it."""

    def _drop(self, where: tuple[str, str, str]) -> None:
        found = self._where.pop(where, None)
        if found is not None:
            service, key = found
            children = self._by_service.get(service)
            if children is not None:
                children.pop(key, None)
                if not children:
                    del self._by_service[service]

    def _put(self, kind: Kind, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        where = (kind.plural, meta.get("namespace", ""), meta.get("name", ""))
        self._drop(where)
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if not service:
            return
        owner = (meta.get("namespace", ""), service)
        child = slim_child(obj, kind)
        key = child_key(child)
        # packed: 13,000 children as dicts took ~100 MiB at 1,000 services, packed ~15 MiB
        self._by_service.setdefault(owner, {})[key] = pack(child)
        self._where[where] = (owner, key)

    def listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        """One page of a scope's listing (kept page by page: a listing of thousands is never held
        whole); after the last, what the listing did not have is gone."""
        scope = (kind.plural, namespace)
        with self._guard:
            seen = self._listing.setdefault(scope, set())
            for obj in items:
                meta = obj.get("metadata", {})
                seen.add((kind.plural, meta.get("namespace", ""), meta.get("name", "")))
                self._put(kind, obj)
            first = scope not in self._listed_scopes
            if last:
                del self._listing[scope]
                stale = [w for w in self._where
                         if w[0] == kind.plural and (namespace is None or w[1] == namespace) and w not in seen]
                for where in stale:
                    self._drop(where)
                self._listed_scopes.add(scope)
                if len(self._listed_scopes) >= self._scopes:
                    self.synced.set()
        if kind.kind in POOL_KINDS:
            for obj in items:
                self.on_deployment("LISTED" if first else "RELISTED", obj)

    def changed(self, kind: Kind, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata", {})
        with self._guard:
            if event == "DELETED":
                self._drop((kind.plural, meta.get("namespace", ""), meta.get("name", "")))
            else:
                self._put(kind, obj)
        if kind.kind in POOL_KINDS:
            self.on_deployment(event, obj)

    def expect(self, scopes: int) -> None:
        """Count more scopes before `synced` (kinds found at start-up)."""
        with self._guard:
            self._scopes += scopes

    def has_listed(self, kind: Kind, scopes: list[str | None]) -> bool:
        """Whether every scope of `kind` has been listed once (its objects are all in the cache)."""
        with self._guard:
            return all((kind.plural, scope) in self._listed_scopes for scope in scopes)

    def children(self, namespace: str, service: str) -> dict[ChildKey, dict[str, Any]]:
        with self._guard:
            packed = list((self._by_service.get((namespace, service)) or {}).items())
        return {key: unpack(value) for key, value in packed}


class ChildInformers:
    """Keeps `cache` current: a `KindWatch` per child kind and scope (a namespace, or None for all), and
    the LeaderWorkerSets' once the cluster serves them and the operator may manage them."""

    def __init__(self, kube: Kube, scopes: list[str | None], cache: ChildCache) -> None:
        self.kube = kube
        self.scopes = scopes
        self.cache = cache
        self.watches: list[KindWatch] = []
        self.lws = OptionalKind(kube, LEADER_WORKER_SET, scopes, lambda: self._watch(LEADER_WORKER_SET))

    def start(self) -> None:
        # found now, the first reconciles wait for the LeaderWorkerSets' listing too
        self.cache.expect(len(self.scopes))
        if not self.lws.available():
            self.cache.expect(-len(self.scopes))  # not watched (yet): the first reconciles do not wait for it
        for kind in CHILD_KINDS:
            self._watch(kind)

    def stop(self) -> None:
        for watch in self.watches:
            watch.close()

    def lws_available(self) -> bool:
        """Whether multi-node pools can be made (asked of the API server at most every 30 s until so)."""
        return self.lws.available()

    def lws_reason(self) -> str:
        """Why they cannot, and what would fix it."""
        return self.lws.reason

    def lws_listed(self) -> bool:
        """Whether the cache holds every LeaderWorkerSet (their watches have listed once)."""
        return self.cache.has_listed(LEADER_WORKER_SET, self.scopes)

    def _watch(self, kind: Kind) -> None:
        for namespace in self.scopes:
            watch = KindWatch(self.kube, kind, namespace, MANAGED_SELECTOR, self.cache.listed, self.cache.changed)
            watch.start()
            self.watches.append(watch)
