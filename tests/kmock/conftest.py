"""The kmock tests' harness fixture (an emulated API server with the operator's reconcile)."""

from support.kmock_harness import harness  # noqa: F401  (a fixture, found by pytest by name)
