"""The operator's autoscaling loop: fixed queries per tick, one-step actuation, holding when blind."""

from __future__ import annotations

import math
from typing import Any

import pytest

from disagg.kube.client import AUTOSCALER_FIELD_MANAGER
from disagg.scaling.loop import Index
from disagg.scaling.policy.histogram import histogram_quantile
from disagg.scaling.prometheus import PrometheusSource
from disagg.scaling.signals import Observations, QuerySet, prometheus_duration_seconds
from support.autoscaler_fakes import (
    NOW,
    FakeKube,
    FakePrometheus,
    autoscaler,
    pool,
    sample,
    services,
)


def test_queries_per_tick_do_not_grow_with_the_number_of_services(prometheus: FakePrometheus) -> None:
    counts = {}
    for n in (1, 50):
        prometheus.queries.clear()
        scaler, _ = autoscaler(services(n), PrometheusSource(url=prometheus.url), FakeKube())
        scaler.tick()
        counts[n] = len(prometheus.queries)
    assert counts[1] == counts[50] == len(QuerySet().queries())


def test_no_autoscaled_services_means_no_queries(prometheus: FakePrometheus) -> None:
    scaler, _ = autoscaler(Index(), PrometheusSource(url=prometheus.url), FakeKube())
    scaler.tick()
    assert prometheus.queries == []


def test_prometheus_down_holds_replicas_and_says_why() -> None:
    kube = FakeKube()
    source = PrometheusSource(url="http://127.0.0.1:1", timeout_s=0.5)  # nothing listens on port 1
    scaler, events = autoscaler(services(1), source, kube)
    report = scaler.tick()
    assert kube.scaled == []
    assert report.metrics_problem is not None and "unavailable" in report.metrics_problem
    (_, _, status) = kube.status[-1]
    (cond,) = [c for c in status["conditions"] if c["type"] == "ScalingActive"]
    assert (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable")
    assert all(d.desired == 2 and not d.metrics_available for d in report.decisions[("ns", "svc-0")].values())
    assert any(reason == "MetricsUnavailable" for _, reason, _ in events)


def test_stale_metrics_hold_too(prometheus: FakePrometheus) -> None:
    prometheus.answers["sampled_at"] = [sample("svc-0", r, NOW - 600) for r in ("prefill", "decode")]
    kube = FakeKube()
    scaler, _ = autoscaler(services(1), PrometheusSource(url=prometheus.url), kube)
    report = scaler.tick()
    assert kube.scaled == []
    assert all("old" in d.reason for d in report.decisions[("ns", "svc-0")].values())


def heavy_load(prometheus: FakePrometheus) -> None:
    """A heavy load on both pools of svc-0: thousands of prompt tokens/s queueing, long decode batches."""
    answers = prometheus.answers
    for role in ("prefill", "decode"):
        answers.setdefault("sampled_at", []).append(sample("svc-0", role, NOW - 2))
    answers["waiting"] = [sample("svc-0", "prefill", 400), sample("svc-0", "decode", 50)]
    answers["running"] = [sample("svc-0", "prefill", 8), sample("svc-0", "decode", 600)]
    answers["kv_usage"] = [sample("svc-0", "decode", 0.98)]
    answers["request_rate"] = [sample("svc-0", r, 40) for r in ("prefill", "decode")]
    answers["prompt_tps"] = [sample("svc-0", r, 40 * 4000) for r in ("prefill", "decode")]
    answers["generation_tps"] = [sample("svc-0", "decode", 40 * 300)]


def test_a_burst_scales_each_pool_in_one_step_through_the_autoscaler_field_manager(
    prometheus: FakePrometheus,
) -> None:
    heavy_load(prometheus)
    kube = FakeKube()
    index = services(1)
    scaler, events = autoscaler(index, PrometheusSource(url=prometheus.url), kube)
    report = scaler.tick()
    scaled = {name: (replicas, manager) for _, name, replicas, manager in kube.scaled}
    for name, (replicas, _) in scaled.items():  # what the Deployment watch would show next
        index.deployments[("ns", name)] = pool(name, replicas)
    assert set(scaled) == {"svc-0-prefill", "svc-0-decode"}, report.decisions
    assert all(manager == AUTOSCALER_FIELD_MANAGER for _, manager in scaled.values())
    assert scaled["svc-0-prefill"][0] > 2 and scaled["svc-0-decode"][0] > 2
    # the tick reports each scale with the reason it logs (the numbers behind it)
    reasons = {deployment: reason for _, deployment, _, _, reason in report.scaled}
    assert reasons["svc-0-decode"].startswith("decode: ") and "sequences" in reasons["svc-0-decode"]
    # a second tick with the same picture does not write again
    kube.scaled.clear()
    again = scaler.tick()
    assert kube.scaled == [], again.decisions
    assert sum(1 for _, reason, _ in events if reason == "Scaled") == 2
    (_, _, status) = kube.status[0]
    assert status["decode"]["lastScale"]["from"] == 2 and status["decode"]["lastScale"]["reason"]


def test_a_rollout_holds_the_pools_and_the_serving_slot_is_scaled_after(prometheus: FakePrometheus) -> None:
    heavy_load(prometheus)
    kube = FakeKube()
    index = services(1)
    body = index.services[("ns", "svc-0")]
    for role in ("prefill", "decode"):  # slot b serves after an earlier rollout; a new one is under way
        index.deployments[("ns", f"svc-0--{role}-b")] = pool(f"svc-0--{role}-b", 2)
        index.deployments[("ns", f"svc-0--{role}-b")]["metadata"]["owners"] = ["uid-svc-0"]
    body["status"] = {"prefill": {"workload": "svc-0--prefill-b"}, "decode": {"workload": "svc-0--decode-b"},
                      "rollout": {"from": "r1", "to": "r2", "phase": "Starting"}}
    scaler, _ = autoscaler(index, PrometheusSource(url=prometheus.url), kube)
    scaler.tick()
    assert kube.scaled == [], "both revisions' pools hold their size during a rollout"
    del body["status"]["rollout"]
    scaler.tick()
    assert {name for _, name, _, _ in kube.scaled} == {"svc-0--prefill-b", "svc-0--decode-b"}


def test_nothing_is_read_or_written_until_the_watch_caches_are_listed(prometheus: FakePrometheus) -> None:
    # a service whose pools are not in the (still listing) Deployment cache would read as not created:
    # the autoscaler waits instead of acting or writing a status on that partial picture
    kube = FakeKube()
    listed = [False]
    scaler, _ = autoscaler(services(1), PrometheusSource(url=prometheus.url), kube)
    scaler.ready = lambda: listed[0]
    scaler.tick()
    assert prometheus.queries == [] and kube.scaled == [] and kube.status == []
    listed[0] = True
    scaler.tick()
    assert prometheus.queries and kube.status  # the same tick once listed: queries, and a status


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)], 0.1),
        (0.9, [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)], 0.18),
        (0.99, [(1.0, 10.0), (float("inf"), 20.0)], 1.0),
        (0.5, [], None),
        (0.5, [(1.0, 0.0), (float("inf"), 0.0)], None),
    ],
)
def test_histogram_quantile_matches_prometheus(q: float, buckets: list[tuple[float, float]],
                                               expected: float | None) -> None:
    result = histogram_quantile(q, buckets)
    assert result == pytest.approx(expected) if expected is not None else result is None


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("2m", 120.0)])
def test_rate_window_durations_are_read_like_prometheus(text: str, seconds: float) -> None:
    # the policy's notion of "a whole rate window at this pool size" comes from the same string
    assert QuerySet(window=text).window_seconds == seconds


@pytest.mark.parametrize("text", ["", "30", "30 s", "1.5m", "s30", "30sec"])
def test_a_bad_rate_window_is_refused_with_its_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        prometheus_duration_seconds(text)


def test_the_last_scrape_interval_rate_reaches_the_policy_from_its_own_irate_query() -> None:
    queries = QuerySet(window="6s").queries()
    assert "irate(" in queries["request_rate_last"] and "[6s]" in queries["request_rate_last"]
    labels = {"namespace": "ns", "disagg_service": "svc-0", "disagg_role": "prefill"}
    observations = Observations.from_results({
        "sampled_at": [{"metric": labels, "value": [NOW, str(NOW)]}],
        "request_rate": [{"metric": labels, "value": [NOW, "4"]}],
        "request_rate_last": [{"metric": labels, "value": [NOW, "16"]}],
        "requests_last": [{"metric": labels, "value": [NOW, "32"]}],
    })
    signals = observations.pool(("ns", "svc-0", "prefill"), ready_replicas=2, percentile=99)
    assert signals is not None
    assert (signals.request_rate, signals.request_rate_last, signals.requests_last) == (4.0, 16.0, 32.0)
    assert "idelta(" in queries["requests_last"]


def test_the_ttft_histogram_reaches_the_policy_whole_for_the_error_budget() -> None:
    # Prometheus returns the buckets unordered, `le` as text and +Inf spelled out
    labels = {"namespace": "ns", "disagg_service": "svc-0", "disagg_role": "prefill"}
    buckets = [("+Inf", "10"), ("0.5", "6"), ("2.5", "9.5"), ("1", "8")]
    observations = Observations.from_results({
        "sampled_at": [{"metric": labels, "value": [NOW, str(NOW)]}],
        "ttft_buckets": [{"metric": labels | {"le": le}, "value": [NOW, rate]} for le, rate in buckets],
    })
    signals = observations.pool(("ns", "svc-0", "prefill"), ready_replicas=2, percentile=90)
    assert signals is not None
    assert signals.ttft_buckets == ((0.5, 6.0), (1.0, 8.0), (2.5, 9.5), (math.inf, 10.0))
    assert signals.ttft_s == pytest.approx(2.0)  # the same buckets give the percentile (rank 9 of 10)


@pytest.mark.parametrize(("told", "interval", "warned"), [(15.0, 15.0, False), (15.0, 30.0, True), (15.0, 5.0, True)])
def test_engines_scraped_at_another_interval_than_the_operator_was_told_get_one_warning(
    prometheus: FakePrometheus, told: float, interval: float, warned: bool
) -> None:
    # irate and idelta of the same counter: 6 requests/s, and the count of the last interval between two
    # scrapes, whose ratio is that interval. Told 15 s, a 30-s scrape leaves a 45s window one or two
    # samples; after three ticks in a row (not one missed scrape) the service gets one Warning saying what
    # to set, and no more while it lasts.
    answers = prometheus.answers
    answers["sampled_at"] = [sample("svc-0", r, NOW - 2) for r in ("prefill", "decode")]
    answers["request_rate_last"] = [sample("svc-0", r, 6.0) for r in ("prefill", "decode")]
    answers["requests_last"] = [sample("svc-0", r, 6.0 * interval) for r in ("prefill", "decode")]
    scaler, events = autoscaler(services(1), PrometheusSource(url=prometheus.url), FakeKube())
    scaler.scrape_interval_s = told
    for _ in range(2):
        scaler.tick()
        assert not [e for e in events if e[1] == "ScrapeIntervalMismatch"]
    for _ in range(3):
        scaler.tick()
    mismatch = [message for kind, reason, message in events if reason == "ScrapeIntervalMismatch"]
    assert len(mismatch) == (1 if warned else 0), mismatch
    if warned:
        window = scaler.settings.signal_window_s + interval
        assert f"scraped every {interval:g}s, not every 15s" in mismatch[0]
        assert f"--scrape-interval {interval:g} and --prometheus-rate-window {window:g}s" in mismatch[0]


def test_a_service_deleted_and_created_again_is_warned_again(prometheus: FakePrometheus) -> None:
    # Its count of mismatched ticks goes with it: the new service, scraped at the same wrong interval,
    # gets its own Warning after three ticks.
    answers = prometheus.answers
    answers["sampled_at"] = [sample("svc-0", r, NOW - 2) for r in ("prefill", "decode")]
    answers["request_rate_last"] = [sample("svc-0", r, 6.0) for r in ("prefill", "decode")]
    answers["requests_last"] = [sample("svc-0", r, 6.0 * 30) for r in ("prefill", "decode")]
    index = services(1)
    scaler, events = autoscaler(index, PrometheusSource(url=prometheus.url), FakeKube())
    scaler.scrape_interval_s = 15.0
    for _ in range(4):
        scaler.tick()
    body = index.services.pop(("ns", "svc-0"))
    scaler.tick()
    index.services[("ns", "svc-0")] = body
    for _ in range(3):
        scaler.tick()
    assert sum(1 for _, reason, _ in events if reason == "ScrapeIntervalMismatch") == 2


def test_the_share_of_requests_out_of_reach_goes_to_the_pool_status(prometheus: FakePrometheus) -> None:
    # The example's 500-ms TTFT on 2 x H100: prompts over ~5.5k tokens take longer to prefill alone
    answers = prometheus.answers
    answers["sampled_at"] = [sample("svc-0", r, NOW - 2) for r in ("prefill", "decode")]
    answers["request_rate"] = [sample("svc-0", r, 10) for r in ("prefill", "decode")]
    answers["prompt_tps"] = [sample("svc-0", "prefill", 10 * 1500)]

    def lengths(long_share: float) -> list[dict[str, Any]]:
        cumulative = [(1000, 0.5), (2000, 0.8), (5000, 1 - long_share), (10000, 1.0), ("+Inf", 1.0)]
        return [sample("svc-0", "prefill", 10 * share, le=str(bound)) for bound, share in cumulative]

    answers["prompt_buckets"] = lengths(0.1)
    kube = FakeKube()
    index = services(1)
    scaler, _ = autoscaler(index, PrometheusSource(url=prometheus.url), kube)
    report = scaler.tick()
    (_, _, status) = kube.status[-1]
    out = status["prefill"].get("outOfReach")
    assert out is not None, report.decisions
    assert 5.0 < out["percent"] < 10.0 and "TTFT target" in out["reason"], out
    assert "outOfReach" not in status.get("decode", {})
    index.services[("ns", "svc-0")]["status"] = status  # what the status write left
    writes = len(kube.status)
    answers["prompt_buckets"] = lengths(0.105)  # about the same share: no write for it
    scaler.tick()
    assert len(kube.status) == writes
    answers["prompt_buckets"] = lengths(0.0)  # none out of reach any more: the field goes
    scaler.tick()
    assert kube.status[-1][2]["prefill"]["outOfReach"] is None
