"""Stable YAML output: no anchors, keys in the order they were built, multi-document joins."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

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


# Characters Go's YAML parser (the API server's) and PyYAML both take raw in a double-quoted scalar:
# the printable BMP, without the line and paragraph separators (folded) and the byte order mark.
_NOT_RAW = re.compile("[^\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def yaml_flow(value: Any) -> str:
    """`value` as YAML in JSON's syntax (flow style), which every YAML parser reads the same.

    Plain JSON is not that: json.dumps escapes characters beyond the BMP as surrogate pairs, which Go's
    YAML parser refuses ("invalid Unicode character escape code"), and with ensure_ascii=False it writes
    them raw, which Go's parser refuses too ("control characters are not allowed"), as YAML does C1
    controls. Those are escaped here the YAML way (\\u, and \\U for beyond the BMP).
    """
    return _NOT_RAW.sub(_escape, json.dumps(value, ensure_ascii=False))


# libyaml's safe loader where PyYAML was built with it: the same documents, ~10x faster (rendering the
# children of 1,000 services parses 13,000 documents).
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_all(text: str) -> list[Any]:
    """Every non-empty document of a multi-document YAML text."""
    return [doc for doc in yaml.load_all(text, Loader=_SafeLoader) if doc is not None]


# --- reading manifests as kubectl and the API server read them -----------------------------------
#
# PyYAML speaks YAML 1.1 its own way; the API server reads YAML with go-yaml v2 (sigs.k8s.io/yaml)
# and then as JSON. They differ where it matters to validation: `70.6e9` is a number there and a
# string in PyYAML, a `YYYY-MM-DD` scalar a string there and a date here, duplicate keys an error there
# (strict decoding) and "last wins" here, an alias bomb a quick "excessive aliasing" error there and
# gigabytes here. So documents are split as kubectl splits them, composed by PyYAML's parser, and
# turned into values by the rules of go-yaml v2, sigs.k8s.io/yaml and encoding/json, below.

MAX_DOCUMENT_BYTES = 8 * 2**20
"""Longest document read (a bound on memory; the API server takes 3 MiB requests)."""
MAX_REQUEST_BYTES = 3 * 2**20
"""The API server's limit on a request body: a longer object can never be created."""
MAX_DEPTH = 10_000
"""Deepest nesting of collections, as go-yaml's own limit."""
_ALIAS_RATIO_LOW, _ALIAS_RATIO_HIGH = 400_000, 4_000_000
_INT64 = (-(2**63), 2**63 - 1)
# a tag URI (RFC 4151): its syntax requires a date after the authority (any fixed one)
_PLAIN = "tag:disagg.dev,2026:plain"
_MERGE = "tag:yaml.org,2002:merge"
_STANDARD = "tag:yaml.org,2002:"
# go-yaml v2's resolve table: a plain scalar's first character says what it may be
_RESOLVED: dict[str, Any] = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False),
    **dict.fromkeys(("", "~", "null", "Null", "NULL"), None),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), float("nan")),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), float("inf")),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), float("-inf")),
}
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_DOT_FLOAT = re.compile(r"^\.[0-9]+([eE][-+]?[0-9]+)?$")  # what Go's ParseFloat reads after a leading '.'


class ManifestError(ValueError):
    """A document the API server would not read, with what is wrong and where."""


@dataclass(frozen=True)
class Document:
    """One document of a manifest stream: its value as the API server reads it, or why it cannot."""

    number: int
    """1-based position among the stream's documents."""
    line: int
    """Line of the file where it starts."""
    value: Any = None
    error: str | None = None


class _Composer(_SafeLoader):  # type: ignore[misc]
    """PyYAML's parser and composer; scalars are resolved later, by go-yaml's rules."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            return _MERGE if value == "<<" else _PLAIN
        return super().resolve(kind, value, implicit)


def _go_int(text: str, unsigned: bool) -> int | None:
    """strconv.ParseInt / ParseUint with base 0 and 64 bits: None where Go returns an error."""
    negative = False
    if not unsigned and text[:1] in ("+", "-"):
        negative, text = text[0] == "-", text[1:]
    base = 10
    if len(text) > 1 and text[0] == "0":
        base, text = {"x": (16, text[2:]), "o": (8, text[2:]), "b": (2, text[2:])}.get(text[1].lower(), (8, text[1:]))
    digits = "0123456789abcdef"[:base]
    if not text or any(c not in digits for c in text.lower()):
        return None
    value = -int(text, base) if negative else int(text, base)
    low, high = (0, 2**64 - 1) if unsigned else _INT64
    return value if low <= value <= high else None


def _go_float(text: str) -> float | None:
    """strconv.ParseFloat of a decimal number: None for out of range (Go: ±Inf and an error)."""
    value = float(text)
    return None if math.isinf(value) else value


@functools.lru_cache(maxsize=4096)
def _resolve_plain(value: str) -> Any:
    """A plain scalar as go-yaml v2 resolves it into an interface{} (resolve.go)."""
    if value in _RESOLVED:
        return _RESOLVED[value]
    first = value[0]
    if first == ".":
        return _go_float(value) if _DOT_FLOAT.match(value) else value
    if not (first.isdigit() and first.isascii()) and first not in "+-":
        return value  # a letter: only the table above; timestamps stay strings in an interface{}
    plain = value.replace("_", "")
    for unsigned in (False, True):
        number = _go_int(plain, unsigned)
        if number is not None:
            return number
    if _YAML_FLOAT.match(plain):
        parsed = _go_float(plain)
        if parsed is not None:
            return parsed
    return value


def _resolve_tagged(tag: str, value: str, line: int) -> Any:
    """A scalar with an explicit tag: go-yaml resolves it and refuses a value of another type."""
    kind = tag.removeprefix(_STANDARD) if tag.startswith(_STANDARD) else ""
    if kind not in ("bool", "int", "float", "null", "timestamp", "binary"):
        return value  # !!str, and tags go-yaml does not resolve (its value stays the text)
    if kind == "binary":
        try:
            return base64.b64decode(value.encode(), validate=False).decode("utf-8", errors="replace")
        except (binascii.Error, ValueError):
            raise ManifestError(f"line {line}: !!binary value is not base64") from None
    resolved = _resolve_plain(value) if value else None
    if kind == "timestamp":
        return value
    if kind == "float" and isinstance(resolved, int) and not isinstance(resolved, bool):
        return float(resolved)
    expected = {"bool": bool, "int": int, "float": float, "null": type(None)}[kind]
    if type(resolved) is not expected:
        raise ManifestError(f"line {line}: cannot decode {value!r} as a !!{kind}")
    return resolved


def _key_text(key: Any, line: int) -> str:
    """A map key as sigs.k8s.io/yaml writes it into JSON (int, float and bool keys become strings)."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int) and _INT64[0] <= key <= _INT64[1]:
        return str(key)
    if isinstance(key, float):
        return _float32_text(key)
    raise ManifestError(f"line {line}: unsupported map key {key!r} (a JSON key must be a string)")


def _float32_text(value: float) -> str:
    """strconv.FormatFloat(value, 'g', -1, 32), with go-yaml's names for the infinities."""
    if math.isnan(value):
        return ".nan"
    try:
        single = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        single = math.copysign(math.inf, value)
    if math.isinf(single):
        return ".inf" if single > 0 else "-.inf"
    if single == 0:
        return "-0" if math.copysign(1, single) < 0 else "0"
    for digits in range(1, 10):  # the shortest that reads back as the same float32
        text = f"{single:.{digits - 1}e}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == single:
            break
    mantissa, exponent_text = text.split("e")
    exponent = int(exponent_text)
    sign = "-" if mantissa.startswith("-") else ""
    figures = mantissa.lstrip("-").replace(".", "").rstrip("0") or "0"
    if exponent < -4 or exponent >= 6:  # Go's 'g' with the shortest digits switches to an exponent there
        head = figures[0] + ("." + figures[1:] if len(figures) > 1 else "")
        return f"{sign}{head}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if exponent >= 0:
        whole = figures[: exponent + 1].ljust(exponent + 1, "0")
        rest = figures[exponent + 1:]
        return sign + whole + ("." + rest if rest else "")
    return sign + "0." + "0" * (-exponent - 1) + figures


def _json_number(value: Any, line: int) -> Any:
    """What encoding/json writes and the API server reads back: whole floats below 1e21 become
    integers when they fit int64, integers beyond int64 become floats, NaN and infinity are refused."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ManifestError(f"line {line}: {value} is not a JSON number")
        if value.is_integer() and abs(value) < 1e21 and _INT64[0] <= value <= _INT64[1]:
            return int(value)
        return value
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return float(value)
    return value


class _Decoder:
    """go-yaml v2's decoder over PyYAML's node graph, with its alias accounting: a document whose
    values come mostly from expanding aliases is refused as it is decoded (the billion laughs stop
    after a thousand nodes, not after gigabytes)."""

    def __init__(self, first_line: int) -> None:
        self.first_line = first_line
        """Line of the file where the document starts (marks count from 0 within it)."""
        self.decoded = 0
        self.from_aliases = 0
        self.alias_depth = 0
        self.seen: set[int] = set()
        self.open: set[int] = set()

    def _excessive(self, node: yaml.Node) -> bool:
        """go-yaml's test, after each value: more than 100 from aliases of more than 1,000, and a
        larger share from aliases than its sliding limit (99 % up to 400,000 values, 10 % from 4M)."""
        if self.from_aliases <= 100 or self.decoded <= 1000:
            return False
        span = (self.decoded - _ALIAS_RATIO_LOW) / (_ALIAS_RATIO_HIGH - _ALIAS_RATIO_LOW)
        allowed = 0.99 if self.decoded <= _ALIAS_RATIO_LOW else (
            0.10 if self.decoded >= _ALIAS_RATIO_HIGH else 0.99 - 0.89 * span)
        if self.from_aliases / self.decoded > allowed:
            raise ManifestError(f"line {self.line(node)}: the document expands aliases excessively "
                                f"({self.from_aliases} of {self.decoded} values so far)")
        return False

    def line(self, node: yaml.Node) -> int:
        return int(node.start_mark.line) + self.first_line

    def decode(self, node: yaml.Node, depth: int = 0, key: bool = False) -> Any:
        # no clean-up on an error: a ManifestError ends the whole document
        identity = id(node)
        alias = identity in self.seen  # PyYAML hands an alias the anchored node itself: met again = an alias
        if alias:
            if identity in self.open:
                raise ManifestError(f"line {self.line(node)}: an anchor's value contains itself")
            self.decoded += 1  # go-yaml counts the alias itself (from an alias when nested), then its value
            self.from_aliases += self.alias_depth > 0
            self.alias_depth += 1
        else:
            self.seen.add(identity)
        self.decoded += 1
        if self.alias_depth:
            self.from_aliases += 1
            self._excessive(node)
        if type(node) is yaml.ScalarNode:
            tag, text = node.tag, node.value
            value = _resolve_plain(text) if tag == _PLAIN else _resolve_tagged(tag, text, self.line(node))
            if not key and type(value) is not str:
                value = _json_number(value, self.line(node))  # keys become strings their own way
        else:
            if depth > MAX_DEPTH:
                raise ManifestError(f"line {self.line(node)}: nested deeper than {MAX_DEPTH} levels")
            self.open.add(identity)
            if type(node) is yaml.MappingNode:
                value = self._mapping(node, depth)
            else:
                value = [self.decode(child, depth + 1) for child in node.value]
            self.open.discard(identity)
        self.alias_depth -= alias
        return value

    def _mapping(self, node: yaml.MappingNode, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE:
                self._merge(value_node, out, depth)
                continue
            key = self.decode(key_node, depth + 1, key=True)
            if isinstance(key, (list, dict)):
                raise ManifestError(f"line {self.line(key_node)}: a map key must be a scalar")
            self._set(out, key, self.decode(value_node, depth + 1), key_node)
        return out

    def _merge(self, node: yaml.Node, out: dict[str, Any], depth: int) -> None:
        sources = list(reversed(node.value)) if isinstance(node, yaml.SequenceNode) else [node]
        for source in sources:  # go-yaml merges a list of maps last to first
            if not isinstance(source, yaml.MappingNode):
                raise ManifestError(f"line {self.line(source)}: map merge requires a map or a list of maps")
            for key, value in self.decode(source, depth + 1).items():
                self._set(out, key, value, source)

    def _set(self, out: dict[str, Any], key: Any, value: Any, key_node: yaml.Node) -> None:
        text = key if type(key) is str else _key_text(key, self.line(key_node))
        if text in out:  # strict decoding: the API server refuses a key set twice
            raise ManifestError(f"line {self.line(key_node)}: key {text!r} already set in map")
        out[text] = value


def _decode_document(text: str, first_line: int) -> Any:
    try:
        nodes = list(yaml.compose_all(text, Loader=_Composer))
    except yaml.reader.ReaderError as error:
        line = text[: error.position].count("\n") + first_line
        raise ManifestError(f"line {line}: character #x{error.character:04x} is not allowed in YAML "
                            "(control characters are not allowed)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + first_line}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ManifestError(f"{where}{' '.join(str(problem).split())}") from None
    except RecursionError:
        raise ManifestError(f"nested deeper than {MAX_DEPTH} levels") from None
    if not nodes:
        return None
    if len(nodes) > 1:  # a '---' that is not at the start of a line, as kubectl would split them
        raise ManifestError("more than one YAML document without a '---' line between them")
    try:
        return _Decoder(first_line).decode(nodes[0])
    except RecursionError:
        raise ManifestError(f"nested deeper than {MAX_DEPTH} levels") from None


def read_documents(stream: BinaryIO) -> Iterator[Document]:
    """The documents of a manifest stream one at a time (bounded memory), split as kubectl splits them
    (a line starting with `---`), each read as the API server reads it; empty documents are skipped."""
    number, start, line_number = 0, 1, 0
    chunk: list[bytes] = []
    size = 0
    too_long = False
    for line in stream:
        line_number += 1
        if line.startswith(b"---"):
            rest = line[3:].strip()
            invalid = bool(rest) and not rest.startswith(b"#")
            if chunk or not invalid:
                number, done = _read_document(number, start, b"".join(chunk), too_long)
                if done is not None:
                    yield done
            if invalid:
                number += 1
                yield Document(number, line_number, error=f"line {line_number}: invalid document separator "
                                                         f"{line[:40].decode('utf-8', 'replace').strip()!r}")
            chunk, size, too_long, start = [], 0, False, line_number + 1
            continue
        size += len(line)
        if size > MAX_DOCUMENT_BYTES:
            too_long = True
            chunk = []
        elif not too_long:
            chunk.append(line)
    number, done = _read_document(number, start, b"".join(chunk), too_long)
    if done is not None:
        yield done


def _read_document(number: int, start: int, data: bytes, too_long: bool) -> tuple[int, Document | None]:
    """The document whose lines from `start` are `data`, numbered after the `number` before it (None for an
    empty one or comments only), and the number of documents so far."""
    if not data.strip() and not too_long:
        return number, None
    number += 1
    if too_long:
        return number, Document(number, start, error=f"longer than {MAX_DOCUMENT_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_line = start + data[: error.start].count(b"\n")
        return number, Document(number, start,
                                error=f"line {bad_line}: not UTF-8 text (byte 0x{data[error.start]:02x})")
    try:
        value = _decode_document(text.removeprefix("\ufeff"), start)
    except ManifestError as error:
        return number, Document(number, start, error=str(error))
    if value is None:
        return number - 1, None  # comments only: kubectl skips it
    return number, Document(number, start, value)
