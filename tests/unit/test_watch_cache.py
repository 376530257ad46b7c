"""What the operator keeps of the children it watches (kopf indexes) and what it lets go of."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kopf
import yaml

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.handlers import shed_watched_body, slim_child
from disagg.kube.client import kind_of
from disagg.reconcile import pack, unpack
from disagg.reconcile.autoscale import pool_counts
from disagg.render import render_service

EXAMPLE = Path(__file__).parents[2] / "examples" / "01-vllm-nixl-llama70b.yaml"


def live_children() -> list[dict[str, Any]]:
    """The example's children as the API server returns them: with managedFields and a status."""
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    children = render_service(body, DEFAULT_CATALOG)
    for child in children:
        child["metadata"].update(uid=f"uid-{child['kind']}-{child['metadata']['name']}", resourceVersion="7")
        child["metadata"]["managedFields"] = [{"manager": "disagg", "operation": "Apply",
                                               "fieldsV1": {"f:spec": {"f:template": {}}}}] * 3
        if child["kind"] == "Deployment":
            child["status"] = {"replicas": 2, "readyReplicas": 1, "observedGeneration": 1}
    return children


def test_a_watched_child_gives_up_its_bulk_once_indexed_and_keeps_what_is_read_later() -> None:
    for child in live_children():
        kind = kind_of(child)
        raw = copy.deepcopy(child)
        body = kopf.Body(raw)
        indexed = pack(slim_child(body, kind))
        counts = pool_counts(body)
        size = len(json.dumps(raw))

        shed_watched_body(body, kind)

        assert unpack(indexed) == slim_child(kopf.Body(copy.deepcopy(child)), kind)  # the index is unchanged
        assert "managedFields" not in raw["metadata"]
        assert {k: raw["metadata"][k] for k in ("name", "namespace", "uid", "labels", "resourceVersion")} == {
            k: child["metadata"][k] for k in ("name", "namespace", "uid", "labels", "resourceVersion")}
        if kind.kind == "Deployment":
            assert pool_counts(kopf.Body(raw)) == counts  # what the Deployment handler reads afterwards
            assert "template" not in raw["spec"] and len(json.dumps(raw)) < size / 4
        else:
            assert set(raw) == {"apiVersion", "kind", "metadata"}
