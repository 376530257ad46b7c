"""The operator ships with the autoscaling settings the benchmark measured.

bench/autoscale.py runs the policy with `PolicySettings()` on a simulated 15-s scrape whose rates span
30 s; the policy's smoothing is tuned to that (a 5-s tick or scrape, or rates over 15 s, measured clearly
worse). These tests fail when `disagg run`'s flags, the chart's values or the simulation drift apart.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from disagg.cli import build_parser
from disagg.scaling.policy import PolicySettings
from disagg.scaling.signals import prometheus_duration_seconds
from disagg.settings import OperatorSettings
from disagg.sim.engine import SimSetup
from support.paths import REPO

CHART_VALUES = REPO / "charts" / "disagg-operator" / "values.yaml"
MEASURED = PolicySettings()


def _sim_default(name: str) -> float:
    value = next(f.default for f in dataclasses.fields(SimSetup) if f.name == name)
    assert isinstance(value, float)
    return value


def _assert_measured(tick_s: float, window_s: float, staleness_s: float, rate_window: str, scrape_s: float) -> None:
    assert (tick_s, window_s, staleness_s) == (MEASURED.tick_s, MEASURED.scale_down_window_s, MEASURED.staleness_s)
    # Prometheus' rate() spans the samples inside its window: one scrape interval less than the window
    span = prometheus_duration_seconds(rate_window) - scrape_s
    assert span == MEASURED.signal_window_s == _sim_default("rate_window_s")
    assert scrape_s == _sim_default("scrape_interval_s")


def test_disagg_run_defaults_are_the_benchmarked_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISAGG_AUTOSCALE_TICK", "DISAGG_SCALE_DOWN_WINDOW", "DISAGG_METRICS_STALENESS",
                 "DISAGG_PROMETHEUS_RATE_WINDOW", "DISAGG_SCRAPE_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["run", "--all-namespaces"])
    _assert_measured(args.autoscale_tick, args.scale_down_window, args.metrics_staleness,
                     args.prometheus_rate_window, args.scrape_interval)
    settings = OperatorSettings(prometheus_rate_window=args.prometheus_rate_window,
                                scrape_interval_s=args.scrape_interval)
    assert settings.signal_window_s == MEASURED.signal_window_s  # what the operator hands the policy


def test_chart_defaults_are_the_benchmarked_settings() -> None:
    autoscaling = yaml.safe_load(CHART_VALUES.read_text())["autoscaling"]
    _assert_measured(autoscaling["tickSeconds"], autoscaling["scaleDownWindowSeconds"],
                     autoscaling["metricsStalenessSeconds"], autoscaling["rateWindow"],
                     autoscaling["scrapeIntervalSeconds"])


def test_a_rate_window_without_two_scrapes_is_refused() -> None:
    # 20s at a 15-s scrape often holds a single sample: no rate at all, and the pools held for missing metrics
    done = subprocess.run(
        [sys.executable, "-m", "disagg.cli", "run", "--all-namespaces", "--prometheus-rate-window", "20s",
         "--scrape-interval", "15"], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "--prometheus-rate-window 20s must hold at least two --scrape-interval (15s)" in done.stderr
