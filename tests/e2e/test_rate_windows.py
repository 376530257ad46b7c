"""e2e: what the operator's default rate window averages over, on the real Prometheus.

`rate(x[W])` uses the samples inside the window, one scrape interval less than W. The autoscaling policy was
tuned (bench/autoscale.py) on rates over 30 s at a 15-s scrape, so the operator defaults to
`--scrape-interval 15 --prometheus-rate-window 45s`; a `30s` window would average over 15 s (simulated:
Azure code hour 96.6 % instead of 99.14 %). A counter on loopback, scraped every 15 s through the cluster
Prometheus' file_sd job, shows both spans.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from disagg.scaling.policy import PolicySettings
from disagg.scaling.signals import prometheus_duration_seconds
from disagg.settings import OperatorSettings
from disagg_lab.targets import FLEET_LABEL, write_targets

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

SLOPE = 10.0
"""The probe counter grows by this much per second."""


def _query(prometheus_url: str, promql: str, at: float) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{query}", timeout=10) as resp:
        result: list[dict[str, Any]] = json.loads(resp.read())["data"]["result"]
    return result


def _samples(prometheus_url: str, selector: str, window: str, at: float) -> list[tuple[float, float]]:
    result = _query(prometheus_url, f"{selector}[{window}]", at)
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def _rate(prometheus_url: str, selector: str, window: str, at: float) -> float:
    return float(_query(prometheus_url, f"rate({selector}[{window}])", at)[0]["value"][1])


def test_the_default_rate_window_averages_over_the_span_the_benchmark_simulates(cluster: LocalCluster) -> None:
    defaults = OperatorSettings()
    scrape = defaults.scrape_interval_s
    window = defaults.prometheus_rate_window
    started = time.time()

    class Counter(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"disagg_window_probe_total {SLOPE * (time.time() - started):.3f}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    probe = secrets.token_hex(4)
    owner = str(os.getpid())  # a fleet prunes the group of a dead owner
    selector = f'disagg_window_probe_total{{disagg_probe="{probe}"}}'
    write_targets(cluster.engines_file, [{
        "targets": [f"127.0.0.1:{server.server_address[1]}"],
        "labels": {FLEET_LABEL: owner, "disagg_probe": probe,
                   "__scrape_interval__": f"{scrape:g}s", "__scrape_timeout__": "5s"},
    }], owner)
    try:
        # four scrapes: the default window then holds its full number of samples
        deadline = time.time() + 4 * scrape + 30
        while len(_samples(cluster.prometheus_url, selector, "2m", time.time())) < 4:
            assert time.time() < deadline, "Prometheus never scraped the probe four times"
            time.sleep(2)
        at = time.time()
        wide = _samples(cluster.prometheus_url, selector, window, at)
        narrow = _samples(cluster.prometheus_url, selector, f"{2 * scrape:g}s", at)
        rate = _rate(cluster.prometheus_url, selector, window, at)
    finally:
        write_targets(cluster.engines_file, [], owner)
        server.shutdown()
        server.server_close()
    span = wide[-1][0] - wide[0][0]
    assert len(wide) == 3, wide
    assert abs(span - (prometheus_duration_seconds(window) - scrape)) < 1.0, wide
    # what the operator tells the policy, and what the simulation's rates span
    assert abs(span - defaults.signal_window_s) < 1.0
    assert defaults.signal_window_s == PolicySettings().signal_window_s
    # a window of two scrape intervals holds two samples: rates over one interval only
    assert len(narrow) == 2 and abs(narrow[-1][0] - narrow[0][0] - scrape) < 1.0, narrow
    assert abs(rate - SLOPE) < 0.1 * SLOPE, rate
