"""An InferenceService manifest as the API server reads it before the spec: the document's type, its
metadata (ObjectMeta's fields, types and rules), unknown fields (kubectl's strict field validation),
and the nulls the API server prunes from the spec before it validates it.

`disagg validate` checks a file with these before the spec; the operator needs none of it (objects
it gets from the API server passed all of it).
"""

from __future__ import annotations

import datetime
import json
from functools import cache
from typing import Any

from disagg import GROUP, KIND, VERSION
from disagg.api.errors import FieldError
from disagg.api.names import dns_label, dns_subdomain, label_value, qualified_name

API_VERSION = f"{GROUP}/{VERSION}"
TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
MAX_REQUEST_BYTES = 3 * 2**20
"""The API server's limit on a request body (an object longer than that is never stored)."""
MAX_ANNOTATIONS_BYTES = 256 * 2**10
INT64 = (-(2**63), 2**63 - 1)

_STRING, _INTEGER, _TIME = "string", "integer", "time"
# ObjectMeta's fields and their JSON types (an object field is checked by its own function)
_META_SCALARS = {
    "name": _STRING, "generateName": _STRING, "namespace": _STRING, "selfLink": _STRING, "uid": _STRING,
    "resourceVersion": _STRING, "generation": _INTEGER, "creationTimestamp": _TIME, "deletionTimestamp": _TIME,
    "deletionGracePeriodSeconds": _INTEGER,
}
_OWNER_REFERENCE = {"apiVersion": _STRING, "kind": _STRING, "name": _STRING, "uid": _STRING,
                    "controller": "boolean", "blockOwnerDeletion": "boolean"}
_MANAGED_FIELDS_ENTRY = {"manager": _STRING, "operation": _STRING, "apiVersion": _STRING, "time": _TIME,
                         "fieldsType": _STRING, "fieldsV1": "object", "subresource": _STRING}


def check_document(body: Any) -> list[FieldError]:
    """Everything the API server refuses in a manifest outside its spec (and its size)."""
    if not isinstance(body, dict):
        return [FieldError("(document)", f"must be an object (a YAML mapping), not {_type_name(body)}")]
    errors: list[FieldError] = []
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if api_version != API_VERSION:
        errors.append(FieldError("apiVersion", f"{api_version!r} is not {API_VERSION!r}" if api_version is not None
                                 else f"required: {API_VERSION}"))
    if kind != KIND:
        errors.append(FieldError("kind", f"{kind!r} is not {KIND!r}" if kind is not None else f"required: {KIND}"))
    errors += [FieldError(key, "unknown field") for key in body if key not in TOP_LEVEL]
    errors += check_metadata(body.get("metadata"))
    if body.get("status") is not None:
        errors += unknown_fields(body["status"], status_schema(), "status")
    if not errors and len(json.dumps(body, separators=(",", ":"))) > MAX_REQUEST_BYTES:
        errors.append(FieldError("(document)", f"longer than the {MAX_REQUEST_BYTES // 2**20} MiB the API server "
                                               "accepts in one request"))
    return errors


def check_metadata(meta: Any) -> list[FieldError]:
    """ObjectMeta's types, unknown fields and the rules the API server applies to a custom resource."""
    if meta is None:
        return [FieldError("metadata.name", "required (or metadata.generateName)")]
    if not isinstance(meta, dict):
        return [FieldError("metadata", f"must be an object, not {_type_name(meta)}")]
    errors = _metadata_type_errors(meta)
    if errors:
        return errors  # the API server stops at a field it cannot decode
    return _name_errors(meta) + _label_and_annotation_errors(meta) + _finalizer_and_owner_errors(meta)


def _metadata_type_errors(meta: dict[str, Any]) -> list[FieldError]:
    """ObjectMeta's fields with the JSON types they decode from; any other field is unknown."""
    errors: list[FieldError] = []
    for key, value in meta.items():
        field = f"metadata.{key}"
        if key in _META_SCALARS:
            errors += _check_type(value, _META_SCALARS[key], field)
        elif key in ("labels", "annotations"):
            errors += _check_string_map(value, field)
        elif key == "finalizers":
            errors += _check_list(value, field, lambda item, at: _check_type(item, _STRING, at))
        elif key == "ownerReferences":
            errors += _check_list(value, field, lambda item, at: _check_object(item, _OWNER_REFERENCE, at))
        elif key == "managedFields":
            errors += _check_list(value, field, lambda item, at: _check_object(item, _MANAGED_FIELDS_ENTRY, at))
        else:
            errors.append(FieldError(field, "unknown field"))
    return errors


def _name_errors(meta: dict[str, Any]) -> list[FieldError]:
    """A name (or a generateName) and the namespace, as DNS names."""
    errors: list[FieldError] = []
    name, generate_name = meta.get("name"), meta.get("generateName")
    if not name and not generate_name:
        errors.append(FieldError("metadata.name", "required (or metadata.generateName)"))
    if name:
        errors += _named("metadata.name", dns_subdomain(name))
    elif generate_name:
        errors += _named("metadata.generateName", dns_subdomain(generate_name + "x"))
    if meta.get("namespace"):
        errors += _named("metadata.namespace", dns_label(meta["namespace"]))
    return errors


def _label_and_annotation_errors(meta: dict[str, Any]) -> list[FieldError]:
    """Label keys and values, annotation keys and the annotations' total size."""
    errors: list[FieldError] = []
    for key, value in (meta.get("labels") or {}).items():
        errors += _named("metadata.labels", qualified_name(key))
        errors += _named(f"metadata.labels[{key}]", label_value(value))
    annotations = meta.get("annotations") or {}
    for key in annotations:
        errors += _named("metadata.annotations", qualified_name(key.lower()))
    if sum(len(k) + len(v) for k, v in annotations.items()) > MAX_ANNOTATIONS_BYTES:
        errors.append(FieldError("metadata.annotations", f"longer than {MAX_ANNOTATIONS_BYTES} bytes in all"))
    return errors


def _finalizer_and_owner_errors(meta: dict[str, Any]) -> list[FieldError]:
    """Finalizers as qualified names; owner references complete, at most one of them the controller."""
    errors: list[FieldError] = []
    for index, finalizer in enumerate(meta.get("finalizers") or []):
        errors += _named(f"metadata.finalizers[{index}]", qualified_name(finalizer))
    controllers = 0
    for index, reference in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not reference.get(key):
                errors.append(FieldError(f"metadata.ownerReferences[{index}].{key}", "required"))
        controllers += bool(reference.get("controller"))
    if controllers > 1:
        errors.append(FieldError("metadata.ownerReferences", "only one reference can have controller set to true"))
    return errors


def _named(field: str, problem: str | None) -> list[FieldError]:
    return [] if problem is None else [FieldError(field, problem)]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _check_type(value: Any, expected: str, field: str) -> list[FieldError]:
    if value is None:
        return []
    ok = {
        _STRING: isinstance(value, str),
        _TIME: isinstance(value, str) and _rfc3339(value),
        _INTEGER: isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1],
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
    }[expected]
    if ok:
        return []
    wanted = {_TIME: "an RFC 3339 time (YYYY-MM-DDThh:mm:ssZ)", _INTEGER: "a 64-bit integer"}.get(
        expected, f"a {expected}" if expected != "object" else "an object")
    return [FieldError(field, f"must be {wanted}, not {_type_name(value) if expected != _TIME else repr(value)}")]


def _rfc3339(text: str) -> bool:
    try:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in text and (text.endswith("Z") or text[-6] in "+-")


def _check_string_map(value: Any, field: str) -> list[FieldError]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [FieldError(field, f"must be an object of strings, not {_type_name(value)}")]
    return [FieldError(f"{field}[{key}]", f"must be a string, not {_type_name(item)}")
            for key, item in value.items() if not isinstance(item, str)]


def _check_list(value: Any, field: str, each: Any) -> list[FieldError]:
    if value is None:
        return []
    if not isinstance(value, list):
        return [FieldError(field, f"must be a list, not {_type_name(value)}")]
    errors: list[FieldError] = []
    for index, item in enumerate(value):
        errors += each(item, f"{field}[{index}]")
    return errors


def _check_object(value: Any, fields: dict[str, str], field: str) -> list[FieldError]:
    if not isinstance(value, dict):
        return [FieldError(field, f"must be an object, not {_type_name(value)}")]
    errors: list[FieldError] = []
    for key, item in value.items():
        if key not in fields:
            errors.append(FieldError(f"{field}.{key}", "unknown field"))
        else:
            errors += _check_type(item, fields[key], f"{field}.{key}")
    return errors


# --- what the API server does with the spec before validating it --------------------------------


@cache
def spec_schema() -> dict[str, Any]:
    from disagg.api.crd import openapi_schema
    from disagg.api.v1alpha1 import InferenceServiceSpec

    return openapi_schema(InferenceServiceSpec)


@cache
def status_schema() -> dict[str, Any]:
    from disagg.api.crd import openapi_schema
    from disagg.api.v1alpha1 import InferenceServiceStatus

    return openapi_schema(InferenceServiceStatus)


def _field_schema(schema: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if schema is None:
        return None
    if key in schema.get("properties", {}):
        found: dict[str, Any] = schema["properties"][key]
        return found
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def prune_nulls(value: Any, schema: dict[str, Any] | None = None) -> Any:
    """`value` without the nulls the API server drops before validating (apiextensions'
    PruneNonNullableNullsWithoutDefaults, then defaulting): a null field of an object is as if
    absent. Nulls in lists stay (and fail validation there, as here)."""
    schema = spec_schema() if schema is None else schema
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = _field_schema(schema, key)
            if item is None and sub is not None and not sub.get("nullable"):
                continue
            out[key] = prune_nulls(item, sub) if sub is not None else item
        return out
    if isinstance(value, list):
        items = schema.get("items") if schema else None
        return [prune_nulls(item, items) if isinstance(items, dict) else item for item in value]
    return value


def unknown_fields(value: Any, schema: dict[str, Any], path: str) -> list[FieldError]:
    """Fields the schema does not declare (strict field validation refuses them; types are the
    schema's concern, and of status the API server keeps nothing on create anyway)."""
    errors: list[FieldError] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            sub = schema["properties"].get(key)
            if sub is None:
                errors.append(FieldError(f"{path}.{key}", "unknown field"))
            else:
                errors += unknown_fields(item, sub, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return errors
