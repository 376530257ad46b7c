"""Does a live object already carry everything we would apply? (Then we don't write at all.)

The API server adds defaults and other managers add fields, so "unchanged" means: every field of
the desired manifest is present in the live object with the same value. Lists of named items
(containers, env, ports, volumes) are matched by name, like server-side apply's merge keys, so a
field another manager added to such a list never makes us re-apply forever.
"""

from __future__ import annotations

from typing import Any

_MERGE_KEYS = ("name", "containerPort", "port", "key", "mountPath")


def _merge_key(items: list[Any]) -> str | None:
    if not items or not all(isinstance(item, dict) for item in items):
        return None
    for key in _MERGE_KEYS:
        if all(key in item for item in items):
            return key
    return None


def _canonical(value: Any) -> Any:
    # the API server returns quantities and int-or-strings in canonical text form
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


def _omitted(value: Any) -> bool:
    # the API server drops false booleans and empty strings/lists/maps of omitempty fields
    return value is None or value is False or value == "" or value == [] or value == {}


def contains(desired: Any, live: Any) -> bool:
    """True when `live` has every field of `desired` with an equal value."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        return all(
            contains(value, live[key]) if key in live else _omitted(value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        if not isinstance(live, list):
            return False
        key = _merge_key(desired)
        if key is not None and _merge_key(live) == key:
            by_key = {item[key]: item for item in live}
            return all(item[key] in by_key and contains(item, by_key[item[key]]) for item in desired)
        return len(desired) == len(live) and all(contains(d, v) for d, v in zip(desired, live, strict=True))
    return bool(_canonical(desired) == _canonical(live))
