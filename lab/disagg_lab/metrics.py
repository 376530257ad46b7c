"""The engines' /metrics pages: their real metric families, buckets and labels, plus the lab's P/D counters.

Names come from the engine catalogue (what the autoscaler queries); the few extra families engines
export, and their histogram buckets, are copied from the engines' sources. The lab adds four counters
of its own (`disagg_lab_*`), which no engine has, so that a test can prove where each request's KV cache
came from: prefills served, KV caches handed off (prefill side), KV caches received (decode side) and
prompts recomputed (decode side, for a decode request without a usable hand-off), and hand-offs refused
between engines of different revisions (decode side). The engines' own KV-transfer families are there
too, as the engines name them (what the operator's KV-path check queries): vLLM's NIXL connector
(`vllm:nixl_bytes_transferred`, `vllm:nixl_num_failed_transfers`, `vllm:nixl_num_kv_expired_reqs`) and
`vllm:prompt_tokens_by_source`, SGLang's `sglang:kv_transfer_latency_ms`, `sglang:num_transfer_failed_reqs`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from disagg.engines import ENGINES
from disagg.engines.base import MetricNames

EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAB_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("prefills", "disagg_lab_prefills_total", "Prefill legs this engine served (lab counter)."),
    ("kv_sent", "disagg_lab_kv_handed_off_total", "KV caches a decode engine pulled from this engine (lab counter)."),
    ("kv_received", "disagg_lab_kv_received_total", "KV caches this engine received from a prefill (lab counter)."),
    ("recomputed", "disagg_lab_prompts_recomputed_total",
     "Prompts this decode engine prefilled itself for lack of a usable hand-off (lab counter)."),
    ("kv_failed", "disagg_lab_kv_load_failures_total",
     "Hand-offs this decode engine could not load: missing, foreign or consumed (lab counter)."),
    ("kv_refused", "disagg_lab_kv_refused_total",
     "Hand-offs this decode engine refused: the prefill engine runs another revision (lab counter)."),
)
"""(attribute of EngineStats, metric name, help)."""


VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
VLLM_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
NIXL_BYTES_BUCKETS = tuple(float(2 ** exponent) for exponent in range(20, 36))
"""vLLM's `vllm:nixl_bytes_transferred` buckets: 1 MiB to 32 GiB in powers of two."""
SGLANG_KV_TRANSFER_MS_BUCKETS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100, 0.200,
    0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
)


@dataclasses.dataclass(frozen=True)
class EngineMetrics:
    """The metric families one engine kind exports (names as the engine spells them)."""

    kind: str
    running: str
    waiting: str
    kv_usage: str
    prompt_tokens: str
    generation_tokens: str
    requests: str
    requests_labels: tuple[tuple[str, str], ...]
    preemptions: str | None
    ttft: str
    itl: str
    e2e: str
    queue_time: str | None
    prefill_time: str | None
    decode_time: str | None
    ttft_buckets: tuple[float, ...]
    itl_buckets: tuple[float, ...]
    e2e_buckets: tuple[float, ...]
    phase_buckets: tuple[float, ...]
    constant_labels: tuple[tuple[str, str], ...]
    help: Mapping[str, str]
    kv_counters: tuple[tuple[str, str], ...] = ()
    """A custom engine's KV-path counters: (its name, the `EngineStats` attribute); none: the engine's own."""

    def names(self) -> list[str]:
        """Every family name, as it appears after `# TYPE`."""
        names = [self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
                 self.requests, self.ttft, self.itl, self.e2e]
        optional = (self.preemptions, self.queue_time, self.prefill_time, self.decode_time)
        return names + [n for n in optional if n is not None]


def _vllm_metrics(names: MetricNames) -> EngineMetrics:
    """vLLM's families: the catalogue's names, its request and phase histograms, and its help texts."""
    return EngineMetrics(
        kind="vllm",
        running=names.running_requests[0],
        waiting=names.waiting_requests[0],
        kv_usage=names.kv_cache_usage[0],
        prompt_tokens=names.prompt_tokens_total,
        generation_tokens=names.generation_tokens_total,
        requests="vllm:request_success_total",
        requests_labels=(("finished_reason", "length"),),
        preemptions="vllm:num_preemptions_total",
        ttft=names.ttft_histogram,
        itl=names.itl_histogram[0],
        e2e=names.e2e_histogram,
        queue_time="vllm:request_queue_time_seconds",
        prefill_time="vllm:request_prefill_time_seconds",
        decode_time="vllm:request_decode_time_seconds",
        ttft_buckets=VLLM_TTFT_BUCKETS,
        itl_buckets=VLLM_ITL_BUCKETS,
        e2e_buckets=VLLM_REQUEST_LATENCY_BUCKETS,
        phase_buckets=VLLM_REQUEST_LATENCY_BUCKETS,
        constant_labels=(("engine", "0"),),
        help={
            names.running_requests[0]: "Number of requests in model execution batches.",
            names.waiting_requests[0]: "Number of requests waiting to be processed.",
            names.kv_cache_usage[0]: "KV-cache usage. 1 means 100 percent usage.",
            names.prompt_tokens_total: "Number of prefill tokens processed.",
            names.generation_tokens_total: "Number of generation tokens processed.",
            "vllm:request_success_total": "Count of successfully processed requests.",
            "vllm:num_preemptions_total": "Cumulative number of preemption from the engine.",
            names.ttft_histogram: "Histogram of time to first token in seconds.",
            names.itl_histogram[0]: "Histogram of inter-token latency in seconds.",
            names.e2e_histogram: "Histogram of e2e request latency in seconds.",
            "vllm:request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
            "vllm:request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
            "vllm:request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
        },
    )


def _sglang_metrics(names: MetricNames) -> EngineMetrics:
    """SGLang's families: the catalogue's names, its request counter, and its help texts."""
    return EngineMetrics(
        kind="sglang",
        running=names.running_requests[0],
        waiting=names.waiting_requests[0],
        kv_usage=names.kv_cache_usage[0],
        prompt_tokens=names.prompt_tokens_total,
        generation_tokens=names.generation_tokens_total,
        requests="sglang:num_requests_total",
        requests_labels=(),
        preemptions=None,
        ttft=names.ttft_histogram,
        itl=names.itl_histogram[0],
        e2e=names.e2e_histogram,
        queue_time=None,
        prefill_time=None,
        decode_time=None,
        ttft_buckets=SGLANG_TTFT_BUCKETS,
        itl_buckets=SGLANG_ITL_BUCKETS,
        e2e_buckets=SGLANG_E2E_BUCKETS,
        phase_buckets=SGLANG_E2E_BUCKETS,
        constant_labels=(("engine_type", "unified"), ("tp_rank", "0"), ("pp_rank", "0")),
        help={
            names.running_requests[0]: "The number of running requests.",
            names.waiting_requests[0]: "The number of requests in the waiting queue.",
            names.kv_cache_usage[0]: "The token usage.",
            names.prompt_tokens_total: "Number of prefill tokens processed.",
            names.generation_tokens_total: "Number of generation tokens processed.",
            "sglang:num_requests_total": "Number of requests processed.",
            names.ttft_histogram: "Histogram of time to first token in seconds.",
            names.itl_histogram[0]: "Histogram of inter-token latency in seconds.",
            names.e2e_histogram: "Histogram of End-to-end request latency in seconds",
        },
    )


_BUILDERS: dict[str, Callable[[MetricNames], EngineMetrics]] = {"vllm": _vllm_metrics, "sglang": _sglang_metrics}


def _engine_metrics(kind: str) -> EngineMetrics:
    """Names from the engine catalogue (the autoscaler's source), plus the few extra families engines export."""
    names = ENGINES[kind].metrics
    if kind not in _BUILDERS:
        raise ValueError(f"unknown engine kind {kind!r}")
    return _BUILDERS[kind](names)


ENGINE_METRICS: dict[str, EngineMetrics] = {kind: _engine_metrics(kind) for kind in ENGINES}


def custom_metrics(protocol: str, names: MetricNames) -> EngineMetrics:
    """A custom engine's page: the families of the engine whose protocol it speaks, under the spec's names
    (`engine.custom.metrics`); a family the spec leaves unmapped keeps that engine's name, except the KV-path
    counters: with any of them mapped, only the mapped ones."""
    base = ENGINE_METRICS[protocol]

    def first(mapped: tuple[str, ...], default: str) -> str:
        return mapped[0] if mapped else default

    renamed = {
        base.running: first(names.running_requests, base.running),
        base.waiting: first(names.waiting_requests, base.waiting),
        base.kv_usage: first(names.kv_cache_usage, base.kv_usage),
        base.prompt_tokens: names.prompt_tokens_total or base.prompt_tokens,
        base.generation_tokens: names.generation_tokens_total or base.generation_tokens,
        base.ttft: names.ttft_histogram or base.ttft,
        base.itl: first(names.itl_histogram, base.itl),
        base.e2e: names.e2e_histogram or base.e2e,
    }
    return dataclasses.replace(
        base, running=renamed[base.running], waiting=renamed[base.waiting], kv_usage=renamed[base.kv_usage],
        prompt_tokens=renamed[base.prompt_tokens], generation_tokens=renamed[base.generation_tokens],
        ttft=renamed[base.ttft], itl=renamed[base.itl], e2e=renamed[base.e2e],
        help={renamed.get(name, name): text for name, text in base.help.items()},
        kv_counters=tuple((name, stat) for name, stat in ((names.kv_handed, "kv_received"),
                                                          (names.kv_recomputed, "recomputed"),
                                                          (names.kv_failed, "kv_transfer_failed")) if name),
    )


class Histogram:
    """A Prometheus histogram: per-bucket counts (the last one is +Inf) and the sum of observations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (a bucket counts values <= its upper bound)."""
        if count <= 0:
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        return list(itertools.accumulate(self.counts))

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile of these buckets (None without observations)."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        lower, below = 0.0, 0
        for bound, cumulative in zip(self.bounds, self.cumulative(), strict=False):
            if cumulative >= rank:
                if cumulative == below:
                    return bound
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return self.bounds[-1] if self.bounds else None


class EngineStats:
    """Counters and histograms of one simulated engine."""

    __slots__ = ("decode_time", "dropped", "e2e", "failed", "generation_tokens", "itl", "kv_bytes", "kv_expired",
                 "kv_failed", "kv_received", "kv_refused", "kv_sent", "kv_transfer_failed", "kv_transfer_ms",
                 "preemptions", "prefill_time", "prefills", "prompt_external", "prompt_local", "prompt_tokens",
                 "queue_time", "recomputed", "requests", "ttft")

    def __init__(self, metrics: EngineMetrics) -> None:
        self.prefills = 0
        self.kv_sent = 0
        self.kv_received = 0
        self.recomputed = 0
        self.kv_failed = 0
        self.kv_refused = 0
        self.kv_transfer_failed = 0
        """Transfers the engine counts as failed (vLLM's NIXL failures, SGLang's transfer failures)."""
        self.kv_expired = 0
        self.prompt_local = 0
        """Decode: prompt tokens it computed itself."""
        self.prompt_external = 0
        """Decode: prompt tokens whose KV came from a prefill engine."""
        self.kv_bytes = Histogram(NIXL_BYTES_BUCKETS)
        self.kv_transfer_ms = Histogram(SGLANG_KV_TRANSFER_MS_BUCKETS)
        self.failed = 0
        self.preemptions = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = 0
        self.dropped = 0
        self.ttft = Histogram(metrics.ttft_buckets)
        self.itl = Histogram(metrics.itl_buckets)
        self.e2e = Histogram(metrics.e2e_buckets)
        self.queue_time = Histogram(metrics.phase_buckets)
        self.prefill_time = Histogram(metrics.phase_buckets)
        self.decode_time = Histogram(metrics.phase_buckets)


def _fmt(value: float) -> str:
    """A sample value or bucket bound as Prometheus' client libraries write it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in labels)


def _kv_transfer_counters(kind: str, labels: str, stats: EngineStats, head: Callable[[str, str], None],
                          add: Callable[[str], None]) -> None:
    """The engines' own KV-transfer counters."""
    if kind == "vllm":
        head("vllm:prompt_tokens_by_source", "counter")
        for source, value in (("local_compute", stats.prompt_local), ("external_kv_transfer", stats.prompt_external)):
            add(f'vllm:prompt_tokens_by_source_total{{{labels},source="{source}"}} {_fmt(value)}')
        for name, value in (("vllm:nixl_num_failed_transfers", stats.kv_transfer_failed),
                            ("vllm:nixl_num_kv_expired_reqs", stats.kv_expired)):
            head(name, "counter")
            add(f"{name}_total{{{labels}}} {_fmt(value)}")
        return
    for name, value in (("sglang:num_transfer_failed_reqs_total", stats.kv_transfer_failed),
                        ("sglang:num_bootstrap_failed_reqs_total", 0)):
        head(name, "counter")
        add(f"{name}{{{labels}}} {_fmt(value)}")


def render_metrics(metrics: EngineMetrics, labels: str, gauges: tuple[int, int, float], stats: EngineStats) -> str:
    """The engine's /metrics page (text format 0.0.4); `labels` is the pod's label text."""
    running, waiting, kv_usage = gauges
    lines: list[str] = []
    add = lines.append

    def head(name: str, kind: str) -> None:
        add(f"# HELP {name} {metrics.help.get(name, name)}")
        add(f"# TYPE {name} {kind}")

    for name, value in ((metrics.running, float(running)), (metrics.waiting, float(waiting)),
                        (metrics.kv_usage, kv_usage)):
        head(name, "gauge")
        add(f"{name}{{{labels}}} {_fmt(value)}")
    for name, value in ((metrics.prompt_tokens, stats.prompt_tokens),
                        (metrics.generation_tokens, stats.generation_tokens)):
        head(name, "counter")
        add(f"{name}{{{labels}}} {_fmt(value)}")
    head(metrics.requests, "counter")
    extra = "," + label_text(metrics.requests_labels) if metrics.requests_labels else ""
    add(f"{metrics.requests}{{{labels}{extra}}} {_fmt(stats.requests)}")
    if metrics.preemptions is not None:
        head(metrics.preemptions, "counter")
        add(f"{metrics.preemptions}{{{labels}}} {_fmt(stats.preemptions)}")
    for attribute, name, text in LAB_COUNTERS:
        add(f"# HELP {name} {text}")
        add(f"# TYPE {name} counter")
        add(f"{name}{{{labels}}} {_fmt(getattr(stats, attribute))}")
    if metrics.kv_counters:
        for name, stat in metrics.kv_counters:
            head(name, "counter")
            add(f"{name}{{{labels}}} {_fmt(getattr(stats, stat))}")
    else:
        _kv_transfer_counters(metrics.kind, labels, stats, head, add)
    histograms: list[tuple[str | None, Histogram]] = [
        (metrics.ttft, stats.ttft), (metrics.itl, stats.itl), (metrics.e2e, stats.e2e),
        (metrics.queue_time, stats.queue_time), (metrics.prefill_time, stats.prefill_time),
        (metrics.decode_time, stats.decode_time),
        ("vllm:nixl_bytes_transferred" if metrics.kind == "vllm" else "sglang:kv_transfer_latency_ms",
         stats.kv_bytes if metrics.kind == "vllm" else stats.kv_transfer_ms),
    ]
    for hist_name, histogram in histograms:
        if hist_name is None:
            continue
        head(hist_name, "histogram")
        cumulative = histogram.cumulative()
        for bound, count in zip(histogram.bounds, cumulative, strict=False):
            add(f'{hist_name}_bucket{{{labels},le="{_fmt(bound)}"}} {_fmt(count)}')
        add(f'{hist_name}_bucket{{{labels},le="+Inf"}} {_fmt(cumulative[-1])}')
        add(f"{hist_name}_count{{{labels}}} {_fmt(cumulative[-1])}")
        add(f"{hist_name}_sum{{{labels}}} {_fmt(histogram.sum)}")
    lines.append("")
    return "\n".join(lines)


