"""The operator ships with the autoscaling settings the benchmark measured.

bench/autoscale.py runs the policy with `PolicySettings()` on a simulated 15-s scrape; the policy's
smoothing is tuned to that cadence (a 5-s tick or scrape measured clearly worse). These tests fail when
`disagg run`'s flags, the chart's values or the simulated scrape drift apart from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from disagg.cli import build_parser
from disagg.scaling.policy import PolicySettings
from disagg.scaling.signals import prometheus_duration_seconds
from disagg.sim.engine import SimSetup

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "disagg-operator" / "values.yaml"
MEASURED = PolicySettings()


def _default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def test_disagg_run_defaults_are_the_benchmarked_policy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISAGG_AUTOSCALE_TICK", "DISAGG_SCALE_DOWN_WINDOW", "DISAGG_METRICS_STALENESS",
                 "DISAGG_PROMETHEUS_RATE_WINDOW"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["run", "--all-namespaces"])
    assert args.autoscale_tick == MEASURED.tick_s
    assert args.scale_down_window == MEASURED.scale_down_window_s
    assert args.metrics_staleness == MEASURED.staleness_s
    assert prometheus_duration_seconds(args.prometheus_rate_window) == MEASURED.signal_window_s


def test_chart_defaults_are_the_benchmarked_settings() -> None:
    values = yaml.safe_load(CHART_VALUES.read_text())
    autoscaling = values["autoscaling"]
    assert autoscaling["tickSeconds"] == MEASURED.tick_s
    assert autoscaling["scaleDownWindowSeconds"] == MEASURED.scale_down_window_s
    assert autoscaling["metricsStalenessSeconds"] == MEASURED.staleness_s
    assert prometheus_duration_seconds(autoscaling["rateWindow"]) == MEASURED.signal_window_s
    # the engines are scraped as often as the simulated Prometheus the benchmark ran against
    scrape = prometheus_duration_seconds(values["podMonitor"]["interval"])
    assert scrape == _default(SimSetup, "scrape_interval_s")
    assert prometheus_duration_seconds(values["podMonitor"]["scrapeTimeout"]) <= scrape
