"""The committed CRD (and the chart's copy) is exactly what the models generate."""

from __future__ import annotations

import yaml

from disagg.api.crd import build_crd, crd_yaml
from support.paths import REPO

ROOT = REPO
CRD_FILE = ROOT / "crds" / "disagg.dev_inferenceservices.yaml"


def test_committed_crd_is_current() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `make crd`"


def test_chart_crd_copy_is_current() -> None:
    chart_copy = ROOT / "charts" / "disagg-operator" / "crds" / CRD_FILE.name
    if chart_copy.exists():
        assert chart_copy.read_text() == CRD_FILE.read_text(), "the chart's CRD differs from crds/"


def test_crd_shape_for_kubectl() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:3] == ["Prefill", "Decode", "Ready"] and "Endpoint" in columns and columns[-1] == "Age"
    assert "isvc" not in crd["spec"]["names"]["shortNames"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model", "prefill", "decode"]
    rules = yaml.safe_dump(spec)
    assert "self.minReplicas <= self.maxReplicas" in rules
    assert "mooncake" in rules  # the cross-pool TP rule lives on spec


def test_schema_is_structural() -> None:
    """Kubernetes rejects non-structural schemas: no $ref, no anyOf with null, every object typed."""

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            assert "$ref" not in node and "$defs" not in node, path
            if "anyOf" in node:
                assert all(v.get("type") != "null" for v in node["anyOf"]), path
            if "properties" in node:
                assert node.get("type") == "object", path
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]")

    walk(build_crd()["spec"]["versions"][0]["schema"], "schema")


def test_every_field_is_documented() -> None:
    def walk(node: dict[str, object], path: str) -> None:
        for name, child in (node.get("properties") or {}).items():  # type: ignore[attr-defined]
            assert isinstance(child, dict)
            assert child.get("description"), f"{path}.{name} has no description"
            walk(child, f"{path}.{name}")
            items = child.get("items")
            if isinstance(items, dict):
                walk(items, f"{path}.{name}[]")

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    walk(schema["spec"], "spec")
    walk(schema["status"], "status")
