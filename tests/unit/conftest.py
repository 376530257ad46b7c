"""Fixtures shared by the unit tests."""

from support.autoscaler_fakes import prometheus  # noqa: F401  (a fixture, found by pytest by name)
