"""Kubernetes quantities parsed as apimachinery's ParseQuantity parses them, and bounded (issue 18,
item 5). The e2e test tests/e2e/test_validate_agrees.py checks the bounds against the real API server."""

from __future__ import annotations

from fractions import Fraction

import pytest

from disagg.api.quantity import MAX_QUANTITY, QuantityError, check_quantity, parse_quantity

EXACT = [
    ("0", 0), ("100m", Fraction(1, 10)), ("0.5", Fraction(1, 2)), (".5", Fraction(1, 2)), ("16", 16),
    ("1.5Gi", 1610612736), ("1Ki", 1024), ("500M", 500 * 10**6), ("1e3", 1000), ("1E3", 1000),
    ("1e+3", 1000), ("1e-3", Fraction(1, 1000)), ("1.G", 10**9), ("1E", 10**18), ("2Ti", 2 * 2**40),
    ("+4", 4), ("-1", -1), ("007", 7), ("1.000", 1), ("123456789012345678901234567890", 123456789012345678901234567890),
    # rounded away from zero to a whole nano, as the API server stores it
    ("0.9n", Fraction(1, 10**9)), ("1.1n", Fraction(2, 10**9)), ("-0.9n", Fraction(-1, 10**9)),
    ("1.0000000001", Fraction(1000000001, 10**9)), ("1e-400", Fraction(1, 10**9)),
    # a binary quantity is capped (silently) at 2^63-1; a decimal one is not
    ("8Ei", 2**63 - 1), ("7Ei", 7 * 2**60), ("1" + "0" * 64 + "Ki", 2**63 - 1),
    ("1e19", 10**19),
    # the exponent is an int64 truncated to 32 bits
    ("1e4294967296", 1), ("1e4294967297", 10), ("1e9223372036854775807", Fraction(1, 10)),
    # nothing but a sign, a point or a unit is zero
    (".", 0), ("+", 0), ("Gi", 0), ("m", 0),
]


@pytest.mark.parametrize(("text", "value"), EXACT, ids=[t for t, _ in EXACT])
def test_quantities_have_the_api_servers_exact_value(text: str, value: int | Fraction) -> None:
    assert parse_quantity(text).value == value


NOT_QUANTITIES = ["", "1 Gi", " 1", "1Gi ", "1K", "1ki", "1e", "1ee5", "1e 5", "1.5.3", "0x10", "1_000", "lots",
                  "1e9223372036854775808", "1Gi5", "--1", "\u0661", "1mi"]


@pytest.mark.parametrize("text", NOT_QUANTITIES)
def test_what_is_no_quantity_is_refused(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


def test_huge_values_are_compared_without_being_expanded() -> None:
    huge = parse_quantity("1e2147483647")  # 10^2147483647 would not fit in memory
    assert huge.value is None and huge.compare(MAX_QUANTITY) > 0
    assert parse_quantity("-1e400").compare(Fraction(0)) < 0


@pytest.mark.parametrize("text", ["1e400", "9223372036854775808m", "8Ei", "1e16", "-1", "1e9223372036854775808"])
def test_out_of_range_is_refused_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(QuantityError, match="from 0 to 9223372036854775807m"):
        check_quantity(text)


@pytest.mark.parametrize("text", ["0", "9223372036854775807m", "9223372036854775", "8Pi", "1e4294967296", "1e-400"])
def test_the_bounds_themselves_are_accepted(text: str) -> None:
    assert check_quantity(text) == text
