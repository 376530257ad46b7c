"""Kubernetes resource quantities, parsed to the exact value the API server gives them.

apimachinery's `resource.ParseQuantity` (v0.36) defines the syntax and the value: a signed decimal
number, then a binary suffix (Ki..Ei), a decimal suffix (n, u, m, k, M, G, T, P, E) or an exponent
(e3, E-2). The value is exact (never a float), a non-zero value is rounded away from zero to a whole
nano, and only a binary-suffixed value is capped, silently, at 2^63-1. The exponent is read as an int64
and then truncated to 32 bits, so "1e4294967296" is 1 there, and here.

A float would turn "1e400" into infinity and "1e3" into 999.9999 (the renderer once crashed on the
first); `Fraction` keeps every value the API server can hold, and values far outside any bound the
API checks are kept as a sign and an order of magnitude only, never expanded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_NUMBER = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")
_SUFFIX_CHARS = frozenset("eEinumkKMGTP")
_INT64_MAX = 2**63 - 1
_NANO = Fraction(1, 10**9)
# Values beyond 10^±60 are never compared exactly: every bound the API or this package checks lies
# well inside, and expanding 10^2147483647 would take all the memory there is.
_EXACT_DIGITS = 60

MAX_QUANTITY = Fraction(_INT64_MAX, 1000)
"""The largest quantity accepted anywhere in the spec: 2^63-1 milli-units (~9.2e15), the most that
Kubernetes counts exactly (`Quantity.MilliValue` is an int64: the scheduler's CPU and quota sums)."""
MAX_QUANTITY_TEXT = f"{_INT64_MAX}m"


class QuantityError(ValueError):
    """Text that is not a Kubernetes quantity."""


@dataclass(frozen=True)
class Quantity:
    """A parsed quantity: `value` is exact, or None when it is larger than 10^60 (then `sign` says on
    which side of every bound it lies)."""

    text: str
    value: Fraction | None
    sign: int

    def compare(self, other: Fraction) -> int:
        """-1, 0 or 1 as this quantity is below, equal to or above `other` (any value of ±10^60)."""
        if self.value is not None:
            return (self.value > other) - (self.value < other)
        return self.sign  # beyond 10^60: on the side of its sign of every bound


def _int32(value: int) -> int:
    return (value + 2**31) % 2**32 - 2**31


def _split(text: str) -> tuple[str, str, str, str]:
    """(sign, integer digits, fraction digits, suffix) as apimachinery's scanner splits them."""
    match = _NUMBER.match(text)
    assert match is not None  # every part of the pattern is optional
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    rest = text[match.end():]
    # the suffix: letters of the suffix alphabet, then an optional sign, then digits to the end
    index = 0
    while index < len(rest) and rest[index] in _SUFFIX_CHARS:
        index += 1
    if index < len(rest) and rest[index] in "+-":
        index += 1
    if not rest[index:].isdigit() and rest[index:] != "":
        raise QuantityError(f"{text!r} is not a quantity: the part after the number must be a unit "
                            "(Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E) or an exponent (e.g. e9)")
    if not rest[index:].isascii():
        raise QuantityError(f"{text!r} is not a quantity: digits must be ASCII")
    return sign, whole, fraction, rest


def _unit(text: str, suffix: str) -> tuple[int, int]:
    """The base and exponent of a quantity's suffix: a binary or decimal unit, or a decimal exponent."""
    if suffix in _BINARY:
        return 2, _BINARY[suffix]
    if suffix in _DECIMAL:
        return 10, _DECIMAL[suffix]
    if len(suffix) > 1 and suffix[0] in "eE":
        try:
            exponent = int(suffix[1:])
        except ValueError:
            raise QuantityError(f"{text!r} is not a quantity: bad exponent {suffix!r}") from None
        if not -(2**63) <= exponent < 2**63:
            raise QuantityError(f"{text!r} is not a quantity: the exponent does not fit in 64 bits")
        return 10, _int32(exponent)
    raise QuantityError(f"{text!r} is not a quantity: unknown unit {suffix!r} (Ki, Mi, Gi, Ti, Pi, Ei, "
                        "n, u, m, k, M, G, T, P, E, or an exponent such as e9)")


@functools.lru_cache(maxsize=1024)
def parse_quantity(text: str) -> Quantity:
    """The quantity `text` denotes, exactly as the API server parses it; QuantityError if it is none."""
    if text == "":
        raise QuantityError("an empty string is not a quantity")
    if not text.isascii():
        raise QuantityError(f"{text!r} is not a quantity: only ASCII digits, '.', a sign and a unit")
    sign_text, whole, fraction, suffix = _split(text)
    base, exponent = _unit(text, suffix)
    significant = (whole + fraction).lstrip("0")
    sign = -1 if sign_text == "-" else 1
    if not significant:
        return Quantity(text, Fraction(0), 0)
    # value = significant x 10^scale10 (x 2^exponent with a binary unit); its order of magnitude decides
    # whether it is worth expanding
    scale10 = (exponent if base == 10 else 0) - len(fraction)
    log10 = len(significant) + scale10 + (exponent * 3 // 10 if base == 2 else 0)
    if log10 > _EXACT_DIGITS:
        if base == 2:
            return Quantity(text, sign * Fraction(_INT64_MAX), sign)
        return Quantity(text, None, sign)
    if log10 < -_EXACT_DIGITS:
        return Quantity(text, sign * _NANO, sign)  # rounded away from zero to 1n
    # Decimal reads any number of digits (int() stops at 4,300)
    value = Fraction(Decimal(significant)) * Fraction(10) ** scale10 * (2**exponent if base == 2 else 1)
    if (value / _NANO).denominator > 1:
        value = Fraction(-((-value) // _NANO)) * _NANO  # round up to a whole nano (away from zero)
    if base == 2 and value > _INT64_MAX:
        value = Fraction(_INT64_MAX)
    return Quantity(text, sign * value, sign)


def check_quantity(text: str, minimum: Fraction = Fraction(0), maximum: Fraction = MAX_QUANTITY,
                   minimum_text: str = "0") -> str:
    """`text` if it is a quantity within [minimum, maximum], else QuantityError saying what is accepted."""
    accepted = (f"a quantity from {minimum_text} to {MAX_QUANTITY_TEXT} (2^63-1 milli-units, the most "
                "Kubernetes counts exactly) is accepted")
    try:
        quantity = parse_quantity(text)
    except QuantityError as error:
        raise QuantityError(f"{error}; {accepted}") from None
    if quantity.compare(minimum) < 0 or quantity.compare(maximum) > 0:
        raise QuantityError(f"{text!r} is out of range: {accepted}")
    return text


def quantity_bytes(text: str) -> Fraction:
    """The exact value of a quantity known to be within bounds (check_quantity passed)."""
    value = parse_quantity(text).value
    if value is None:
        raise QuantityError(f"{text!r} is out of range")
    return value
