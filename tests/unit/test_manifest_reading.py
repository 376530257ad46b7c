"""Manifests are read as kubectl and the API server read them (issue 18, items 6 and 8): YAML scalars
as go-yaml v2 resolves them, numbers as JSON carries them, keys set twice refused, aliases bounded
as go-yaml bounds them, and the document's metadata and nulls as the API server treats them. Each
expectation is what the API server did with the same text (tests/e2e/test_validate_agrees.py sends
such manifests to the real one)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from disagg.api.manifest import check_document, prune_nulls
from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.yamlio import read_documents


def read(text: str) -> Any:
    (document,) = read_documents(io.BytesIO(text.encode()))
    assert document.error is None, document.error
    return document.value


def refused(text: str) -> str:
    (document,) = read_documents(io.BytesIO(text.encode()))
    assert document.error is not None, document.value
    return document.error


SCALARS = [
    ("3", 3), ("3.0", 3), ("1e2", 100), ("2.5", 2.5), ("0x10", 16), ("08", 8), ("0o7", 7), ("010", 8), ("1_000", 1000),
    ("-0.0", 0), ("+5", 5), ("9223372036854775807", 2**63 - 1), ("9223372036854775808", 9223372036854775808.0),
    ("1e400", "1e400"), ("1e-400", 0), ("70.6e9", 70600000000), ("70.6e+9", 70600000000), ("1.5e20", 1.5e20),
    (".5", 0.5), (".", "."),
    ("yes", True), ("On", True), ("n", False), ("OFF", False), ("~", None), ("Null", None), ("y2k", "y2k"),
    ("2024-01-01", "2024-01-01"), ("12:30", "12:30"), ("0e9e39f2", "0e9e39f2"), ("'3'", "3"), ('"yes"', "yes"),
    ("!!str 3", "3"), ("!!float 1", 1), ("!!int '12'", 12), ("!!binary aGVsbG8=", "hello"), ("!custom 5", "5"),
    ("--x", "--x"),
]


@pytest.mark.parametrize(("scalar", "value"), SCALARS, ids=[s for s, _ in SCALARS])
def test_scalars_resolve_as_the_api_server_reads_them(scalar: str, value: Any) -> None:
    got = read(f"v: {scalar}\n")["v"]
    assert got == value and type(got) is type(value), (got, value)


@pytest.mark.parametrize(("text", "message"), [
    ("v: .inf\n", "not a JSON number"),
    ("v: !!int abc\n", "cannot decode 'abc' as a !!int"),
    ("a: 1\na: 2\n", "line 2: key 'a' already set in map"),
    ("m: {1: a, '1': b}\n", "key '1' already set"),
    ("x: &x {a: 1}\ny: {<<: *x, a: 2}\n", "key 'a' already set"),
    ("~: a\n", "unsupported map key"),
    ("18446744073709551615: a\n", "unsupported map key"),
    ("x: &a [*a]\n", "an anchor's value contains itself"),
    ("x: *nowhere\n", "found undefined alias"),
    ("x: <<\ny: {<<: [a]}\n", "map merge requires a map"),
    ("[a]: 1\n", "a map key must be a scalar"),
])
def test_what_the_api_server_cannot_read_is_refused_with_the_line(text: str, message: str) -> None:
    assert message in refused(text)


def test_keys_become_strings_as_in_json() -> None:
    assert read("m: {1: a, yes: b, 1.5: c, 1e6: d, 1234567.0: e}\n")["m"] == {
        "1": "a", "true": "b", "1.5": "c", "1e+06": "d", "1.234567e+06": "e"}


def test_merges_and_a_few_aliases_are_read() -> None:
    value = read("base: &b {a: 1, b: 2}\nmerged: {<<: *b, c: 3}\nlist: [*b, *b]\n")
    assert value["merged"] == {"a": 1, "b": 2, "c": 3} and value["list"] == [{"a": 1, "b": 2}] * 2


def test_aliases_are_bounded_as_go_yaml_bounds_them() -> None:
    # within go-yaml's limit (aliases under 99 % of 1,000 values and more): read
    levels = "a: &a [" + ", ".join(["x"] * 9) + "]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(2))
    assert len(read(levels)["c"]) == 9
    # the billion laughs: refused after a thousand values, not after a billion
    bomb = levels + "".join(f"{chr(100 + i)}: &{chr(100 + i)} [{', '.join([f'*{chr(99 + i)}'] * 9)}]\n"
                            for i in range(6))
    assert "expands aliases excessively" in refused(bomb)


def test_documents_are_split_as_kubectl_splits_them() -> None:
    text = "---\n# only a comment\n---\na: 1\n---  # a comment after the separator\nb: 2\n...\n---\n"
    documents = list(read_documents(io.BytesIO(text.encode())))
    assert [(d.number, d.line, d.value) for d in documents] == [(1, 4, {"a": 1}), (2, 6, {"b": 2})]
    (bad, after) = read_documents(io.BytesIO(b"--- a\nb: 1\n"))
    assert bad.error is not None and "invalid document separator" in bad.error and after.value == {"b": 1}


def body(**metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"model": {"name": "m", "uri": "hf://org/m"}, "prefill": {"accelerator": {"type": "nvidia-h100"}},
                     "decode": {"accelerator": {"type": "nvidia-h200"}}}}


@pytest.mark.parametrize(("metadata", "field"), [
    ({}, "metadata.name"),
    ({"name": "Svc"}, "metadata.name"),
    ({"name": "a" * 254}, "metadata.name"),
    ({"name": 5}, "metadata.name"),
    ({"name": "s", "namespace": "Bad_NS"}, "metadata.namespace"),
    ({"name": "s", "labels": {"a b": "c"}}, "metadata.labels"),
    ({"name": "s", "labels": {"a": "x" * 64}}, "metadata.labels[a]"),
    ({"name": "s", "labels": {"a": 1}}, "metadata.labels[a]"),
    ({"name": "s", "annotations": {"a b": "c"}}, "metadata.annotations"),
    ({"name": "s", "annotations": {"a": "x" * 300_000}}, "metadata.annotations"),
    ({"name": "s", "finalizers": ["a b"]}, "metadata.finalizers[0]"),
    ({"name": "s", "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "y"}]},
     "metadata.ownerReferences[0].uid"),
    ({"name": "s", "creationTimestamp": "soon"}, "metadata.creationTimestamp"),
    ({"name": "s", "generation": "x"}, "metadata.generation"),
    ({"name": "s", "managedFields": [{"foo": 1}]}, "metadata.managedFields[0].foo"),
    ({"name": "s", "foo": "bar"}, "metadata.foo"),
])
def test_metadata_the_api_server_refuses_is_refused(metadata: dict[str, Any], field: str) -> None:
    assert field in {e.field for e in check_document(body(**metadata))}


def test_metadata_the_api_server_takes_is_taken() -> None:
    for metadata in ({"name": "s"}, {"generateName": "s-"}, {"name": "a.b"}, {"name": "s", "labels": None},
                     {"name": "s", "finalizers": ["foo"], "creationTimestamp": "2026-01-01T00:00:00Z",
                      "uid": "u", "resourceVersion": "1", "generation": 3, "labels": {"example.com/a": ""}}):
        assert check_document(body(**metadata)) == [], metadata
    assert check_document({**body(name="s"), "status": {"observedGeneration": "x"}}) == []  # dropped on create
    assert [e.field for e in check_document({**body(name="s"), "status": {"foo": 1}})] == ["status.foo"]


def test_nulls_are_pruned_as_the_api_server_prunes_them() -> None:
    spec = {"model": {"name": "m", "uri": "hf://org/m", "revision": None}, "router": None,
            "prefill": {"accelerator": {"type": "nvidia-h100"}, "replicas": None, "nodeSelector": {"a": None},
                        "affinity": {"nodeAffinity": None}},
            "decode": {"accelerator": {"type": "nvidia-h200"}, "tolerations": [None]}}
    pruned = prune_nulls(spec)
    assert pruned["model"] == {"name": "m", "uri": "hf://org/m"} and "router" not in pruned
    assert pruned["prefill"] == {"accelerator": {"type": "nvidia-h100"}, "nodeSelector": {},
                                 "affinity": {"nodeAffinity": None}}  # kept as written inside affinity
    assert pruned["decode"]["tolerations"] == [None]  # a null in a list stays, and is refused
    with pytest.raises(InvalidSpec) as caught:
        validate_service({"metadata": {"name": "s"}, "spec": spec}, DEFAULT_CATALOG)
    assert [e.field for e in caught.value.errors] == ["spec.decode.tolerations[0]"]


@pytest.mark.parametrize(("path", "value"), [
    ("prefill.replicas", "3"), ("prefill.replicas", True), ("prefill.replicas", 2.0), ("slo.percentile", "90"),
    ("engine.port", "8000"), ("model.name", 5), ("engine.env", [{"name": "A", "value": 1}]),
    ("decode.nodeSelector", {"a": 1}), ("kvCache", {"cpuOffloadGiB": "4"}),
])
def test_types_are_as_strict_as_the_crds(path: str, value: Any) -> None:
    service = body(name="s")
    node = service["spec"]
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    with pytest.raises(InvalidSpec) as caught:
        validate_service(service, DEFAULT_CATALOG)
    assert any(e.field.startswith(f"spec.{path}") for e in caught.value.errors), caught.value
