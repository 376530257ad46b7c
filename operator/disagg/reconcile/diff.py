"""Does a live object already carry everything we would apply? (Then we don't write at all.)

The API server adds defaults and other managers add fields, so "unchanged" means: every field of
the desired manifest is present in the live object with the same value. Lists of named items
(containers, env, ports, volumes) are matched by name, like server-side apply's merge keys, so a
field another manager added to such a list never makes us re-apply forever.
"""

from __future__ import annotations

import re
from decimal import Decimal
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


_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_SUFFIXES = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal("1e3"),
    "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"), "P": Decimal("1e15"), "E": Decimal("1e18"),
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
}


def _quantity(value: Any) -> Decimal | None:
    """The value of a Kubernetes quantity string (the API server stores some in another form: 0.5 as
    500m, 1.5G as 1500M), or None."""
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number) * Decimal(10) ** int(suffix[1:])
        return Decimal(number) * _SUFFIXES[suffix]
    except (ArithmeticError, ValueError):  # decimal.Overflow, InvalidOperation
        return None


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
    if _canonical(desired) == _canonical(live):
        return True
    as_quantity = _quantity(desired)
    return as_quantity is not None and as_quantity == _quantity(live)
