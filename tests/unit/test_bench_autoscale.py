"""The autoscaling benchmark's verdicts: what docs/ and the closing notes quote."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest

from support.paths import REPO

BENCH = REPO / "bench" / "autoscale.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_autoscale", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_autoscale"] = module
    spec.loader.exec_module(module)
    return module


def _row(policy: str, attainment: float, hours: float) -> dict[str, Any]:
    return {"policy": policy, "slo_attainment": attainment, "accelerator_hours": {"total": hours}}


def _day(static_best: dict[str, int], diurnal: float = 5.0, pair: str = "b200-mi300x") -> dict[str, Any]:
    return {"workload": "day", "pair": pair, "diurnal": diurnal, "static_best": static_best}


def test_perfect_tracking_cannot_go_below_one_replica_per_pool(bench: ModuleType) -> None:
    # one replica per pool at the peak: nothing to take away at night
    assert bench.tracking_bound(_day({"prefill": 1, "decode": 1})) == pytest.approx(1.0)


def test_perfect_tracking_of_large_pools_approaches_the_daily_curves_mean(bench: ModuleType) -> None:
    # the raised cosine from peak/5 to peak averages (1 + 1/5) / 2 = 0.6 of the peak
    large = bench.tracking_bound(_day({"prefill": 400, "decode": 400}))
    small = bench.tracking_bound(_day({"prefill": 5, "decode": 5}))
    assert large == pytest.approx(0.6, abs=0.01)
    assert small > large + 0.05  # rounding up whole replicas costs small pools more


def test_perfect_tracking_weighs_pools_by_their_accelerators(bench: ModuleType) -> None:
    # h100-h200: two accelerators per prefill replica, one per decode replica
    one_sided = bench.tracking_bound(_day({"prefill": 400, "decode": 1}, pair="h100-h200"))
    assert one_sided == pytest.approx((800 * 0.6 + 1) / 801, abs=0.01)


def test_hour_workloads_have_no_tracking_bound(bench: ModuleType) -> None:
    assert bench.tracking_bound({"workload": "hour", "pair": "h100-h200", "diurnal": None,
                                 "static_best": {"prefill": 4, "decode": 4}}) is None


def test_a_day_verdict_names_the_bound_and_fails_above_the_target(bench: ModuleType) -> None:
    entry = _day({"prefill": 8, "decode": 4}, pair="h100-h200") | {
        "policies": [_row("disagg", 0.995, 80.0), _row("static-best", 0.991, 100.0), _row("hpa", 0.97, 70.0)]
    }
    verdict = bench.verdict(entry)
    assert "FAIL day" in verdict and "0.80x static-best" in verdict and "perfect tracking 0.66x" in verdict
    entry["policies"][0] = _row("disagg", 0.995, 69.0)
    assert "PASS day" in bench.verdict(entry)


def test_a_policy_with_as_much_attainment_for_fewer_hours_dominates(bench: ModuleType) -> None:
    entry = {"workload": "hour", "pair": "h100-h200", "diurnal": None, "static_best": None,
             "policies": [_row("disagg", 0.9996, 23.0), _row("static-best", 0.9996, 22.0)]}
    verdict = bench.verdict(entry)
    assert "dominated by static-best" in verdict and "FAIL hour" in verdict
