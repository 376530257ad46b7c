"""Runs one tick's PromQL against Prometheus (prometheus-api-client: synchronous, call from a thread)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from disagg.engines import MetricNames
from disagg.scaling.signals import Observations, QuerySet


class PrometheusUnavailable(Exception):
    """Prometheus did not answer a query: the autoscaler must hold, not guess."""


@dataclass
class PrometheusSource:
    """Where the signals come from, and how to reach it."""

    url: str
    token_file: str | None = None
    ca_file: str | None = None
    timeout_s: float = 5.0
    queries: QuerySet = field(default_factory=QuerySet)
    on_query: Callable[[float, bool], None] | None = None
    """Called with (seconds, succeeded) after each query (operator metrics)."""

    def _client(self) -> PrometheusConnect:
        session = requests.Session()
        if self.ca_file:
            session.verify = self.ca_file
        headers: dict[str, str] = {}
        if self.token_file:
            # re-read each tick: projected ServiceAccount tokens rotate
            headers["Authorization"] = f"Bearer {Path(self.token_file).read_text().strip()}"
        # one quick retry: a tick that waits out long back-offs decides on stale data anyway
        retry = Retry(total=1, backoff_factor=0.1, status_forcelist=(502, 503, 504), allowed_methods=("GET", "POST"))
        return PrometheusConnect(url=self.url, headers=headers, session=session, timeout=self.timeout_s, retry=retry)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """One instant query outside the tick's set (e.g. a pool's per-pod load before a scale-down)."""
        started = time.monotonic()
        try:
            result: list[dict[str, Any]] = self._client().custom_query(promql)
        except (PrometheusApiClientException, requests.RequestException, ValueError) as error:
            if self.on_query is not None:
                self.on_query(time.monotonic() - started, False)
            raise PrometheusUnavailable(f"query failed: {error}") from None
        if self.on_query is not None:
            self.on_query(time.monotonic() - started, True)
        return result

    def observe(self, custom: tuple[MetricNames, ...] = ()) -> Observations:
        """Every query of the tick, with the custom engines' metric names; PrometheusUnavailable if any fails
        (partial data is not trusted)."""
        client = self._client()
        results: dict[str, list[dict[str, Any]]] = {}
        queries = replace(self.queries, custom=custom) if custom else self.queries
        for name, promql in queries.queries().items():
            started = time.monotonic()
            try:
                results[name] = client.custom_query(promql)
            except (PrometheusApiClientException, requests.RequestException, ValueError) as error:
                if self.on_query is not None:
                    self.on_query(time.monotonic() - started, False)
                raise PrometheusUnavailable(f"query {name!r} failed: {error}") from None
            if self.on_query is not None:
                self.on_query(time.monotonic() - started, True)
        return Observations.from_results(results)
