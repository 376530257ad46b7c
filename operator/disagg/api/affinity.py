"""A pool's `affinity`, checked as the API server checks it in the pool's Deployment: the fields and
types of Kubernetes' Affinity (server-side apply refuses others) and core/validation's rules
(operators and their values, label keys and values, weights, topology keys, namespaces).

The CRD keeps `affinity` as written (its schema is Kubernetes' own, many levels deep); the operator
passes it through, so `disagg validate` refuses here what the API server would refuse there.
"""

from __future__ import annotations

from typing import Any

from disagg.api.names import dns_label, dns_subdomain, label_value, qualified_name

_STR, _INT32 = "string", "int32"
_STRINGS = [_STR]
_NODE_REQUIREMENT = {"key": _STR, "operator": _STR, "values": _STRINGS}
_NODE_TERM = {"matchExpressions": [_NODE_REQUIREMENT], "matchFields": [_NODE_REQUIREMENT]}
_LABEL_SELECTOR = {"matchLabels": {"*": _STR}, "matchExpressions": [_NODE_REQUIREMENT]}
_POD_TERM = {"labelSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR, "namespaces": _STRINGS,
             "topologyKey": _STR, "matchLabelKeys": _STRINGS, "mismatchLabelKeys": _STRINGS}
_POD_AFFINITY = {"requiredDuringSchedulingIgnoredDuringExecution": [_POD_TERM],
                 "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": _INT32, "podAffinityTerm": _POD_TERM}]}
AFFINITY: dict[str, Any] = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [_NODE_TERM]},
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": _INT32, "preference": _NODE_TERM}],
    },
    "podAffinity": _POD_AFFINITY,
    "podAntiAffinity": _POD_AFFINITY,
}


def affinity_errors(affinity: Any) -> list[str]:
    """What the API server refuses in this affinity, each as ".path: problem"."""
    errors = _shape(affinity, AFFINITY, "")
    if errors:
        return errors  # server-side apply stops at the shape
    node = affinity.get("nodeAffinity") or {}
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is not None:
        terms = required.get("nodeSelectorTerms") or []
        path = ".nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
        if not terms:
            errors.append(f"{path}: must have at least one node selector term")
        for index, term in enumerate(terms):
            errors += _node_term(term or {}, f"{path}[{index}]", label_values=True)
    path = ".nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
    for index, preferred in enumerate(node.get("preferredDuringSchedulingIgnoredDuringExecution") or []):
        preferred = preferred or {}
        errors += _weight(preferred.get("weight"), f"{path}[{index}].weight")
        # a preferred term may name label values no node has yet (the API server allows any)
        errors += _node_term(preferred.get("preference") or {}, f"{path}[{index}].preference", label_values=False)
    for kind in ("podAffinity", "podAntiAffinity"):
        pods = affinity.get(kind) or {}
        path = f".{kind}.requiredDuringSchedulingIgnoredDuringExecution"
        for index, term in enumerate(pods.get("requiredDuringSchedulingIgnoredDuringExecution") or []):
            errors += _pod_term(term or {}, f"{path}[{index}]")
        path = f".{kind}.preferredDuringSchedulingIgnoredDuringExecution"
        for index, weighted in enumerate(pods.get("preferredDuringSchedulingIgnoredDuringExecution") or []):
            weighted = weighted or {}
            errors += _weight(weighted.get("weight"), f"{path}[{index}].weight")
            errors += _pod_term(weighted.get("podAffinityTerm") or {}, f"{path}[{index}].podAffinityTerm")
    return errors


def _shape(value: Any, schema: Any, path: str) -> list[str]:
    """Unknown fields and wrong types, as server-side apply's typed schema finds them (nulls pass)."""
    if value is None:
        return []
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path or '.'}: must be an object"]
        if "*" in schema:
            return [e for key, item in value.items() for e in _shape(item, schema["*"], f"{path}[{key}]")]
        errors = []
        for key, item in value.items():
            if key not in schema:
                errors.append(f"{path}.{key}: unknown field")
            else:
                errors += _shape(item, schema[key], f"{path}.{key}")
        return errors
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: must be a list"]
        return [e for index, item in enumerate(value) for e in _shape(item, schema[0], f"{path}[{index}]")]
    if schema == _STR and not isinstance(value, str):
        return [f"{path}: must be a string"]
    if schema == _INT32 and (isinstance(value, bool) or not isinstance(value, int) or not -(2**31) <= value < 2**31):
        return [f"{path}: must be a 32-bit integer"]
    return []


def _weight(weight: Any, path: str) -> list[str]:
    return [] if isinstance(weight, int) and 1 <= weight <= 100 else [f"{path}: must be in the range 1-100"]


def _node_term(term: dict[str, Any], path: str, label_values: bool) -> list[str]:
    errors = []
    for index, requirement in enumerate(term.get("matchExpressions") or []):
        errors += _requirement(requirement or {}, f"{path}.matchExpressions[{index}]",
                               ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"), label_values)
    for index, requirement in enumerate(term.get("matchFields") or []):
        requirement = requirement or {}
        at = f"{path}.matchFields[{index}]"
        values = requirement.get("values") or []
        if requirement.get("operator") not in ("In", "NotIn"):
            errors.append(f"{at}.operator: {requirement.get('operator')!r} is not a valid field selector operator "
                          "(In or NotIn)")
        elif len(values) != 1:
            errors.append(f"{at}.values: a node field selector takes exactly one value")
        if requirement.get("key") != "metadata.name":
            errors.append(f"{at}.key: {requirement.get('key')!r} is not a valid field selector key (metadata.name)")
        else:
            errors += [f"{at}.values[{i}]: {p}" for i, v in enumerate(values) if (p := dns_subdomain(v))]
    return errors


def _requirement(requirement: dict[str, Any], path: str, operators: tuple[str, ...], label_values: bool) -> list[str]:
    errors = []
    operator, values = requirement.get("operator"), requirement.get("values") or []
    if operator in ("In", "NotIn") and not values:
        errors.append(f"{path}.values: required when operator is In or NotIn")
    elif operator in ("Exists", "DoesNotExist") and values:
        errors.append(f"{path}.values: must be empty when operator is Exists or DoesNotExist")
    elif operator in ("Gt", "Lt") and operator in operators and len(values) != 1:
        errors.append(f"{path}.values: Gt and Lt take exactly one value")
    elif operator not in operators:
        errors.append(f"{path}.operator: {operator!r} is not a valid selector operator ({', '.join(operators)})")
    problem = qualified_name(requirement.get("key") or "")
    if problem:
        errors.append(f"{path}.key: {problem}")
    if label_values:
        errors += [f"{path}.values[{i}]: {p}" for i, v in enumerate(values) if (p := label_value(v))]
    return errors


def _label_selector(selector: dict[str, Any], path: str) -> list[str]:
    errors = []
    for key, value in (selector.get("matchLabels") or {}).items():
        errors += [f"{path}.matchLabels: {p}" for p in (qualified_name(key), label_value(value or "")) if p]
    for index, requirement in enumerate(selector.get("matchExpressions") or []):
        errors += _requirement(requirement or {}, f"{path}.matchExpressions[{index}]",
                               ("In", "NotIn", "Exists", "DoesNotExist"), label_values=True)
    return errors


def _pod_term(term: dict[str, Any], path: str) -> list[str]:
    errors = []
    for part in ("labelSelector", "namespaceSelector"):
        if term.get(part) is not None:
            errors += _label_selector(term[part], f"{path}.{part}")
    errors += [f"{path}.namespaces: {p}" for name in term.get("namespaces") or [] if (p := dns_label(name))]
    selector = term.get("labelSelector")
    match_keys, mismatch_keys = term.get("matchLabelKeys") or [], term.get("mismatchLabelKeys") or []
    for part, keys in (("matchLabelKeys", match_keys), ("mismatchLabelKeys", mismatch_keys)):
        if keys and selector is None:
            errors.append(f"{path}.{part}: must not be set without labelSelector")
        errors += [f"{path}.{part}[{i}]: {p}" for i, key in enumerate(keys) if (p := qualified_name(key))]
    errors += [f"{path}.matchLabelKeys[{i}]: {key!r} is in mismatchLabelKeys too"
               for i, key in enumerate(match_keys) if key in mismatch_keys]
    if not term.get("topologyKey"):
        errors.append(f"{path}.topologyKey: required (a node label key, e.g. kubernetes.io/hostname)")
    elif problem := qualified_name(term["topologyKey"]):
        errors.append(f"{path}.topologyKey: {problem}")
    return errors
