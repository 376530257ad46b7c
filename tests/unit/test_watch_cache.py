"""The operator's own cache of its children (ChildCache), as its list-and-watch threads feed it."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.kube.client import CHILD_KINDS, KINDS_BY_NAME, kind_of
from disagg.reconcile import child_key
from disagg.render import render_service
from disagg.runtime.informers import ChildCache
from support.paths import REPO

EXAMPLE = REPO / "examples" / "01-vllm-nixl-llama70b.yaml"
DEPLOYMENT = KINDS_BY_NAME[("apps/v1", "Deployment")]


def live_children(name: str = "svc", namespace: str = "ns") -> list[dict[str, Any]]:
    """A service's children as the API server returns them: with managedFields and a status."""
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(name=name, namespace=namespace, uid=f"uid-{name}", generation=1)
    children = render_service(body, DEFAULT_CATALOG)
    for child in children:
        child["metadata"].update(uid=f"uid-{child['kind']}-{child['metadata']['name']}", resourceVersion="7")
        child["metadata"]["managedFields"] = [{"manager": "disagg", "operation": "Apply",
                                               "fieldsV1": {"f:spec": {"f:template": {}}}}]
        if child["kind"] == "Deployment":
            child["status"] = {"replicas": 2, "readyReplicas": 1}
    return children


def feed(cache: ChildCache, children: list[dict[str, Any]], namespace: str | None = "ns") -> None:
    """A listing of every kind, one object per page."""
    for kind in CHILD_KINDS:
        items = [c for c in children if kind_of(c) == kind]
        for i, item in enumerate(items):
            cache.listed(kind, namespace, [item], i == len(items) - 1)
        if not items:
            cache.listed(kind, namespace, [], True)


def test_reconcile_waits_until_every_scope_is_listed_then_sees_each_child_once() -> None:
    seen: list[tuple[str, str]] = []
    cache = ChildCache(len(CHILD_KINDS), lambda event, body: seen.append((event, body["metadata"]["name"])))
    children = live_children()
    for kind in CHILD_KINDS[:-1]:
        cache.listed(kind, "ns", [c for c in children if kind_of(c) == kind], True)
    last = [c for c in children if kind_of(c) == CHILD_KINDS[-1]]
    cache.listed(CHILD_KINDS[-1], "ns", last[:1], False)
    assert not cache.synced.is_set()  # one kind still listing: a reconcile now would re-apply the rest
    cache.listed(CHILD_KINDS[-1], "ns", last[1:], True)
    assert cache.synced.is_set()
    got = cache.children("ns", "svc")
    assert set(got) == {child_key(c) for c in children}
    deployment = next(v for k, v in got.items() if k[1] == "Deployment")
    assert deployment["status"]["readyReplicas"] == 1 and "template" in deployment["spec"]
    assert all(len(v["metadata"]["managedFields"]) <= 1 for v in got.values())
    assert sorted(e for e, _ in seen) == ["LISTED"] * 3  # three pools, no status reconcile triggered


def test_watch_events_update_and_delete_and_a_relist_drops_what_went_missing() -> None:
    seen: list[str] = []
    cache = ChildCache(len(CHILD_KINDS), lambda event, body: seen.append(event))
    children = live_children() + live_children("other")
    feed(cache, children)
    router = next(c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == "svc-router")
    changed = copy.deepcopy(router)
    changed["spec"]["replicas"] = 3
    cache.changed(DEPLOYMENT, "MODIFIED", changed)
    assert cache.children("ns", "svc")[child_key(router)]["spec"]["replicas"] == 3
    assert seen[-1] == "MODIFIED"
    cache.changed(DEPLOYMENT, "DELETED", changed)
    assert child_key(router) not in cache.children("ns", "svc")
    # a relist (after a 410) without the other service's children: they are gone, this one's stay
    feed(cache, [c for c in children if c["metadata"]["labels"].get("disagg.dev/service") != "other"])
    assert cache.children("ns", "other") == {}
    assert child_key(router) in cache.children("ns", "svc")  # it was listed again
    assert "RELISTED" in seen


def test_scopes_are_namespaces_a_relist_of_one_leaves_the_others() -> None:
    cache = ChildCache(2 * len(CHILD_KINDS), lambda event, body: None)
    feed(cache, live_children(namespace="a"), "a")
    assert not cache.synced.is_set()
    feed(cache, live_children(namespace="b"), "b")
    assert cache.synced.is_set()
    feed(cache, [], "a")
    assert cache.children("a", "svc") == {} and cache.children("b", "svc")
