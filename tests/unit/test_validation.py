"""Bad input gets a clear error naming the field: the schema's checks and the catalogue's."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from support.paths import REPO


def base() -> dict[str, Any]:
    return {
        "apiVersion": "disagg.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "svc", "namespace": "ns"},
        "spec": {
            "model": {"name": "m", "uri": "hf://org/m"},
            "prefill": {"accelerator": {"type": "nvidia-h100", "count": 1}},
            "decode": {"accelerator": {"type": "nvidia-h200", "count": 1}},
        },
    }


def with_change(path: str, value: Any) -> dict[str, Any]:
    body = base()
    node: Any = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return body


DELETE = object()

# (what a user got wrong, change, the field the message must name, a word the message must contain)
BAD_INPUT = [
    (
        "unknown accelerator type",
        "spec.decode.accelerator.type",
        "nvidia-h999",
        "spec.decode.accelerator.type",
        "known",
    ),
    (
        "min > max",
        "spec.prefill.autoscaling",
        {"minReplicas": 5, "maxReplicas": 2},
        "spec.prefill.autoscaling",
        "minReplicas",
    ),
    ("TP larger than accelerators", "spec.prefill.parallelism", {"tensor": 4}, "spec.prefill", "tensor"),
    ("missing model", "spec.model", DELETE, "spec.model", "required"),
    ("bad port", "spec.engine", {"port": 80}, "spec.engine.port", "1024"),
    ("port too big", "spec.kvTransfer", {"port": 70000}, "spec.kvTransfer.port", "65535"),
    ("negative replicas", "spec.decode.replicas", -1, "spec.decode.replicas", "0"),
    ("unknown engine", "spec.engine", {"kind": "tgi"}, "spec.engine.kind", "vllm"),
    ("unknown field", "spec.prefill.gpus", 4, "spec.prefill.gpus", "unknown field"),
    ("bad model uri", "spec.model.uri", "ftp://x/y", "spec.model.uri", "pattern"),
    (
        "both type and resourceName",
        "spec.prefill.accelerator",
        {"type": "nvidia-h100", "resourceName": "nvidia.com/gpu", "nodeSelector": {"a": "b"}},
        "spec.prefill.accelerator",
        "exactly one",
    ),
    (
        "resourceName without nodes",
        "spec.prefill.accelerator",
        {"resourceName": "nvidia.com/gpu"},
        "spec.prefill.accelerator",
        "nodeSelector",
    ),
    (
        "count over a node",
        "spec.decode.accelerator",
        {"type": "nvidia-h200", "count": 16},
        "spec.decode.accelerator.count",
        "8",
    ),
    ("sglang on trainium", "spec.engine", {"kind": "sglang"}, "spec.prefill.accelerator.type", "does not run"),
    (
        "TP not a power of two",
        "spec.prefill",
        {"accelerator": {"type": "nvidia-h100", "count": 3}, "parallelism": {"tensor": 3}},
        "spec.prefill.parallelism.tensor",
        "power of two",
    ),
    (
        "operator-owned flag",
        "spec.engine",
        {"extraArgs": ["--tensor-parallel-size=4"]},
        "spec.engine.extraArgs[0]",
        "set by the operator",
    ),
    (
        "bad quantity",
        "spec.decode.resources",
        {"requests": {"memory": "lots"}},
        "spec.decode.resources.requests.memory",
        "pattern",
    ),
    ("percentile out of range", "spec.slo", {"percentile": 100}, "spec.slo.percentile", "99.9"),
    (
        "disk tier without cpu tier",
        "spec.kvCache",
        {"disk": {"size": "100Gi"}},
        "spec.kvCache.cpuOffloadGiB",
        "CPU tier",
    ),
    (
        "budget below the floor",
        "spec.acceleratorBudget",
        1,
        "spec.prefill.autoscaling.minReplicas",
        "acceleratorBudget",
    ),
    ("name too long for children", "metadata.name", "x" * 60, "metadata.name", "DNS-1035"),
]


@pytest.mark.parametrize(("what", "path", "value", "field", "word"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_names_the_field(what: str, path: str, value: Any, field: str, word: str) -> None:
    body = with_change(path, value)
    if what == "sglang on trainium":
        body["spec"]["prefill"]["accelerator"] = {"type": "aws-trainium2", "count": 1}
    if what == "budget below the floor":
        body["spec"]["prefill"]["autoscaling"] = {"minReplicas": 2, "maxReplicas": 4}
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    messages = [str(e) for e in caught.value.errors]
    assert any(m.startswith(field) and word in m for m in messages), messages


def test_cel_rules_mirror_pydantic_for_cross_field_checks() -> None:
    """The rules the API server enforces (CEL) are also enforced offline, so `disagg validate` agrees."""
    mooncake = base()
    mooncake["spec"]["kvTransfer"] = {"connector": "mooncake"}
    mooncake["spec"]["prefill"] = {"accelerator": {"type": "nvidia-h100", "count": 2}, "parallelism": {"tensor": 2}}
    with pytest.raises(InvalidSpec, match="equal"):
        validate_service(mooncake, DEFAULT_CATALOG)


def test_mooncake_across_vendors_is_refused() -> None:
    body = base()
    body["spec"]["kvTransfer"] = {"connector": "mooncake"}
    body["spec"]["prefill"]["accelerator"] = {"type": "amd-mi300x", "count": 1}
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert "spec.kvTransfer.connector" in str(caught.value) and "nixl" in str(caught.value)


def test_every_error_is_reported_at_once() -> None:
    body = base()
    body["spec"]["prefill"]["accelerator"]["type"] = "nope-1"
    body["spec"]["decode"]["accelerator"]["type"] = "nope-2"
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert {e.field for e in caught.value.errors} == {"spec.prefill.accelerator.type", "spec.decode.accelerator.type"}


def test_examples_are_valid() -> None:

    for path in sorted(REPO.joinpath("examples").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        validate_service(copy.deepcopy(body), DEFAULT_CATALOG)


def test_catalogue_override_adds_a_type_and_changes_a_price(tmp_path: Any) -> None:
    from disagg.catalog.accelerators import load_catalog

    override = tmp_path / "catalog.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "accelerators": {
                    "nvidia-h100": {"price": {"usdPerHour": 1.25}},
                    "acme-x1": {
                        "vendor": "nvidia",
                        "resourceName": "acme.com/x1",
                        "nodeLabels": {"acme.com/chip": "x1"},
                        "specs": {"bf16Flops": 1e15, "memoryBytes": 1e11, "memoryBandwidth": 5e12},
                    },
                }
            }
        )
    )
    catalog = load_catalog(override)
    assert catalog["nvidia-h100"].usd_per_hour == 1.25
    assert catalog["nvidia-h100"].specs.memory_bandwidth == 3.35e12  # untouched fields keep the built-in value
    body = base()
    body["spec"]["decode"]["accelerator"]["type"] = "acme-x1"
    validate_service(body, catalog)
    with pytest.raises(InvalidSpec):
        validate_service(body, DEFAULT_CATALOG)


@pytest.mark.parametrize("quantity", ["100m", "0.5", "16", "128Gi", "1e3", "500M", "1.5Gi", ".5"])
def test_kubernetes_quantities_are_accepted(quantity: str) -> None:
    body = base()
    body["spec"]["decode"]["resources"] = {"requests": {"cpu": quantity, "memory": quantity}}
    validate_service(body, DEFAULT_CATALOG)


def test_disk_tier_sizes_in_any_unit() -> None:
    from disagg.render.context import _gib

    assert [_gib(q) for q in ("500Gi", "2Ti", "1000G", "1e12", "1Gi", "1.5Gi")] == [500, 2048, 931, 931, 1, 1]


@pytest.mark.parametrize("size", ["1e400", "1e19", "8Ei", "10Mi", "0", "1e9223372036854775808", "1e-400"])
def test_disk_sizes_out_of_range_are_refused_naming_the_field(size: str) -> None:
    body = base()
    body["spec"]["kvCache"] = {"cpuOffloadGiB": 4, "disk": {"size": size}}
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert [e.field for e in caught.value.errors] == ["spec.kvCache.disk.size"], caught.value
    assert size in str(caught.value) and "1Gi" in str(caught.value)
