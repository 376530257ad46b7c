"""Stable YAML output: no anchors, keys in the order they were built, multi-document joins."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import yaml


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_NoAliasDumper.add_representer(str, _str_presenter)


def dump_yaml(document: Any) -> str:
    """One YAML document, keys in insertion order, no aliases."""
    return yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False, width=100, allow_unicode=True)


def dump_all(documents: Iterable[Any]) -> str:
    """Several documents joined with `---`."""
    return "---\n".join(dump_yaml(doc) for doc in documents)


# What YAML does not allow unescaped in a document (outside its printable set), and what it would read
# as a line break (folded into a space) or a byte order mark.
_YAML_UNPRINTABLE = re.compile(
    "[^\t\n\r\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")


def yaml_safe_json(value: Any) -> str:
    """JSON that every YAML parser reads as the same value (JSON is YAML, but not all of it).

    json.dumps either escapes characters beyond the BMP as surrogate pairs (\\ud83d\\ude00), which Go's
    YAML parser refuses ("invalid Unicode character escape code"), or (ensure_ascii=False) writes every
    character raw, and YAML refuses some raw (C1 controls) and folds others (U+2028). Here characters go
    raw except those, which are escaped (all are in the BMP).
    """
    text = json.dumps(value, ensure_ascii=False)
    return _YAML_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def load_all(text: str) -> list[Any]:
    """Every non-empty document of a multi-document YAML text."""
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]
