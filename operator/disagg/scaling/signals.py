"""Phase signals from Prometheus: a fixed set of PromQL queries for every service at once.

Each query is aggregated `by (namespace, disagg_service, disagg_role)` and matches both engines'
metric names (and vLLM's older names) through `__name__` regexes, so one tick costs the same number
of queries for 1 or 1,000 InferenceServices. Latency percentiles are computed here from the bucket
rates, because each service asks for its own percentile (`spec.slo.percentile`).

Requests per second come twice: over the rate window (what the pool is sized by) and over the last
scrape interval (`irate`, what shows a step up first, with that interval's count from `idelta`; the
policy acts on it only for a step well above the recent load and its noise).

Two signals need more than one rate window:
- the mean output length of a request: tokens are generated over a request's whole life (tens of
  seconds), so generated tokens/s over requests/s of the same short window is not the output length
  while the load changes (after a step up it is a fraction of it, and `request rate x mean output`,
  decode's leading signal, collapses to the generated tokens/s it should lead). Request sizes are a
  property of the workload: they come from the longer `size_window`, and each request counts half when
  it enters the pool and half when it leaves (its tokens are generated in between): exact while the
  request rate changes linearly over a request's life, so also over a window that starts with the
  engines (generated / entered alone reads ~25 % short a minute after a start, generated / finished
  ~20 % long).
- the pool's mean KV-cache usage: a replica that is Ready but not scraped yet (a new pod) holds no KV
  cache, so the mean is over the pool's ready replicas, not only over the pods that report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from disagg.engines import ENGINES, MetricNames
from disagg.scaling.policy import LoadPicture, PoolSignals
from disagg.scaling.policy.histogram import histogram_quantile

BY = "namespace, disagg_service, disagg_role"
Key = tuple[str, str, str]  # (namespace, service, role)


def _every_engine(extra: tuple[MetricNames, ...]) -> tuple[MetricNames, ...]:
    """The built-in engines' metric names, then those of the custom engines being served."""
    return (*(engine.metrics for engine in ENGINES.values()), *extra)


def _names(pick: Callable[[MetricNames], Iterable[str]], extra: tuple[MetricNames, ...] = ()) -> str:
    names: list[str] = []
    for metrics in _every_engine(extra):
        for name in pick(metrics):
            if name and name not in names:  # a custom engine's unset signal has no name
                names.append(name)
    return "|".join(names)


def _either(pick: Callable[[MetricNames], str], window: str, extra: tuple[MetricNames, ...] = ()) -> str:
    """The per-pool rate of whichever engine's counter a pool has (`vector(0)` drops out: no pool labels)."""
    names = dict.fromkeys(pick(metrics) for metrics in _every_engine(extra))
    rates = [f"sum by ({BY}) (rate({name}[{window}]))" for name in names if name]
    return " or ".join(rates) or "vector(0)"


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def prometheus_duration_seconds(text: str) -> float:
    """Seconds of a Prometheus duration such as `30s` or `1m30s`; ValueError names the bad text."""
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r} (e.g. 30s, 1m, 1m30s)")
    return sum(int(number) * _DURATION_UNITS[unit] for number, unit in parts)


@dataclass(frozen=True)
class KVTraffic:
    """The KV path of one service over the rate window, from its decode workers' counters (per second; vLLM in
    prompt tokens, SGLang in requests)."""

    handed_off: float
    recomputed: float
    failed: float


def _one(name: str) -> tuple[str]:
    return (name,)


def _histogram(name: str, suffix: str) -> tuple[str, ...]:
    return (name + suffix,) if name else ()


@dataclass(frozen=True)
class QuerySet:
    """The PromQL of one tick; `window` is the rate window (a few scrape intervals), `size_window` the
    window of the mean request sizes (minutes: longer than a request lives)."""

    window: str = "30s"
    size_window: str = "5m"
    custom: tuple[MetricNames, ...] = ()
    """The metric names of the custom engines being served (`engine.custom.metrics`), queried beside the
    built-in engines' (a name no series has costs nothing)."""

    @property
    def window_seconds(self) -> float:
        """The rate window in seconds (Prometheus duration syntax: `30s`, `1m30s`, `500ms`)."""
        return prometheus_duration_seconds(self.window)

    def queries(self) -> dict[str, str]:
        w, sw, custom = self.window, self.size_window, self.custom
        waiting = _names(lambda m: m.waiting_requests, custom)
        running = _names(lambda m: m.running_requests, custom)
        kv = _names(lambda m: m.kv_cache_usage, custom)
        prompt = _names(lambda m: _one(m.prompt_tokens_total), custom)
        generation = _names(lambda m: _one(m.generation_tokens_total), custom)
        ttft = _names(lambda m: _histogram(m.ttft_histogram, "_bucket"), custom)
        ttft_count = _names(lambda m: _histogram(m.ttft_histogram, "_count"), custom)
        finished = _names(lambda m: _histogram(m.e2e_histogram, "_count"), custom)
        itl = _names(lambda m: tuple(h + "_bucket" for h in m.itl_histogram), custom)
        prompt_lengths = _names(lambda m: _histogram(m.prompt_histogram, "_bucket"), custom)
        prefill_sum = "vllm:request_prefill_time_seconds_sum"
        prefill_count = "vllm:request_prefill_time_seconds_count"
        return {
            "waiting": f'sum by ({BY}) ({{__name__=~"{waiting}"}})',
            "running": f'sum by ({BY}) ({{__name__=~"{running}"}})',
            "kv_usage": f'avg by ({BY}) ({{__name__=~"{kv}"}})',
            "kv_pods": f'count by ({BY}) ({{__name__=~"{kv}"}})',
            "prompt_tps": f'sum by ({BY}) (rate({{__name__=~"{prompt}"}}[{w}]))',
            "generation_tps": f'sum by ({BY}) (rate({{__name__=~"{generation}"}}[{w}]))',
            "request_rate": f'sum by ({BY}) (rate({{__name__=~"{ttft_count}"}}[{w}]))',
            # the last scrape interval alone: a step up shows here one or two scrapes after it happens,
            # where the window's mean needs most of a window to tell it from a burst
            "request_rate_last": f'sum by ({BY}) (irate({{__name__=~"{ttft_count}"}}[{w}]))',
            "requests_last": f'sum by ({BY}) (idelta({{__name__=~"{ttft_count}"}}[{w}]))',
            "generation_tps_sizes": f'sum by ({BY}) (rate({{__name__=~"{generation}"}}[{sw}]))',
            "request_rate_sizes": f'sum by ({BY}) (rate({{__name__=~"{ttft_count}"}}[{sw}]))',
            "finish_rate_sizes": f'sum by ({BY}) (rate({{__name__=~"{finished}"}}[{sw}]))',
            "ttft_buckets": f'sum by ({BY}, le) (rate({{__name__=~"{ttft}"}}[{w}]))',
            "itl_buckets": f'sum by ({BY}, le) (rate({{__name__=~"{itl}"}}[{w}]))',
            # prompt lengths: the requests too long for any replica count to serve within the TTFT target
            "prompt_buckets": f'sum by ({BY}, le) (rate({{__name__=~"{prompt_lengths}"}}[{w}]))',
            "prefill_time": f"sum by ({BY}) (rate({prefill_sum}[{w}])) / sum by ({BY}) (rate({prefill_count}[{w}]))",
            # the engines' own evidence of the KV path, counted on the decode side (a name may carry labels)
            "kv_handed": _either(lambda m: m.kv_handed, w, custom),
            "kv_recomputed": _either(lambda m: m.kv_recomputed, w, custom),
            "kv_failed": _either(lambda m: m.kv_failed, w, custom),
            # the newest sample of any pod of the pool: older than the staleness limit = blind
            "sampled_at": f'max by ({BY}) (timestamp({{__name__=~"{running}"}}))',
        }


def _key(metric: dict[str, str]) -> Key | None:
    try:
        return metric["namespace"], metric["disagg_service"], metric["disagg_role"]
    except KeyError:
        return None


def _value(sample: dict[str, Any]) -> float | None:
    try:
        value = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


@dataclass(frozen=True)
class Observations:
    """One tick's query results, indexed by pool."""

    scalars: dict[str, dict[Key, float]]
    buckets: dict[str, dict[Key, list[tuple[float, float]]]]

    @classmethod
    def from_results(cls, results: dict[str, list[dict[str, Any]]]) -> Observations:
        scalars: dict[str, dict[Key, float]] = {}
        buckets: dict[str, dict[Key, list[tuple[float, float]]]] = {}
        for name, series in results.items():
            for sample in series:
                metric = sample.get("metric", {})
                key = _key(metric)
                value = _value(sample)
                if key is None or value is None:
                    continue
                if name.endswith("_buckets"):
                    try:
                        bound = float(metric["le"])
                    except (KeyError, ValueError):
                        continue
                    buckets.setdefault(name, {}).setdefault(key, []).append((bound, value))
                else:
                    scalars.setdefault(name, {})[key] = value
        return cls(scalars, buckets)

    def services(self) -> set[tuple[str, str]]:
        return {(ns, svc) for series in self.scalars.values() for ns, svc, _ in series}

    def pool(self, key: Key, ready_replicas: int, percentile: float) -> PoolSignals | None:
        sampled_at = self.scalars.get("sampled_at", {}).get(key)
        if sampled_at is None:
            return None

        def get(name: str) -> float | None:
            return self.scalars.get(name, {}).get(key)

        q = percentile / 100.0
        ttft_buckets = sorted(self.buckets.get("ttft_buckets", {}).get(key, []))
        request_rate = get("request_rate")
        prompt_tps = get("prompt_tps")
        generation_tps = get("generation_tps")
        mean_prompt = prompt_tps / request_rate if prompt_tps is not None and request_rate else None
        # the output length over the size window (see the module docstring); the rate window's ratio only
        # when that is missing
        generated_long, requests_long = get("generation_tps_sizes"), get("request_rate_sizes")
        finished_long = get("finish_rate_sizes")
        if finished_long is not None and requests_long is not None:
            requests_long = (requests_long + finished_long) / 2.0
        if generated_long is not None and requests_long:
            mean_output: float | None = generated_long / requests_long
        else:
            mean_output = generation_tps / request_rate if generation_tps is not None and request_rate else None
        # mean KV usage over the ready replicas: those not reporting yet (just Ready) hold no KV cache
        kv_usage, kv_pods = get("kv_usage"), get("kv_pods")
        if kv_usage is not None and kv_pods and ready_replicas > kv_pods:
            kv_usage = kv_usage * kv_pods / ready_replicas
        return PoolSignals(
            ready_replicas=ready_replicas,
            sampled_at=sampled_at,
            waiting_requests=get("waiting"),
            running_requests=get("running"),
            prompt_tokens_per_s=prompt_tps,
            generation_tokens_per_s=generation_tps,
            request_rate=request_rate,
            request_rate_last=get("request_rate_last"),
            requests_last=get("requests_last"),
            kv_usage=kv_usage,
            ttft_s=histogram_quantile(q, ttft_buckets),
            ttft_buckets=tuple(ttft_buckets),
            prompt_buckets=tuple(sorted(self.buckets.get("prompt_buckets", {}).get(key, []))),
            itl_s=histogram_quantile(q, self.buckets.get("itl_buckets", {}).get(key, [])),
            itl_buckets=tuple(sorted(self.buckets.get("itl_buckets", {}).get(key, []))),
            mean_prompt_tokens=mean_prompt,
            mean_output_tokens=mean_output,
            prefill_time_s=get("prefill_time"),
        )

    def kv_traffic(self, namespace: str, service: str) -> KVTraffic | None:
        """What the service's decode workers say about the KV path; None when they report nothing."""
        key = (namespace, service, "decode")
        values = {name: self.scalars.get(name, {}).get(key) for name in ("kv_handed", "kv_recomputed", "kv_failed")}
        if all(v is None for v in values.values()):
            return None
        return KVTraffic(values["kv_handed"] or 0.0, values["kv_recomputed"] or 0.0, values["kv_failed"] or 0.0)

    def picture(self, namespace: str, service: str, ready: dict[str, int], percentile: float) -> LoadPicture:
        return LoadPicture(
            prefill=self.pool((namespace, service, "prefill"), ready.get("prefill", 0), percentile),
            decode=self.pool((namespace, service, "decode"), ready.get("decode", 0), percentile),
        )
