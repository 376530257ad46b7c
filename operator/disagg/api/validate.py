"""Validation of an InferenceService: the schema's checks, those that need the catalogues, and those the
API server makes only when the operator applies the children.

The API server rejects what the CRD schema and its CEL rules can express; the models say the same
in Python (v1alpha1.py). What they cannot is checked here: names and resources as Kubernetes checks
them in the children (a Service's name, a container's resources), and what needs the accelerator
catalogue, configurable at run time (`catalog_errors`). The same function backs `disagg validate`, so a
user sees the same message from the CLI as in the InferenceService's InvalidSpec condition.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ValidationError

from disagg.api.errors import FieldError, InvalidSpec
from disagg.api.layout import layout_errors
from disagg.api.manifest import prune_nulls
from disagg.api.names import dns_subdomain, qualified_name
from disagg.api.quantity import parse_quantity
from disagg.api.v1alpha1 import CHILD_SEPARATOR, MAX_NAME_LENGTH, InferenceServiceSpec, PoolSpec
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog
from disagg.engines import CROSS_VENDOR_CONNECTORS, EngineAdapter, engine_adapter
from disagg.wellknown import ROLES

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")
"""Resource names without a domain a container may request (and hugepages-<size>)."""
_RELATIVE = re.compile(r"^(\.[A-Za-z][\w.\[\]]*): (.*)$", re.DOTALL)


def _loc(parts: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_spec(spec: Any) -> InferenceServiceSpec:
    """The spec as a model, or InvalidSpec naming each bad field the way a user wrote it."""
    if not isinstance(spec, dict):
        raise InvalidSpec([FieldError("spec", "must be an object")])
    try:
        return InferenceServiceSpec.model_validate(spec)
    except ValidationError as error:
        errors = []
        for item in error.errors():
            field = _loc(tuple(item["loc"]))
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            elif item["type"] == "literal_error":
                message = f"{item['msg']} (got {item.get('input')!r})"
            elif item["type"] == "string_pattern_mismatch":
                message = f"{item.get('input')!r} does not match the pattern {item['ctx']['pattern']}"
            if item["type"] == "value_error":
                # a model's cross-field checks, one per line, each may name its field (".a.b: ...")
                for part in message.splitlines():
                    relative = _RELATIVE.match(part)
                    errors.append(FieldError(field + relative.group(1), relative.group(2)) if relative
                                  else FieldError(field, part))
                continue
            errors.append(FieldError(field, message))
        raise InvalidSpec(errors) from None


def check_spec(name: str, spec: InferenceServiceSpec, catalog: AcceleratorCatalog) -> list[FieldError]:
    """Every problem the schema cannot see; empty when the spec can be served."""
    errors: list[FieldError] = []
    if len(name) > MAX_NAME_LENGTH or not DNS_1035.match(name):
        errors.append(FieldError(
            "metadata.name",
            f"{name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters (lowercase letters, "
            "digits and '-', starting with a letter) so that its children's names are valid",
        ))
    if CHILD_SEPARATOR in name:
        errors.append(FieldError(
            "metadata.name",
            f"{name!r} may not contain {CHILD_SEPARATOR!r}: children are named <name>{CHILD_SEPARATOR}<part>, and "
            "such a name could take another service's child's name",
        ))
    for role in ROLES:
        pool: PoolSpec = getattr(spec, role)
        owned = {spec.kv_transfer.rdma.resource} if spec.kv_transfer.rdma is not None else set()
        accelerator = catalog.get(pool.accelerator.type) if pool.accelerator.type is not None else None
        owned.add(accelerator.resource_name if accelerator is not None else pool.accelerator.resource_name or "")
        errors += resource_errors(f"spec.{role}.resources", pool, owned)
    return errors + catalog_errors(spec, catalog)


def catalog_errors(spec: InferenceServiceSpec, catalog: AcceleratorCatalog) -> list[FieldError]:
    """The problems that depend on the accelerator and engine catalogues (so no CRD rule can see
    them): the operator reports them as InvalidSpec, and `disagg validate` as errors."""
    engine = engine_adapter(spec.engine)
    errors: list[FieldError] = []
    for role in ROLES:
        errors += _pool_catalog_errors(role, spec, catalog, engine)
    return errors + _connector_errors(spec, catalog, engine)


def _pool_catalog_errors(
    role: str, spec: InferenceServiceSpec, catalog: AcceleratorCatalog, engine: EngineAdapter
) -> list[FieldError]:
    """One pool's accelerator against the catalogue and the engine, its layout, and the resources the
    operator sets; an unknown or planner-only accelerator type is the pool's only error."""
    pool: PoolSpec = getattr(spec, role)
    acc = pool.accelerator
    field = f"spec.{role}"
    resource_name = acc.resource_name
    errors: list[FieldError] = []
    if acc.type is not None:
        accelerator = catalog.get(acc.type)
        if accelerator is None:
            return [FieldError(
                f"{field}.accelerator.type",
                f"unknown accelerator type {acc.type!r}; known types: {', '.join(catalog.names())} "
                "(add one with --accelerator-catalog)",
            )]
        if accelerator.plan_only:
            return [FieldError(
                f"{field}.accelerator.type",
                f"{acc.type} is planner-only: no Kubernetes device plugin exposes it (a plugin would expose "
                f"{accelerator.resource_name}); use `disagg plan` to size it, or name a resource a plugin on "
                "your cluster exposes with accelerator.resourceName",
            )]
        resource_name = accelerator.resource_name
        errors += _accelerator_errors(role, spec, accelerator, engine)
    entry = catalog.get(acc.type) if acc.type is not None else None
    errors.extend(layout_errors(role, pool, spec, entry))
    return errors + _owned_resource_errors(role, spec, resource_name)


def _accelerator_errors(
    role: str, spec: InferenceServiceSpec, accelerator: Accelerator, engine: EngineAdapter
) -> list[FieldError]:
    """A catalogued accelerator's count per node, and whether the engine runs on (and has an image for)
    its vendor."""
    pool: PoolSpec = getattr(spec, role)
    acc = pool.accelerator
    field = f"spec.{role}"
    errors: list[FieldError] = []
    if acc.count > accelerator.per_node:
        errors.append(FieldError(
            f"{field}.accelerator.count",
            f"{acc.count} exceeds the {accelerator.per_node} accelerators a {acc.type} node has; "
            "a pod must fit on one node (a worker spans nodes through parallelism and nodes)",
        ))
    if accelerator.vendor not in engine.vendors:
        errors.append(FieldError(
            f"{field}.accelerator.type",
            f"engine {spec.engine.kind} does not run on {accelerator.vendor} accelerators ({acc.type}); "
            f"it supports {', '.join(sorted(engine.vendors))}",
        ))
    elif (pool.image or spec.engine.image) is None and accelerator.vendor not in engine.images:
        errors.append(FieldError(
            f"{field}.image",
            f"no default {spec.engine.kind} image for {accelerator.vendor} accelerators; "
            f"set {role}.image (or engine.image) to a {accelerator.vendor} build of {spec.engine.kind}",
        ))
    return errors


def _owned_resource_errors(role: str, spec: InferenceServiceSpec, resource_name: str | None) -> list[FieldError]:
    """Resources the operator sets itself (the accelerator, the RDMA devices) named in a pool's resources."""
    pool: PoolSpec = getattr(spec, role)
    owned = {resource_name: f"accelerator.count ({resource_name})"}
    if spec.kv_transfer.rdma is not None:
        owned[spec.kv_transfer.rdma.resource] = f"kvTransfer.rdma.count ({spec.kv_transfer.rdma.resource})"
    errors: list[FieldError] = []
    for part in ("requests", "limits"):
        for key in getattr(pool.resources, part):
            if key in owned:
                errors.append(FieldError(f"spec.{role}.resources.{part}.{key}",
                                         f"set by the operator from {owned[key]}; remove it from resources"))
    return errors


def _connector_errors(
    spec: InferenceServiceSpec, catalog: AcceleratorCatalog, engine: EngineAdapter
) -> list[FieldError]:
    """The KV connector: the engine must have it, and it must move KV between the pools' vendors."""
    errors: list[FieldError] = []
    if spec.kv_transfer.connector not in engine.connectors:
        errors.append(FieldError(
            "spec.kvTransfer.connector", f"{spec.engine.kind} has no {spec.kv_transfer.connector} connector"
        ))
    vendors: dict[str, str] = {}
    for role in ROLES:
        kind = getattr(spec, role).accelerator.type
        accelerator = catalog.get(kind) if kind is not None else None
        if accelerator is not None:
            vendors[role] = accelerator.vendor
    if len(set(vendors.values())) > 1 and spec.kv_transfer.connector not in CROSS_VENDOR_CONNECTORS:
        errors.append(FieldError(
            "spec.kvTransfer.connector",
            f"{spec.kv_transfer.connector} cannot move KV between {vendors['prefill']} (prefill) and "
            f"{vendors['decode']} (decode) accelerators; use {', '.join(sorted(CROSS_VENDOR_CONNECTORS))}",
        ))
    return errors


def _native(name: str) -> bool:
    return "/" not in name or "kubernetes.io/" in name


def resource_errors(field: str, pool: PoolSpec, owned: set[str]) -> list[FieldError]:
    """A container's requests and limits as the API server checks them in the pool's Deployment
    (core/validation: resource names, integer extended resources, requests within limits). The
    resources the operator sets (`owned`, refused by `catalog_errors`) are its own."""
    errors: list[FieldError] = []
    requests = {k: v for k, v in pool.resources.requests.items() if k not in owned}
    limits = {k: v for k, v in pool.resources.limits.items() if k not in owned}
    for part, values in (("requests", requests), ("limits", limits)):
        for name, text in values.items():
            errors += _resource_value_errors(f"{field}.{part}.{name}", name, text)
    errors += _overcommit_errors(field, requests, limits)
    names = {*requests, *limits}
    if any(n.startswith("hugepages-") for n in names) and not names & {"cpu", "memory"}:
        errors.append(FieldError(field, "hugepages need a cpu or memory request or limit as well"))
    return errors


def _resource_value_errors(at: str, name: str, text: str) -> list[FieldError]:
    """One request or limit: its resource name, and its value (whole for extended resources, whole pages
    for hugepages)."""
    problem = qualified_name(name)
    if problem is None and "/" not in name and name not in CONTAINER_RESOURCES and not name.startswith("hugepages-"):
        problem = f"{name!r} is no container resource: cpu, memory, ephemeral-storage, hugepages-<size>, " \
                  "or an extended resource (a domain, '/', a name)"
    if problem is None and not _native(name) and (
            name.startswith("requests.") or dns_subdomain("requests." + name.split("/")[0]) is not None):
        problem = f"{name!r} is not an extended resource name"
    if problem is not None:
        return [FieldError(at, problem)]
    errors: list[FieldError] = []
    value = parse_quantity(text).value or 0
    if not _native(name) and math.ceil(value * 1000) % 1000:
        errors.append(FieldError(at, f"{text} is not a whole number: extended resources are counted"))
    if name.startswith("hugepages-"):
        page = _page_size(name)
        if page is None:
            errors.append(FieldError(at, f"{name!r}: the part after hugepages- must be a page size"))
        elif value % page:
            errors.append(FieldError(at, f"{text} is not a multiple of the page size {name[10:]}"))
    return errors


def _overcommit_errors(field: str, requests: dict[str, str], limits: dict[str, str]) -> list[FieldError]:
    """Requests within limits; resources that cannot be overcommitted (extended ones, hugepages) need a
    limit equal to their request."""
    errors: list[FieldError] = []
    overcommit = {name: _native(name) and not name.startswith("hugepages-") for name in {*requests, *limits}}
    for name, text in requests.items():
        request = parse_quantity(text).value
        if name in limits:
            limit = parse_quantity(limits[name]).value
            if not overcommit[name] and request != limit:
                errors.append(FieldError(f"{field}.requests.{name}", f"{text} must equal the limit {limits[name]} "
                                         "(this resource cannot be overcommitted)"))
            elif request is not None and limit is not None and request > limit:
                errors.append(FieldError(f"{field}.requests.{name}",
                                         f"{text} must be less than or equal to the limit {limits[name]}"))
        elif not overcommit[name]:
            errors.append(FieldError(f"{field}.limits.{name}", "required: this resource cannot be overcommitted, "
                                     f"so it needs a limit equal to its request {text}"))
    return errors


def _page_size(name: str) -> int | None:
    try:
        page = parse_quantity(name.removeprefix("hugepages-")).value
    except ValueError:
        return None
    return int(page) if page is not None and page > 0 and page.denominator == 1 else None


def validate_service(body: dict[str, Any], catalog: AcceleratorCatalog) -> InferenceServiceSpec:
    """The spec of an InferenceService object if it can be served, else InvalidSpec with every error.
    The spec is read as the API server reads it: the nulls it prunes are gone first."""
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name") or (f"{metadata['generateName']}xxxxx" if metadata.get("generateName") else "")
    spec = parse_spec(prune_nulls(body.get("spec")))
    errors = check_spec(str(name), spec, catalog)
    if errors:
        raise InvalidSpec(errors)
    return spec


__all__ = ["FieldError", "InvalidSpec", "catalog_errors", "check_spec", "parse_spec", "validate_service"]
