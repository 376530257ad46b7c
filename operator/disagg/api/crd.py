"""Generates the CustomResourceDefinition from the pydantic models (the one schema source)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from disagg import GROUP, KIND, PLURAL, VERSION
from disagg.api.v1alpha1 import NAME_RULES, CRDModel, InferenceServiceSpec, InferenceServiceStatus

SHORT_NAMES = ["dis", "disaggsvc"]
CATEGORIES = ["disagg", "inference"]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.summary",
     "description": "Prefill pool: ready/desired replicas"},
    {"name": "Decode", "type": "string", "jsonPath": ".status.decode.summary",
     "description": "Decode pool: ready/desired replicas"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Reason", "type": "string", "priority": 1,
     "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _cel_rules_by_title() -> dict[str, tuple[dict[str, str], ...]]:
    """Maps each model's JSON-schema title to its CEL rules."""
    rules: dict[str, tuple[dict[str, str], ...]] = {}
    pending: list[type[BaseModel]] = [InferenceServiceSpec, InferenceServiceStatus]
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        if issubclass(model, CRDModel) and model.cel_rules:
            rules[model.__name__] = model.cel_rules
        for field in model.model_fields.values():
            for arg in _model_types(field.annotation):
                pending.append(arg)
    return rules


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append(annotation)
    for arg in getattr(annotation, "__args__", ()) or ():
        found.extend(_model_types(arg))
    return found


def _structural(node: Any, defs: dict[str, Any], rules: dict[str, tuple[dict[str, str], ...]]) -> Any:
    """Turns pydantic's JSON schema into a Kubernetes structural schema (no $ref, no null types)."""
    if isinstance(node, list):
        return [_structural(item, defs, rules) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, rules)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(variants) == 1:
            return _structural({**variants[0], **rest}, defs, rules)
    out: dict[str, Any] = {}
    title = node.get("title")
    for key, value in node.items():
        _structural_key(out, key, value, defs, rules)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("additionalProperties") is True:
        del out["additionalProperties"]
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)  # extra="forbid" is pruning's job in Kubernetes
    if isinstance(title, str) and title in rules and "properties" in out:
        out["x-kubernetes-validations"] = [dict(rule) for rule in rules[title]]
    return out


def _structural_key(
    out: dict[str, Any], key: str, value: Any, defs: dict[str, Any], rules: dict[str, tuple[dict[str, str], ...]]
) -> None:
    """One keyword of a schema node, as a structural schema says it (titles and null defaults dropped)."""
    if key in ("title",):
        return
    if key == "default" and value is None:
        return
    if key == "properties":
        out[key] = {k: _structural(v, defs, rules) for k, v in value.items()}
    elif key in ("items", "additionalProperties"):
        out[key] = _structural(value, defs, rules) if isinstance(value, dict) else value
    elif key == "const":
        out["enum"] = [value]
    elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
        # OpenAPI v3.0 (what Kubernetes speaks) has boolean exclusive bounds
        out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
        out[key] = True
    else:
        out[key] = value


def _add_object_defaults(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Gives object fields built by default_factory a `default: {}` so nested defaults (and CEL) apply."""
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = props.get(alias)
        if sub is None:
            continue
        models = _model_types(field.annotation)
        if field.default_factory is not None and models and sub.get("type") == "object":
            sub["default"] = {}
        if models:
            target = sub if sub.get("type") == "object" else sub.get("items", {})
            _add_object_defaults(target, models[0])


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _structural(raw, defs, _cel_rules_by_title())
    _add_object_defaults(schema, model)
    return schema


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition for InferenceService, as a plain dict."""
    spec_schema = openapi_schema(InferenceServiceSpec)
    status_schema = openapi_schema(InferenceServiceStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "disagg", "app.kubernetes.io/part-of": "disagg"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A model served by disaggregated prefill and decode pools.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            "x-kubernetes-validations": [dict(rule) for rule in NAME_RULES],
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML, exactly as committed under crds/."""
    from disagg.yamlio import dump_yaml

    header = "# Generated by `disagg crd` from operator/disagg/api/v1alpha1.py. Do not edit.\n"
    return header + dump_yaml(build_crd())
