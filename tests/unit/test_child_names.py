"""Children's names: no two valid InferenceServices of a namespace render a child of the same kind and
name, every name fits its kind, and the names that could break that are refused (schema and validate).

Rendering 399 services whose names are built from the words children are named with (`a`, `metrics`,
`prefill`, `decode`, `kv`, `router`, `engines`) finds every collision of a scheme like the old
`<name>-metrics` / `<name>-prefill-kv` one (`a` and `a-metrics` both had Service/a-metrics).
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagg.api.crd import build_crd
from disagg.api.v1alpha1 import MAX_NAME_LENGTH
from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import render_service
from support.paths import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
WORDS = ("a", "metrics", "prefill", "decode", "kv", "router", "engines")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# the longest name each kind allows (Services are DNS-1035 labels; the rest DNS-1123 subdomains)
LIMITS = {"Service": 63}


def service(name: str, source: Path = EXAMPLES[0]) -> dict[str, Any]:
    body: dict[str, Any] = copy.deepcopy(yaml.safe_load(source.read_text()))
    body["metadata"]["name"] = name
    body["metadata"]["namespace"] = "ns"
    return body


def names_from_words() -> list[str]:
    names = ["-".join(parts) for n in (1, 2, 3) for parts in itertools.product(WORDS, repeat=n)]
    return [n for n in names if DNS_1035.match(n)]


@pytest.mark.parametrize("source", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_no_two_services_render_a_child_of_the_same_kind_and_name(source: Path) -> None:
    holder: dict[tuple[str, str], str] = {}
    collisions: list[str] = []
    template = service("x", source)
    for name in names_from_words():
        body = copy.deepcopy(template)
        body["metadata"]["name"] = name
        for child in render_service(body, DEFAULT_CATALOG):
            key = (child["kind"], child["metadata"]["name"])
            if key in holder and holder[key] != name:
                collisions.append(f"{key[0]}/{key[1]}: {holder[key]} and {name}")
            holder.setdefault(key, name)
    assert len(names_from_words()) == 399
    assert not collisions, f"{len(collisions)} collisions, e.g. {collisions[:5]}"


@pytest.mark.parametrize("source", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_child_name_of_the_longest_service_name_is_valid_for_its_kind(source: Path) -> None:
    name = "s" * MAX_NAME_LENGTH
    children = render_service(service(name, source), DEFAULT_CATALOG)
    longest = max(len(c["metadata"]["name"]) for c in children if c["kind"] == "Service")
    assert longest == 63, "the bound is tight: the longest Service name is exactly 63 characters"
    for child in children:
        child_name = child["metadata"]["name"]
        limit = LIMITS.get(child["kind"], 253)
        pattern = DNS_1035 if child["kind"] == "Service" else DNS_1123_SUBDOMAIN
        assert len(child_name) <= limit and pattern.match(child_name), (child["kind"], child_name)


def test_deployments_and_the_endpoint_keep_their_names() -> None:
    # renaming a Deployment would replace its pods; the endpoint is what clients call
    children = {(c["kind"], c["metadata"]["name"]) for c in render_service(service("llama"), DEFAULT_CATALOG)}
    assert {("Deployment", "llama-prefill"), ("Deployment", "llama-decode"), ("Deployment", "llama-router"),
            ("Service", "llama")} <= children
    assert {("Service", "llama--metrics"), ("Service", "llama--prefill-kv"), ("Service", "llama--decode-kv")} <= (
        children)


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("a", True), ("a-metrics", True), ("a-prefill-kv", True), ("llama-3-70b", True),
        ("s" * MAX_NAME_LENGTH, True),
        ("s" * (MAX_NAME_LENGTH + 1), False),
        ("a--metrics", False), ("a---b", False), ("a--", False),
        ("1llama", False), ("Llama", False), ("llama.v1", False), ("llama-", False), ("-llama", False),
    ],
)
def test_names_that_could_take_another_services_child_are_refused(name: str, accepted: bool) -> None:
    body = service(name)
    if accepted:
        validate_service(body, DEFAULT_CATALOG)
        return
    with pytest.raises(InvalidSpec) as refused:
        validate_service(body, DEFAULT_CATALOG)
    assert any(e.field == "metadata.name" for e in refused.value.errors), refused.value


def test_the_crd_refuses_the_same_names_at_its_root() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = " ".join(r["rule"] for r in schema["x-kubernetes-validations"])
    assert f"size(self.metadata.name) <= {MAX_NAME_LENGTH}" in rules
    assert "!self.metadata.name.contains('--')" in rules
