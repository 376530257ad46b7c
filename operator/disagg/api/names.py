"""Kubernetes' rules for names, label keys and values (apimachinery's validation package), in Python:
each check returns what is wrong, or None. The CRD's patterns and CEL rules say the same."""

from __future__ import annotations

import re

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(\.{DNS_LABEL})*"
LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
QUALIFIED_NAME = rf"({DNS_SUBDOMAIN}/)?{LABEL_NAME}"
"""A label key's shape (the lengths are checked apart: prefix <= 253, name <= 63)."""
LABEL_VALUE = rf"({LABEL_NAME})?"


def dns_label(value: str) -> str | None:
    if len(value) > 63:
        return f"{value!r} is longer than 63 characters"
    if not re.fullmatch(DNS_LABEL, value):
        return f"{value!r} must be a DNS label: lowercase letters, digits and '-', starting and ending alphanumeric"
    return None


def dns_subdomain(value: str) -> str | None:
    if len(value) > 253:
        return f"{value!r} is longer than 253 characters"
    if not re.fullmatch(DNS_SUBDOMAIN, value):
        return (f"{value!r} must be a DNS subdomain: lowercase letters, digits, '-' and '.', starting and ending "
                "alphanumeric")
    return None


def qualified_name(value: str) -> str | None:
    """A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at most 63
    characters (letters, digits, '-', '_', '.', starting and ending alphanumeric)."""
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns_subdomain(prefix) is not None or value.count("/") > 1):
        return f"{value!r}: the part before '/' must be a DNS subdomain (e.g. example.com)"
    if not name or len(name) > 63 or not re.fullmatch(LABEL_NAME, name):
        return (f"{value!r} is not a valid key: a name of at most 63 letters, digits, '-', '_' or '.', starting "
                "and ending alphanumeric, with an optional DNS-subdomain prefix and '/'")
    return None


def label_value(value: str) -> str | None:
    if len(value) > 63 or not re.fullmatch(LABEL_VALUE, value):
        return (f"{value!r} is not a valid label value: at most 63 letters, digits, '-', '_' or '.', starting and "
                "ending alphanumeric (or empty)")
    return None
