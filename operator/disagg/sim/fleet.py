"""A simulated engine fleet for the local cluster (`disagg fleet`).

kwok pods run no process, so this one process plays the engine of every Ready prefill and decode pod of
the InferenceServices it watches, closely enough that the operator's PromQL, the real Prometheus and a
real router see what they would see in a real cluster.

Kubernetes
    List + watch of Pods (`app.kubernetes.io/managed-by=disagg,disagg.dev/role in (prefill,decode)`) and
    of InferenceServices (engine kind, model, accelerators, TP, SLO, engine port). A pod is served while it
    is Ready, its IP is a loopback address (the local cluster's pod CIDR is 127.100.0.0/16) and its
    service has a capacity model; when it stops being Ready or goes away, its server stops.

HTTP, per served pod, on the pod's own IP and `spec.engine.port` (default 8000)
    `/metrics` (Prometheus text format, the engine's real metric names with the labels `namespace`,
    `pod`, `disagg_service`, `disagg_role`, `model_name`), `/health`, and a minimal OpenAI surface
    (`/v1/models`, `/v1/completions`, `/v1/chat/completions`; `"stream": true` gets one SSE chunk) so a
    real router can route to it; requests sent there join the simulated engine's queue. The Prometheus
    file_sd targets file lists every served pod with the same labels (rewritten atomically).

Simulation (pure, in `FleetSim`; fixed steps of `dt` seconds, deterministic for a seed)
    Each service's offered load arrives (Poisson by default) and is spread round-robin over its Ready
    prefill pods; a finished prefill hands its request to the service's Ready decode pods, round-robin,
    once its KV cache has moved (roofline KV-transfer time). Per pod, from the capacity model:
    - prefill: a FIFO served at the roofline prefill time of each prompt. TTFT = queue wait + prefill +
      KV transfer; `num_requests_running` counts the prompts of the current batch (up to
      `max_batched_tokens`), `num_requests_waiting` the rest of the queue.
    - decode: continuous batching as vLLM schedules it. A request joins the batch when its KV has arrived
      and its prompt (plus the batch's growth over one step) fits below the KV watermark, within
      `max_num_seqs`; when the running sequences outgrow the cache, the youngest are preempted and
      recomputed later. Each engine step lasts the roofline step time at the current batch and mean
      context, and that step time is the inter-token latency. KV usage = tokens held / KV capacity
      (close to 1 when saturated); requests that do not fit wait (`num_requests_waiting`).
    Both count prompt and generation tokens the way vLLM does in P/D (the prefill pod generates the
    first token; the decode pod counts the prompt when it admits the request), and observe latency
    histograms with the engine's own buckets.

Offered load
    `--load NS/NAME=SPEC`: a constant rate (`8`), steps (`steps:0s@2,60s@8,120s@2`, times from the
    fleet's start, or from when the control API set them), or a trace replay
    (`trace:PATH[:time-scale]`, Azure CSV or Mooncake JSONL, read in place, looped). A rate written
    `4x` is a multiple of the service's base load. Without `--load`, a service gets `--default-load`
    (`1x`). The base load is `--base-share` (60 %) of the rate one prefill plus one decode replica
    serve within the SLO, by the same sizing the autoscaler plans with (`disagg.capacity.sizing`), at
    `--prompt-tokens`/`--output-tokens` (1024/1024). For examples/01 that is ~3.1 requests/s: one
    replica per pool keeps the SLO, while at 4x one pair saturates (TTFT and the decode waiting list
    grow without bound) and the sizing asks for 2 prefill + 2 decode.
    A control API on 127.0.0.1 changes loads at run time: `PUT /load/NS/NAME` with
    `{"rps": 8, "prompt_tokens": 2048, "output_tokens": 256}` (or `{"x": 4}`, or `{"spec": "steps:..."}`),
    `DELETE /load/NS/NAME` (back to the default), `GET /load`, `GET /state` (per pod), `GET /healthz`.

Limits: listens on loopback addresses only, talks to a loopback API server only (unless
`--allow-remote-apiserver`), every loop is bounded in time, queues are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import fcntl
import heapq
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from aiohttp import web
from pydantic import ValidationError

from disagg import GROUP, PLURAL, VERSION
from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import ModelConfigError, ModelShape, builtin_model, from_architecture
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_step_seconds,
    kv_capacity_tokens,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.capacity.traces import TraceError, Workload, read_trace, scale_time
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog, CatalogError, load_catalog
from disagg.catalog.engines import ENGINES
from disagg.scaling.policy import PolicySettings
from disagg.scaling.signals import prometheus_duration_seconds

log = logging.getLogger("disagg.fleet")

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, Role] = ("prefill", "decode")
ROLE_LABEL = "disagg.dev/role"
SERVICE_LABEL = "disagg.dev/service"
POD_SELECTOR = "app.kubernetes.io/managed-by=disagg,disagg.dev/role in (prefill,decode)"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
FLEET_LABEL = "__meta_disagg_fleet"
"""Label of our groups in the targets file (the owning process id); Prometheus drops `__` labels."""

DEFAULT_PROMPT_TOKENS = 1024
DEFAULT_OUTPUT_TOKENS = 1024
DEFAULT_BASE_SHARE = 0.6
DEFAULT_DT = 0.25
DEFAULT_CONTROL_PORT = 18090
MAX_QUEUE = 20_000
"""Requests a pod queues at most (prefill queue, decode waiting list); more are dropped and counted."""
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KV_WATERMARK = 0.01
"""Share of the KV cache admission keeps free (vLLM's default watermark)."""
MAX_RPS = 10_000.0
"""Highest offered rate (requests/s) a load may ask for, so that one step's arrivals stay bounded."""
MAX_CATCH_UP_TICKS = 8
"""A starved ticker runs at most this many missed steps at once, then drops the rest."""


def _default_traces_dir() -> Path:
    env = os.environ.get("DISAGG_TRACES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "traces"


def _default_targets_file() -> Path:
    root = os.environ.get("DISAGG_CLUSTER_DIR") or "/tmp/disagg-cluster"
    return Path(root) / "prometheus" / "engines.json"


def is_loopback(address: str) -> bool:
    """Whether `address` is an IPv4 loopback address (127.0.0.0/8)."""
    try:
        return ipaddress.ip_address(address) in LOOPBACK
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------
# metric names and histogram buckets, per engine


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
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100, 0.200,
    0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000,
)
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400,
)


@dataclass(frozen=True)
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

    def names(self) -> list[str]:
        """Every family name, as it appears after `# TYPE`."""
        names = [self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
                 self.requests, self.ttft, self.itl, self.e2e]
        optional = (self.preemptions, self.queue_time, self.prefill_time, self.decode_time)
        return names + [n for n in optional if n is not None]


def _engine_metrics(kind: str) -> EngineMetrics:
    """Names from the engine catalogue (the autoscaler's source), plus the few extra families engines export."""
    names = ENGINES[kind].metrics
    if kind == "vllm":
        return EngineMetrics(
            kind=kind,
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
    if kind == "sglang":
        return EngineMetrics(
            kind=kind,
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
    raise ValueError(f"unknown engine kind {kind!r}")


ENGINE_METRICS: dict[str, EngineMetrics] = {kind: _engine_metrics(kind) for kind in ENGINES}


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

    __slots__ = ("decode_time", "dropped", "e2e", "generation_tokens", "itl", "preemptions", "prefill_time",
                 "prompt_tokens", "queue_time", "requests", "ttft")

    def __init__(self, metrics: EngineMetrics) -> None:
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


# ----------------------------------------------------------------------------------------------------
# engines


@dataclass(slots=True)
class Request:
    """One request as an engine sees it."""

    arrival: float
    """When it reached the service (the router), simulation seconds."""
    prompt: int
    output: int
    received: float
    """When it reached this engine."""
    ready_at: float = 0.0
    """Decode: when its KV cache is in place (prefill end + KV transfer)."""
    forward: bool = True
    """Prefill: hand over to the decode pool when done (False for requests of the pod's own HTTP API)."""
    started: bool = False
    """Decode: already admitted once (a preempted request coming back is not counted again)."""
    first_token: float | None = None
    """Decode: when its first token came out."""


@dataclass(frozen=True)
class EngineConfig:
    """What one simulated engine replica is: engine kind, role, model and accelerators."""

    kind: str
    role: Role
    model: ModelShape
    accelerator: Accelerator
    tensor_parallel: int
    kv_capacity_tokens: float
    kv_link_bytes_per_s: float
    """Prefill to decode bandwidth of this service's KV hand-off."""
    efficiency: Efficiency = DEFAULT_EFFICIENCY
    max_num_seqs: int = 1024
    """vLLM's default on 80+ GB accelerators."""
    max_batched_tokens: int = 8192
    """Prompt tokens one prefill batch holds (vLLM's max_num_batched_tokens default for the API server)."""
    max_queue: int = MAX_QUEUE


def engine_config(
    kind: str,
    role: Role,
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    *,
    link_bytes_per_s: float,
    efficiency: Efficiency = DEFAULT_EFFICIENCY,
) -> EngineConfig:
    return EngineConfig(
        kind=kind,
        role=role,
        model=model,
        accelerator=accelerator,
        tensor_parallel=tensor_parallel,
        kv_capacity_tokens=kv_capacity_tokens(model, accelerator, tensor_parallel, efficiency),
        kv_link_bytes_per_s=link_bytes_per_s,
        efficiency=efficiency,
    )


@dataclass(slots=True)
class _Prefilling:
    request: Request
    start: float
    finish: float
    service: float


class PrefillEngine:
    """A prefill replica: one FIFO served at the roofline prefill time of each prompt."""

    role: Role = "prefill"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.metrics = ENGINE_METRICS[config.kind]
        self.stats = EngineStats(self.metrics)
        self.queue: deque[_Prefilling] = deque()
        self.transfers: deque[tuple[float, int]] = deque()
        """(time the decode side has pulled it, tokens): KV held after prefill until the hand-off."""
        self.free_at = 0.0
        self.now = 0.0
        self._service: dict[int, float] = {}
        self._transfer: dict[int, float] = {}

    def service_seconds(self, prompt: int) -> float:
        cached = self._service.get(prompt)
        if cached is None:
            c = self.config
            cached = prefill_seconds(c.model, c.accelerator, c.tensor_parallel, float(prompt), c.efficiency)
            if len(self._service) < 4096:
                self._service[prompt] = cached
        return cached

    def transfer_seconds(self, prompt: int) -> float:
        cached = self._transfer.get(prompt)
        if cached is None:
            c = self.config
            cached = kv_transfer_seconds(c.model, float(prompt), c.kv_link_bytes_per_s, c.efficiency)
            if len(self._transfer) < 4096:
                self._transfer[prompt] = cached
        return cached

    def submit(self, request: Request) -> bool:
        """Queue a request that arrived at `request.received`; False (dropped) when the queue is full."""
        if len(self.queue) >= self.config.max_queue:
            self.stats.dropped += 1
            return False
        service = self.service_seconds(request.prompt)
        start = max(self.free_at, request.received)
        self.free_at = start + service
        self.queue.append(_Prefilling(request, start, self.free_at, service))
        return True

    def step(self, t: float, dt: float) -> list[Request]:
        """Advance to t + dt; the requests whose prefill finished, addressed to the decode pool."""
        end = t + dt
        handed: list[Request] = []
        stats = self.stats
        while self.queue and self.queue[0].finish <= end:
            item = self.queue.popleft()
            r = item.request
            transfer = self.transfer_seconds(r.prompt)
            ttft = item.finish - r.received + transfer
            stats.ttft.observe(ttft)
            stats.e2e.observe(ttft)
            stats.queue_time.observe(item.start - r.received)
            stats.prefill_time.observe(item.service)
            stats.decode_time.observe(0.0)
            stats.prompt_tokens += r.prompt
            stats.generation_tokens += 1  # P/D: the prefill engine samples the first token only
            stats.requests += 1
            self.transfers.append((item.finish + transfer, r.prompt))
            if r.forward:
                handed.append(Request(r.arrival, r.prompt, r.output, received=item.finish,
                                      ready_at=item.finish + transfer))
        while self.transfers and self.transfers[0][0] <= end:
            self.transfers.popleft()
        self.now = end
        return handed

    def gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage): the head of the queue up to one batch runs, the rest waits."""
        running = tokens = 0
        c = self.config
        for item in self.queue:
            prompt = item.request.prompt
            if running >= c.max_num_seqs or (running > 0 and tokens + prompt > c.max_batched_tokens):
                break
            running += 1
            tokens += prompt
        held = tokens + sum(t for _, t in self.transfers)
        usage = min(1.0, held / c.kv_capacity_tokens) if c.kv_capacity_tokens > 0 else 0.0
        return running, len(self.queue) - running, usage


@dataclass(slots=True)
class _Sequence:
    request: Request
    start_clock: int
    admitted: float
    finish_clock: int
    active: bool = True


class DecodeEngine:
    """A decode replica: continuous batching within the KV cache, as vLLM schedules it.

    `clock` counts engine steps since the replica started; every running sequence gains one token per
    step, so a sequence admitted at clock c with n output tokens finishes at clock c + n, and the KV
    tokens held are sum(prompt) + batch x clock - sum(start clock), all kept incrementally.

    Admission (FCFS): the head of the waiting list joins the batch when its KV has arrived, the batch is
    below max_num_seqs, and its prompt plus the growth of the batch over one simulation step fit below
    the KV watermark. When the running sequences outgrow the cache anyway, the youngest are preempted:
    their KV is freed and they go back to the front of the waiting list, to be recomputed (prompt plus
    the tokens generated so far) when there is room again.
    """

    role: Role = "decode"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.metrics = ENGINE_METRICS[config.kind]
        self.stats = EngineStats(self.metrics)
        self.pending: deque[Request] = deque()
        self.batch: list[tuple[int, int, _Sequence]] = []
        """Heap of (finish clock, admission number, sequence); preempted sequences stay until popped."""
        self.order: deque[_Sequence] = deque()
        """Sequences in admission order (the youngest are preempted first); finished ones are skipped."""
        self.first_token_due: list[_Sequence] = []
        self.active = 0
        self.clock = 0
        self.phase = 0.0
        """Fraction of an engine step already done at the start of the next simulation step."""
        self.admitted = 0
        self.sum_prompt = 0
        self.sum_start = 0
        c = config
        self.min_step_seconds = decode_step_seconds(c.model, c.accelerator, c.tensor_parallel, 1.0, 1.0,
                                                    c.efficiency)
        self.step_seconds = 0.0
        self.tokens_per_s = 0.0
        self.now = 0.0

    @property
    def running(self) -> int:
        return self.active

    def held_tokens(self) -> int:
        return self.sum_prompt + self.active * self.clock - self.sum_start

    def submit(self, request: Request) -> bool:
        if len(self.pending) >= self.config.max_queue:
            self.stats.dropped += 1
            return False
        self.pending.append(request)
        return True

    def _admit(self, t: float, dt: float) -> None:
        c = self.config
        capacity = c.kv_capacity_tokens
        limit = capacity * (1.0 - KV_WATERMARK)
        growth = 1 + int(dt / max(self.step_seconds, self.min_step_seconds))  # tokens per sequence this step
        stats = self.stats
        end = t + dt
        while self.pending:
            r = self.pending[0]
            if r.ready_at >= end:
                break
            if r.prompt + r.output > capacity:  # can never fit: the engine rejects it
                self.pending.popleft()
                stats.dropped += 1
                continue
            held = self.held_tokens()
            if self.active >= c.max_num_seqs or held + r.prompt + (self.active + 1) * growth > limit:
                break
            self.pending.popleft()
            admitted = max(t, r.ready_at)
            sequence = _Sequence(r, self.clock, admitted, self.clock + r.output)
            self.admitted += 1
            heapq.heappush(self.batch, (sequence.finish_clock, self.admitted, sequence))
            self.order.append(sequence)
            self.active += 1
            self.sum_prompt += r.prompt
            self.sum_start += self.clock
            if not r.started:  # first admission (not a preempted request coming back)
                r.started = True
                stats.prompt_tokens += r.prompt
                stats.queue_time.observe(admitted - r.ready_at)
            if r.first_token is None:
                self.first_token_due.append(sequence)

    def _retire(self, sequence: _Sequence) -> None:
        sequence.active = False
        self.active -= 1
        self.sum_prompt -= sequence.request.prompt
        self.sum_start -= sequence.start_clock

    def _preempt(self, t: float, steps: int) -> None:
        """Preempt the youngest sequences until the batch's growth over `steps` fits the KV cache."""
        capacity = self.config.kv_capacity_tokens
        while self.active > 1 and self.order and self.held_tokens() + self.active * steps > capacity:
            sequence = self.order.pop()
            if not sequence.active:
                continue
            self._retire(sequence)
            if sequence in self.first_token_due:
                self.first_token_due.remove(sequence)
            r = sequence.request
            generated = self.clock - sequence.start_clock
            self.pending.appendleft(Request(
                r.arrival, r.prompt + generated, sequence.finish_clock - self.clock, received=r.received,
                ready_at=t, started=True, first_token=r.first_token,
            ))
            self.stats.preemptions += 1
        if len(self.order) > 2 * self.active + 64:
            self.order = deque(s for s in self.order if s.active)

    def step(self, t: float, dt: float) -> None:
        """Advance to t + dt: admit what fits, run the engine steps that fit in dt, retire finished requests."""
        self._admit(t, dt)
        self.now = t + dt
        if self.active == 0:
            self.phase = 0.0
            self.step_seconds = 0.0
            self.tokens_per_s = 0.0
            return
        c = self.config
        n = self.active
        context = max(1.0, (self.sum_prompt + n * self.clock - self.sum_start) / n)
        step = decode_step_seconds(c.model, c.accelerator, c.tensor_parallel, float(n), context, c.efficiency)
        self.step_seconds = step
        total = self.phase + dt / step
        steps = int(total)
        if steps == 0:
            self.phase = total
            self.tokens_per_s = 0.0
            return
        self._preempt(t, steps)
        n = self.active
        first_done = t + (1.0 - self.phase) * step
        self.phase = total - steps
        stats = self.stats
        firsts = len(self.first_token_due)
        for sequence in self.first_token_due:
            r = sequence.request
            r.first_token = max(first_done, sequence.admitted + step)
            stats.ttft.observe(r.first_token - r.received)
            stats.prefill_time.observe(r.first_token - sequence.admitted)
        self.first_token_due.clear()
        target = self.clock + steps
        generated = finished = 0
        while self.batch and self.batch[0][0] <= target:
            finish_clock, _, sequence = heapq.heappop(self.batch)
            if not sequence.active:
                continue  # preempted earlier
            r = sequence.request
            tokens = finish_clock - self.clock
            generated += tokens
            done = first_done + (tokens - 1) * step
            stats.e2e.observe(done - r.received)
            stats.decode_time.observe(max(0.0, done - (r.first_token if r.first_token is not None else done)))
            stats.requests += 1
            self._retire(sequence)
            finished += 1
        generated += (n - finished) * steps
        stats.generation_tokens += generated
        stats.itl.observe(step, generated - firsts)
        self.clock = target
        self.tokens_per_s = generated / dt
        while self.order and not self.order[0].active:
            self.order.popleft()

    def gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage)."""
        capacity = self.config.kv_capacity_tokens
        usage = min(1.0, self.held_tokens() / capacity) if capacity > 0 else 0.0
        return self.active, len(self.pending), usage


Engine = PrefillEngine | DecodeEngine


# ----------------------------------------------------------------------------------------------------
# exposition


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
    histograms: list[tuple[str | None, Histogram]] = [
        (metrics.ttft, stats.ttft), (metrics.itl, stats.itl), (metrics.e2e, stats.e2e),
        (metrics.queue_time, stats.queue_time), (metrics.prefill_time, stats.prefill_time),
        (metrics.decode_time, stats.decode_time),
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


# ----------------------------------------------------------------------------------------------------
# offered load


class LoadError(ValueError):
    """A load specification that cannot be used."""


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `1.5m`, `2h`, `500ms` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise LoadError(f"bad duration {text!r} (expected e.g. 30s, 2m, 1h)")
    value = float(match.group(1))
    unit = match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def parse_rate(text: str) -> tuple[float, bool]:
    """`8` (requests/s) or `4x` (times the base load) -> (value, is_multiple)."""
    raw = text.strip()
    multiple = raw.lower().endswith("x")
    number = raw[:-1] if multiple else raw
    try:
        value = float(number)
    except ValueError:
        raise LoadError(
            f"bad rate {text!r} (expected requests/s like 8 or a multiple of the base load like 4x)"
        ) from None
    if not math.isfinite(value) or value < 0 or value > MAX_RPS:
        raise LoadError(f"bad rate {text!r}: must be a number in [0, {MAX_RPS}]")
    return value, multiple


@dataclass(frozen=True)
class LoadSpec:
    """An offered load as written on the command line or sent to the control API."""

    steps: tuple[tuple[float, float, bool], ...] = ((0.0, 1.0, True),)
    """(seconds from the load's start, rate, rate is a multiple of the base load); rate 0 before the first."""
    trace: str | None = None
    time_scale: float = 1.0
    prompt_tokens: int | None = None
    output_tokens: int | None = None

    def text(self) -> str:
        if self.trace is not None:
            return f"trace:{self.trace}:{self.time_scale:g}"

        def rate(value: float, multiple: bool) -> str:
            return f"{value:g}x" if multiple else f"{value:g}"

        if len(self.steps) == 1 and self.steps[0][0] == 0.0:
            return rate(self.steps[0][1], self.steps[0][2])
        return "steps:" + ",".join(f"{at:g}s@{rate(v, m)}" for at, v, m in self.steps)


def parse_load_spec(text: str) -> LoadSpec:
    """`8`, `4x`, `steps:0s@2,60s@8,120s@2`, `trace:PATH[:time-scale]`."""
    text = text.strip()
    if text.startswith("steps:"):
        steps: list[tuple[float, float, bool]] = []
        for item in text.removeprefix("steps:").split(","):
            if "@" not in item:
                raise LoadError(f"bad step {item!r} in {text!r} (expected TIME@RATE, e.g. 60s@8)")
            at, rate = item.split("@", 1)
            value, multiple = parse_rate(rate)
            steps.append((parse_duration(at), value, multiple))
        if not steps or any(b[0] <= a[0] for a, b in itertools.pairwise(steps)):
            raise LoadError(f"steps in {text!r} must be given in increasing time order")
        return LoadSpec(steps=tuple(steps))
    if text.startswith("trace:"):
        rest = text.removeprefix("trace:")
        path, scale = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                path = head
            except ValueError:
                pass
        if not path:
            raise LoadError(f"bad trace load {text!r} (expected trace:PATH[:time-scale])")
        if not math.isfinite(scale) or scale <= 0:
            raise LoadError(f"bad time scale in {text!r}: must be > 0")
        return LoadSpec(steps=(), trace=path, time_scale=scale)
    value, multiple = parse_rate(text)
    return LoadSpec(steps=((0.0, value, multiple),))


_SERVICE_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)/([a-z0-9]([-.a-z0-9]*[a-z0-9])?)$")


def parse_service_key(text: str) -> tuple[str, str]:
    match = _SERVICE_KEY.match(text.strip())
    if not match:
        raise LoadError(f"bad service {text!r} (expected NAMESPACE/NAME)")
    return match.group(1), match.group(3)


def parse_load_arg(text: str) -> tuple[tuple[str, str], LoadSpec]:
    """`NAMESPACE/NAME=SPEC` -> ((namespace, name), spec)."""
    service, sep, spec = text.partition("=")
    if not sep:
        raise LoadError(f"bad --load {text!r} (expected NAMESPACE/NAME=SPEC)")
    return parse_service_key(service), parse_load_spec(spec)


def resolve_trace(path: str, traces_dir: Path) -> Path:
    """A trace path as given, or relative to the shared traces directory."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    if not candidate.is_absolute() and (traces_dir / candidate).is_file():
        return traces_dir / candidate
    raise LoadError(f"trace {path!r} not found (looked in the current directory and {traces_dir})")


@dataclass(frozen=True)
class BaseLoad:
    """A service's base load and the single-replica capacities it derives from."""

    rps: float
    prompt_tokens: int
    output_tokens: int
    prefill_capacity_rps: float
    """Requests/s one prefill replica serves within the TTFT target (as the autoscaler sizes it)."""
    decode_capacity_rps: float
    """Requests/s one decode replica serves within the ITL target and its KV cache."""


class OfferedLoad:
    """A LoadSpec made concrete for one service: arrivals per simulation step."""

    def __init__(
        self,
        spec: LoadSpec,
        base: BaseLoad,
        started: float,
        *,
        process: str = "poisson",
        workload: Workload | None = None,
    ) -> None:
        self.spec = spec
        self.base = base
        self.started = started
        self.process = process
        self.prompt_tokens = spec.prompt_tokens or base.prompt_tokens
        self.output_tokens = spec.output_tokens or base.output_tokens
        self.steps = [(at, min(MAX_RPS, value * base.rps if multiple else value)) for at, value, multiple in spec.steps]
        self.workload = workload
        self._step_times = [at for at, _ in self.steps]
        self._next_at: float | None = None

    def rps_at(self, t: float) -> float:
        """Offered requests/s at simulation time t (the trace's mean rate for a replay)."""
        if self.workload is not None:
            return self.workload.mean_rate()
        index = bisect.bisect_right(self._step_times, t - self.started) - 1
        return self.steps[index][1] if index >= 0 else 0.0

    def arrivals(self, t0: float, t1: float, rng: np.random.Generator) -> list[tuple[float, int, int]]:
        """(time, prompt tokens, output tokens) of the requests arriving in [t0, t1), in time order."""
        if self.workload is not None:
            return self._trace_arrivals(t0, t1)
        rate = self.rps_at(t0)
        dt = t1 - t0
        if rate <= 0 or dt <= 0:
            self._next_at = None
            return []
        if self.process == "uniform":
            gap = 1.0 / rate
            if self._next_at is None or self._next_at < t0 or self._next_at > t0 + gap:
                self._next_at = t0
            times = []
            while self._next_at < t1:  # at most MAX_RPS x dt + 1 iterations
                times.append(self._next_at)
                self._next_at += gap
        else:
            n = int(rng.poisson(rate * dt))
            times = sorted((t0 + dt * float(u)) for u in rng.random(n)) if n else []
        return [(x, self.prompt_tokens, self.output_tokens) for x in times]

    def _trace_arrivals(self, t0: float, t1: float) -> list[tuple[float, int, int]]:
        w = self.workload
        assert w is not None
        span = w.duration_s
        if span <= 0 or w.requests == 0:
            return []
        out: list[tuple[float, int, int]] = []
        rel = max(0.0, t0 - self.started)
        end = max(0.0, t1 - self.started)
        for _ in range(4):  # a step spans at most a few laps of even a tiny trace; bounded on purpose
            if rel >= end:
                break
            lap = math.floor(rel / span)
            offset = lap * span
            window_end = min(end, offset + span)
            low, high = np.searchsorted(w.arrivals, [rel - offset, window_end - offset])
            for i in range(int(low), int(high)):
                out.append((self.started + offset + float(w.arrivals[i]), int(w.prompt_tokens[i]),
                            int(w.output_tokens[i])))
            rel = window_end
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec.text(),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "arrivals": self.process,
            "started_at": round(self.started, 3),
            "base_rps": round(self.base.rps, 4),
        }
        if self.workload is not None:
            out["trace"] = {"requests": self.workload.requests, "duration_s": round(self.workload.duration_s, 1),
                            "mean_rps": round(self.workload.mean_rate(), 4)}
        else:
            out["steps"] = [{"at_s": at, "rps": round(rps, 4)} for at, rps in self.steps]
        return out


def _model_of(spec: InferenceServiceSpec) -> ModelShape:
    if spec.model.architecture is not None:
        return from_architecture(spec.model.architecture, spec.model.name)
    return builtin_model(spec.model.name)


def _accelerator_of(spec: InferenceServiceSpec, role: Role, catalog: AcceleratorCatalog) -> Accelerator:
    pool = getattr(spec, role)
    if pool.accelerator.type is None:
        raise LoadError(f"spec.{role}.accelerator has no catalogue type (resourceName only): no capacity model")
    accelerator = catalog.get(pool.accelerator.type)
    if accelerator is None:
        raise LoadError(f"spec.{role}.accelerator.type {pool.accelerator.type!r} is not in the catalogue")
    return accelerator


def _largest_rate(fits: Callable[[float], bool], start: float) -> float:
    """Largest rate for which `fits` holds (monotone), by doubling then bisection; bounded iterations."""
    low, high = 0.0, max(start, 1e-3)
    for _ in range(40):
        if not fits(high):
            break
        low, high = high, high * 2.0
    else:
        return low
    for _ in range(40):
        mid = (low + high) / 2.0
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def base_load(
    spec: InferenceServiceSpec,
    catalog: AcceleratorCatalog,
    *,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    share: float = DEFAULT_BASE_SHARE,
    kv_over_rdma: bool = True,
    settings: PolicySettings | None = None,
    efficiency: Efficiency = DEFAULT_EFFICIENCY,
) -> BaseLoad:
    """`share` of what one prefill and one decode replica serve within the SLO, by the autoscaler's sizing.

    Prefill: the highest rate `size_prefill` still sizes at one replica, with the TTFT budget the policy
    uses (target fraction of the TTFT minus the KV hand-off and one decode step) and its headroom.
    Decode: the same with `size_decode` at the policy's ITL target. The base is `share` of the smaller.
    """
    settings = settings or PolicySettings()
    model = _model_of(spec)
    prefill_acc = _accelerator_of(spec, "prefill", catalog)
    decode_acc = _accelerator_of(spec, "decode", catalog)
    p_tp, d_tp = spec.prefill.parallelism.tensor, spec.decode.parallelism.tensor
    prompt, output = float(prompt_tokens), float(output_tokens)
    ttft = spec.slo.ttft_ms / 1000.0
    itl = spec.slo.itl_ms / 1000.0
    handoff = kv_transfer_seconds(model, prompt, kv_link_bytes_per_s(p_tp, d_tp, kv_over_rdma), efficiency)
    budget = max(ttft * settings.target_fraction - handoff - itl, ttft * 0.25)
    service = prefill_seconds(model, prefill_acc, p_tp, prompt, efficiency)

    def prefill_fits(rate: float) -> bool:
        sizing = size_prefill(
            model, prefill_acc, p_tp, prompt_tokens_per_s=rate * prompt, mean_prompt_tokens=prompt,
            ttft_budget_s=budget, percentile=spec.slo.percentile, headroom=settings.prefill_headroom,
            max_replicas=2, eff=efficiency,
        )
        return sizing.replicas <= 1 and sizing.predicted_ttft_s <= budget

    def decode_fits(rate: float) -> bool:
        sizing = size_decode(
            model, decode_acc, d_tp, generation_tokens_per_s=rate * output, concurrent_sequences=0.0,
            mean_prompt_tokens=prompt, mean_output_tokens=output, itl_target_s=itl * settings.target_fraction,
            headroom=settings.decode_headroom, eff=efficiency,
        )
        return sizing.replicas <= 1

    prefill_rps = _largest_rate(prefill_fits, 0.5 / service) if service > 0 else 0.0
    decode_rps = _largest_rate(decode_fits, 1.0)
    rps = share * min(prefill_rps, decode_rps)
    return BaseLoad(rps, prompt_tokens, output_tokens, prefill_rps, decode_rps)


# ----------------------------------------------------------------------------------------------------
# the fleet (pure: no I/O, time advances only in tick())


@dataclass(frozen=True)
class PodObservation:
    """What the fleet needs to know about one pod."""

    uid: str
    namespace: str
    name: str
    service: str
    role: Role
    ip: str
    ready: bool
    deleting: bool = False


class SimPod:
    """One served pod: its engine, its labels and its cached /metrics page."""

    def __init__(self, pod: PodObservation, service: ServiceSim, engine: Engine, port: int) -> None:
        self.pod = pod
        self.service = service
        self.engine = engine
        self.port = port
        self.labels: dict[str, str] = {
            "namespace": pod.namespace,
            "pod": pod.name,
            "disagg_service": pod.service,
            "disagg_role": pod.role,
            "model_name": service.spec.model.name,
        }
        self.label_text = label_text(list(self.labels.items()) + list(engine.metrics.constant_labels))
        self._page: tuple[int, str] | None = None
        self.started = service.fleet.time

    @property
    def key(self) -> tuple[str, int]:
        return self.pod.ip, self.port

    def metrics_page(self) -> str:
        tick = self.service.fleet.ticks
        if self._page is None or self._page[0] != tick:
            self._page = (tick, render_metrics(self.engine.metrics, self.label_text, self.engine.gauges(),
                                               self.engine.stats))
        return self._page[1]

    def summary(self) -> dict[str, Any]:
        running, waiting, kv = self.engine.gauges()
        stats = self.engine.stats
        out: dict[str, Any] = {
            "namespace": self.pod.namespace,
            "pod": self.pod.name,
            "service": self.pod.service,
            "role": self.pod.role,
            "address": f"{self.pod.ip}:{self.port}",
            "engine": self.engine.config.kind,
            "accelerator": f"{self.engine.config.accelerator.name} x{self.engine.config.tensor_parallel}",
            "running": running,
            "waiting": waiting,
            "kv_usage": round(kv, 4),
            "kv_capacity_tokens": int(self.engine.config.kv_capacity_tokens),
            "prompt_tokens_total": stats.prompt_tokens,
            "generation_tokens_total": stats.generation_tokens,
            "requests_total": stats.requests,
            "dropped_total": stats.dropped,
            "preemptions_total": stats.preemptions,
            "ttft_p90_s": _round(stats.ttft.quantile(0.9)),
        }
        if isinstance(self.engine, DecodeEngine):
            out["itl_p90_s"] = _round(stats.itl.quantile(0.9))
            out["step_s"] = round(self.engine.step_seconds, 5)
            out["generation_tokens_per_s"] = round(self.engine.tokens_per_s, 1)
        return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


class ServiceSim:
    """One InferenceService: its engines' configuration, its offered load and its Ready pods."""

    def __init__(self, fleet: FleetSim, namespace: str, name: str, spec: InferenceServiceSpec,
                 raw_spec: Mapping[str, Any]) -> None:
        self.fleet = fleet
        self.namespace = namespace
        self.name = name
        self.pods: dict[Role, dict[str, SimPod]] = {"prefill": {}, "decode": {}}
        self._order: dict[Role, list[SimPod]] = {"prefill": [], "decode": []}
        self._next: dict[Role, int] = {"prefill": 0, "decode": 0}
        seed = [fleet.seed, zlib.crc32(f"{namespace}/{name}".encode())]
        self.rng = np.random.default_rng(seed)
        self.offered = 0
        self.unserved = 0
        self.ever_served = False
        self.spec = spec
        self.raw_spec: Mapping[str, Any] = {}
        self.configure(spec, raw_spec)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def configure(self, spec: InferenceServiceSpec, raw_spec: Mapping[str, Any]) -> None:
        """(Re)compute engine configurations and the base load; raises LoadError/ModelConfigError."""
        fleet = self.fleet
        model = _model_of(spec)
        link = kv_link_bytes_per_s(spec.prefill.parallelism.tensor, spec.decode.parallelism.tensor,
                                   fleet.kv_over_rdma)
        configs = {
            role: engine_config(spec.engine.kind, role, model, _accelerator_of(spec, role, fleet.catalog),
                                getattr(spec, role).parallelism.tensor, link_bytes_per_s=link,
                                efficiency=fleet.efficiency)
            for role in ROLES
        }
        base = base_load(spec, fleet.catalog, prompt_tokens=fleet.prompt_tokens, output_tokens=fleet.output_tokens,
                         share=fleet.base_share, kv_over_rdma=fleet.kv_over_rdma, efficiency=fleet.efficiency)
        self.spec = spec
        self.raw_spec = dict(raw_spec)
        self.configs: dict[Role, EngineConfig] = configs
        self.base = base
        self.load = fleet.make_load(self.key, base)

    def add(self, pod: SimPod) -> None:
        role = pod.pod.role
        self.pods[role][pod.pod.name] = pod
        self.ever_served = True
        self._order[role] = [self.pods[role][n] for n in sorted(self.pods[role])]

    def remove(self, pod: SimPod) -> None:
        role = pod.pod.role
        if self.pods[role].pop(pod.pod.name, None) is not None:
            self._order[role] = [self.pods[role][n] for n in sorted(self.pods[role])]

    def route(self, role: Role, request: Request) -> bool:
        """Round-robin over the role's Ready pods; False when there is none or its queue is full."""
        order = self._order[role]
        if not order:
            return False
        index = self._next[role] % len(order)
        self._next[role] = index + 1
        return order[index].engine.submit(request)

    def tick(self, t0: float, dt: float) -> None:
        if not self.ever_served:  # nothing offered before the first pod is Ready (start-up, not an outage)
            return
        for when, prompt, output in self.load.arrivals(t0, t0 + dt, self.rng):
            self.offered += 1
            if not self.route("prefill", Request(when, prompt, output, received=when)):
                self.unserved += 1
        for pod in self._order["prefill"]:
            assert isinstance(pod.engine, PrefillEngine)
            for handed in pod.engine.step(t0, dt):
                if not self.route("decode", handed):
                    self.unserved += 1
        for pod in self._order["decode"]:
            pod.engine.step(t0, dt)

    def summary(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "engine": self.spec.engine.kind,
            "model": self.spec.model.name,
            "rps_now": round(self.load.rps_at(self.fleet.time), 4),
            "load": self.load.describe(),
            "base": {
                "rps": round(self.base.rps, 4),
                "prefill_capacity_rps": round(self.base.prefill_capacity_rps, 4),
                "decode_capacity_rps": round(self.base.decode_capacity_rps, 4),
                "prompt_tokens": self.base.prompt_tokens,
                "output_tokens": self.base.output_tokens,
            },
            "pods": {role: sorted(self.pods[role]) for role in ROLES},
            "offered_requests": self.offered,
            "unserved_requests": self.unserved,
        }


class FleetSim:
    """Every simulated service and pod; time advances by `dt` per `tick()`. No I/O."""

    def __init__(
        self,
        catalog: AcceleratorCatalog,
        *,
        seed: int = 0,
        dt: float = DEFAULT_DT,
        prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        base_share: float = DEFAULT_BASE_SHARE,
        arrivals: str = "poisson",
        kv_over_rdma: bool = True,
        default_load: LoadSpec | None = None,
        loads: Mapping[tuple[str, str], LoadSpec] | None = None,
        traces_dir: Path | None = None,
        efficiency: Efficiency = DEFAULT_EFFICIENCY,
    ) -> None:
        if not 0.01 <= dt <= 5.0:
            raise ValueError(f"dt must be within [0.01, 5] s, got {dt}")
        if arrivals not in ("poisson", "uniform"):
            raise ValueError(f"arrivals must be poisson or uniform, got {arrivals!r}")
        self.catalog = catalog
        self.seed = seed
        self.dt = dt
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.base_share = base_share
        self.arrivals = arrivals
        self.kv_over_rdma = kv_over_rdma
        self.efficiency = efficiency
        self.default_load = default_load or LoadSpec()
        self.loads: dict[tuple[str, str], LoadSpec] = dict(loads or {})
        self.load_set_at: dict[tuple[str, str], float] = {}
        self.traces_dir = traces_dir or _default_traces_dir()
        self._workloads: dict[tuple[str, float], Workload] = {}
        self.time = 0.0
        self.ticks = 0
        self.services: dict[tuple[str, str], ServiceSim] = {}
        self.unsupported: dict[tuple[str, str], str] = {}
        self.pods: dict[str, SimPod] = {}
        for spec in [self.default_load, *self.loads.values()]:
            self.workload(spec)  # fail fast on a missing or bad trace

    # -- loads

    def workload(self, spec: LoadSpec) -> Workload | None:
        if spec.trace is None:
            return None
        key = (spec.trace, spec.time_scale)
        if key not in self._workloads:
            path = resolve_trace(spec.trace, self.traces_dir)
            try:
                self._workloads[key] = scale_time(read_trace(path), spec.time_scale)
            except TraceError as error:
                raise LoadError(str(error)) from None
        return self._workloads[key]

    def make_load(self, key: tuple[str, str], base: BaseLoad) -> OfferedLoad:
        spec = self.loads.get(key, self.default_load)
        started = self.load_set_at.get(key, 0.0)
        return OfferedLoad(spec, base, started, process=self.arrivals, workload=self.workload(spec))

    def set_load(self, namespace: str, name: str, spec: LoadSpec | None) -> dict[str, Any]:
        """Set (None: reset to the default) a service's load from the next step on; its schedule starts now."""
        key = (namespace, name)
        if spec is None:
            self.loads.pop(key, None)
        else:
            self.workload(spec)
            self.loads[key] = spec
        self.load_set_at[key] = self.time
        service = self.services.get(key)
        if service is not None:
            service.load = self.make_load(key, service.base)
            return {"service": f"{namespace}/{name}", "known": True, **service.load.describe()}
        return {"service": f"{namespace}/{name}", "known": False, "spec": (spec or self.default_load).text()}

    # -- services and pods

    def upsert_service(self, namespace: str, name: str, raw_spec: Mapping[str, Any]) -> str | None:
        """Add or update a service from its spec; the reason when it cannot be simulated, else None."""
        key = (namespace, name)
        existing = self.services.get(key)
        if existing is not None and existing.raw_spec == raw_spec:
            return None
        try:
            spec = InferenceServiceSpec.model_validate(dict(raw_spec))
            if existing is None:
                self.services[key] = ServiceSim(self, namespace, name, spec, raw_spec)
            else:
                existing.configure(spec, raw_spec)
        except (ValidationError, LoadError, ModelConfigError, ValueError) as error:
            reason = f"cannot simulate {namespace}/{name}: {str(error).splitlines()[0]}"
            self.unsupported[key] = reason
            if existing is not None:
                self.remove_service(namespace, name)
                self.unsupported[key] = reason
            return reason
        self.unsupported.pop(key, None)
        return None

    def remove_service(self, namespace: str, name: str) -> list[str]:
        """Forget a service and its pods; the uids of the pods removed."""
        key = (namespace, name)
        self.unsupported.pop(key, None)
        service = self.services.pop(key, None)
        if service is None:
            return []
        removed = [uid for uid, pod in self.pods.items() if pod.service is service]
        for uid in removed:
            del self.pods[uid]
        return removed

    def add_pod(self, pod: PodObservation) -> SimPod:
        """Start simulating a Ready pod (its service must be known)."""
        service = self.services[(pod.namespace, pod.service)]
        existing = self.pods.get(pod.uid)
        if existing is not None:
            return existing
        config = service.configs[pod.role]
        engine: Engine = PrefillEngine(config) if pod.role == "prefill" else DecodeEngine(config)
        engine.now = self.time
        sim_pod = SimPod(pod, service, engine, service.spec.engine.port)
        service.add(sim_pod)
        self.pods[pod.uid] = sim_pod
        return sim_pod

    def remove_pod(self, uid: str) -> SimPod | None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            pod.service.remove(pod)
        return pod

    def submit_external(self, pod: SimPod, prompt_tokens: int, output_tokens: int) -> None:
        """A request sent to the pod's own OpenAI API (e.g. by a real router) joins its engine's queue."""
        now = self.time
        if isinstance(pod.engine, PrefillEngine):
            pod.engine.submit(Request(now, prompt_tokens, output_tokens, received=now, forward=False))
        else:
            pod.engine.submit(Request(now, prompt_tokens, output_tokens, received=now, ready_at=now))

    # -- time

    def tick(self) -> None:
        t0 = self.time
        for key in sorted(self.services):
            self.services[key].tick(t0, self.dt)
        self.ticks += 1
        self.time = self.ticks * self.dt

    def run(self, seconds: float) -> None:
        """Advance by `seconds` (tests and offline use)."""
        for _ in range(max(0, round(seconds / self.dt))):
            self.tick()

    # -- reports

    def load_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in sorted(set(self.services) | set(self.loads)):
            service = self.services.get(key)
            name = f"{key[0]}/{key[1]}"
            if service is not None:
                out[name] = {"known": True, "rps_now": round(service.load.rps_at(self.time), 4),
                             **service.load.describe()}
            else:
                out[name] = {"known": False, "spec": self.loads[key].text()}
        return out

    def state(self) -> dict[str, Any]:
        return {
            "time_s": round(self.time, 3),
            "ticks": self.ticks,
            "dt_s": self.dt,
            "seed": self.seed,
            "services": [self.services[k].summary() for k in sorted(self.services)],
            "unsupported": {f"{ns}/{n}": reason for (ns, n), reason in sorted(self.unsupported.items())},
            "pods": [p.summary() for p in sorted(self.pods.values(), key=lambda p: (p.pod.namespace, p.pod.name))],
        }


# ----------------------------------------------------------------------------------------------------
# Prometheus targets file


def target_groups(pods: Iterable[SimPod], owner: str, scrape_interval: str | None = None) -> list[dict[str, Any]]:
    """file_sd groups: one per served pod, with the pod's labels and our ownership label; a scrape interval
    other than the job's goes in Prometheus' `__scrape_interval__`/`__scrape_timeout__` target labels."""
    groups = []
    for pod in sorted(pods, key=lambda p: (p.pod.namespace, p.pod.name)):
        labels = dict(pod.labels)
        labels[FLEET_LABEL] = owner
        if scrape_interval is not None:
            labels["__scrape_interval__"] = scrape_interval
            labels["__scrape_timeout__"] = scrape_interval
        groups.append({"targets": [f"{pod.pod.ip}:{pod.port}"], "labels": labels})
    return groups


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_targets(path: Path, groups: list[dict[str, Any]], owner: str) -> None:
    """Replace our groups in the file_sd file (keeping other live fleets' and foreign groups), atomically.

    A lock file serialises concurrent fleets; the new content is written to a temporary file in the same
    directory and renamed over the old one, so Prometheus never reads a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            existing = json.loads(path.read_text()) if path.exists() else []
        except (OSError, json.JSONDecodeError):
            existing = []
        keep: list[dict[str, Any]] = []
        for group in existing if isinstance(existing, list) else []:
            if not isinstance(group, dict):
                continue
            other = str((group.get("labels") or {}).get(FLEET_LABEL, ""))
            if other == owner:
                continue
            if other.isdigit() and not _pid_alive(int(other)):
                continue  # left behind by a fleet that died
            keep.append(group)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(keep + groups, handle, indent=1, sort_keys=True)
                handle.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# ----------------------------------------------------------------------------------------------------
# Kubernetes: list + watch in threads, observations handed to the event loop


def pod_observation(pod: Any) -> PodObservation | None:
    """A V1Pod as the fleet sees it; None for pods without our role/service labels."""
    meta = pod.metadata
    labels = meta.labels or {}
    role = labels.get(ROLE_LABEL)
    service = labels.get(SERVICE_LABEL)
    if role not in ROLES or not service:
        return None
    if labels.get("leaderworkerset.sigs.k8s.io/worker-index", "0") != "0":
        return None  # a multi-node worker's member: its leader serves the worker's HTTP and metrics
    status = pod.status
    conditions = (status.conditions or []) if status is not None else []
    ready = status is not None and status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in conditions
    )
    return PodObservation(
        uid=str(meta.uid), namespace=str(meta.namespace), name=str(meta.name), service=str(service),
        role="prefill" if role == "prefill" else "decode", ip=str((status.pod_ip if status else None) or ""),
        ready=bool(ready), deleting=meta.deletion_timestamp is not None,
    )


@dataclass(frozen=True)
class ServiceObservation:
    namespace: str
    name: str
    spec: Mapping[str, Any]


def service_observation(obj: Mapping[str, Any]) -> ServiceObservation:
    meta = obj.get("metadata") or {}
    return ServiceObservation(str(meta.get("namespace", "")), str(meta.get("name", "")), obj.get("spec") or {})


@dataclass(frozen=True)
class Event:
    """From a watch thread: a full listing of one scope (`sync`) or one change."""

    kind: Literal["pods", "services"]
    type: str
    """SYNC, ADDED, MODIFIED, DELETED."""
    scope: str | None
    """Namespace of a SYNC listing (None: all namespaces)."""
    items: tuple[Any, ...]


class Watcher(threading.Thread):
    """List + watch one kind in one scope, forever (until `stop`), re-listing after every watch window.

    Every API call has a server-side and a client-side timeout; errors back off up to 10 s.
    """

    def __init__(self, kind: Literal["pods", "services"], namespace: str | None, make_client: Callable[[], Any],
                 post: Callable[[Event], None], stop: threading.Event, window_s: int = 60) -> None:
        super().__init__(name=f"watch-{kind}-{namespace or 'all'}", daemon=True)
        self.kind: Literal["pods", "services"] = kind
        self.namespace = namespace
        self.make_client = make_client
        self.post = post
        self.stop_event = stop
        self.window_s = window_s

    def _list_fn(self, client: Any) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        from kubernetes import client as kclient

        if self.kind == "pods":
            core = kclient.CoreV1Api(client)
            if self.namespace is None:
                return core.list_pod_for_all_namespaces, (), {"label_selector": POD_SELECTOR}
            return core.list_namespaced_pod, (self.namespace,), {"label_selector": POD_SELECTOR}
        custom = kclient.CustomObjectsApi(client)
        if self.namespace is None:
            return custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL), {}
        return custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL), {}

    def _convert(self, obj: Any) -> Any:
        if self.kind == "pods":
            return pod_observation(obj)
        return service_observation(obj)

    def run(self) -> None:
        from kubernetes import watch as kwatch
        from kubernetes.client.exceptions import ApiException

        watch: Any = kwatch

        backoff = 1.0
        client: Any = None
        while not self.stop_event.is_set():
            try:
                if client is None:
                    client = self.make_client()
                fn, args, kwargs = self._list_fn(client)
                listing = fn(*args, **kwargs, _request_timeout=(5, 30))
                if self.kind == "pods":
                    items = [self._convert(p) for p in listing.items]
                    version = listing.metadata.resource_version
                else:
                    items = [self._convert(o) for o in listing.get("items", [])]
                    version = (listing.get("metadata") or {}).get("resourceVersion")
                self.post(Event(self.kind, "SYNC", self.namespace, tuple(i for i in items if i is not None)))
                stream = watch.Watch()
                for event in stream.stream(fn, *args, **kwargs, resource_version=version,
                                           timeout_seconds=self.window_s, _request_timeout=(5, self.window_s + 10)):
                    if self.stop_event.is_set():
                        stream.stop()
                        break
                    kind = event.get("type")
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: re-list
                    if kind not in ("ADDED", "MODIFIED", "DELETED"):
                        continue
                    item = self._convert(event["object"])
                    if item is not None:
                        self.post(Event(self.kind, str(kind), None, (item,)))
                backoff = 1.0
            except ApiException as error:
                if error.status != 410:
                    log.warning("watch %s (%s): API error %s %s", self.kind, self.namespace or "all namespaces",
                                error.status, error.reason)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            except RuntimeError:
                return  # the event loop is gone
            except Exception as error:
                log.warning("watch %s (%s): %s: %s", self.kind, self.namespace or "all namespaces",
                            type(error).__name__, error)
                client = None
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)


# ----------------------------------------------------------------------------------------------------
# the process: HTTP servers, watches, ticker


_WORDS = ("the", "model", "answers", "with", "a", "simulated", "reply", "from", "a", "disaggregated", "engine",
          "running", "on", "a", "local", "cluster")


def _filler(tokens: int) -> str:
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(max(1, min(tokens, 64))))


def _prompt_text(body: Mapping[str, Any], chat: bool) -> str:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        parts = []
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content", "")
                if isinstance(content, list):  # content parts
                    content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                parts.append(str(content))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return " ".join(str(p) for p in prompt)
    return str(prompt)


def _positive_int(value: Any, default: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a positive integer, got {value!r}")
    return max(1, min(int(value), high))


class FleetServer:
    """The process around FleetSim: Kubernetes watches, one HTTP site per served pod, control API, ticker."""

    def __init__(
        self,
        sim: FleetSim,
        *,
        namespaces: Sequence[str] | None,
        kubeconfig: str | None,
        targets_file: Path | None,
        scrape_interval: str | None = None,
        control_host: str = "127.0.0.1",
        control_port: int = DEFAULT_CONTROL_PORT,
        allow_remote_apiserver: bool = False,
        make_client: Callable[[], Any] | None = None,
    ) -> None:
        self.sim = sim
        self.namespaces = list(namespaces) if namespaces else None
        self.kubeconfig = kubeconfig
        self.targets_file = targets_file
        self.scrape_interval = scrape_interval
        self.control_host = control_host
        self.control_port = control_port
        self.allow_remote_apiserver = allow_remote_apiserver
        self._make_client = make_client
        self.owner = str(os.getpid())
        self.observed: dict[str, PodObservation] = {}
        self.service_specs: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.sites: dict[str, web.TCPSite] = {}
        self.by_address: dict[tuple[str, int], SimPod] = {}
        self.problems: dict[str, str] = {}
        """uid -> why a Ready pod is not served (bind error, non-loopback IP, unsupported service)."""
        self._written: list[dict[str, Any]] | None = None
        self._stop = asyncio.Event()
        self._thread_stop = threading.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._pod_runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None
        self._requests = itertools.count(1)
        self.started_wall = time.time()
        self.watch_synced: set[str] = set()

    # -- kubernetes

    def client(self) -> Any:
        if self._make_client is not None:
            return self._make_client()
        from kubernetes import config as kconfig

        loader: Any = kconfig.new_client_from_config
        api: Any = loader(config_file=self.kubeconfig)
        host = urlparse(api.configuration.host).hostname or ""
        if not self.allow_remote_apiserver and host != "localhost" and not is_loopback(host):
            api.close()
            raise SystemExit(f"error: the API server {api.configuration.host} is not a loopback address; the fleet "
                             "only talks to a local cluster (pass --allow-remote-apiserver to override)")
        return api

    def _post(self, loop: asyncio.AbstractEventLoop) -> Callable[[Event], None]:
        def post(event: Event) -> None:
            loop.call_soon_threadsafe(self._events.put_nowait, event)

        return post

    def apply(self, event: Event) -> None:
        """Take one observation from a watch into account (call reconcile() afterwards)."""
        if event.kind == "services":
            if event.type == "SYNC":
                self.watch_synced.add(f"services/{event.scope or '*'}")
                listed = {(s.namespace, s.name) for s in event.items}
                for key in list(self.service_specs):
                    if (event.scope is None or key[0] == event.scope) and key not in listed:
                        self._forget_service(key)
            for item in event.items:
                assert isinstance(item, ServiceObservation)
                key = (item.namespace, item.name)
                if event.type == "DELETED":
                    self._forget_service(key)
                    continue
                self.service_specs[key] = item.spec
                reason = self.sim.upsert_service(item.namespace, item.name, item.spec)
                if reason:
                    log.warning("%s", reason)
            return
        if event.type == "SYNC":
            self.watch_synced.add(f"pods/{event.scope or '*'}")
            seen = {p.uid for p in event.items}
            for uid, pod in list(self.observed.items()):
                if (event.scope is None or pod.namespace == event.scope) and uid not in seen:
                    del self.observed[uid]
        for item in event.items:
            assert isinstance(item, PodObservation)
            if event.type == "DELETED":
                self.observed.pop(item.uid, None)
            else:
                self.observed[item.uid] = item

    def _forget_service(self, key: tuple[str, str]) -> None:
        self.service_specs.pop(key, None)
        for uid in self.sim.remove_service(*key):
            self.problems.pop(uid, None)

    # -- pod servers

    async def _stop_pod(self, uid: str) -> None:
        pod = self.sim.remove_pod(uid)
        site = self.sites.pop(uid, None)
        for address, served in list(self.by_address.items()):
            if served.pod.uid == uid:
                del self.by_address[address]
                pod = pod or served
        if pod is not None and site is not None:
            log.info("stopped %s/%s (%s) at %s:%d", pod.pod.namespace, pod.pod.name, pod.pod.role, pod.pod.ip,
                     pod.port)
        if site is not None:
            with contextlib.suppress(Exception):
                await site.stop()

    async def reconcile(self) -> None:
        """Serve exactly the Ready pods of simulated services; rewrite the targets file when that changed."""
        desired: dict[str, PodObservation] = {}
        problems: dict[str, str] = {}
        for uid, pod in self.observed.items():
            if not pod.ready or pod.deleting or not pod.ip:
                continue
            key = (pod.namespace, pod.service)
            if key not in self.sim.services:
                problems[uid] = self.sim.unsupported.get(
                    key, f"no InferenceService {key[0]}/{key[1]} (not listed yet, or deleted)")
                continue
            if not is_loopback(pod.ip):
                problems[uid] = f"pod IP {pod.ip} is not a loopback address: not served"
                continue
            desired[uid] = pod
        for uid in [u for u in self.sites if u not in self.sim.pods]:  # their service went away
            await self._stop_pod(uid)
        for uid in list(self.sim.pods):
            current = self.sim.pods[uid]
            wanted = desired.get(uid)
            if (wanted is None or wanted.ip != current.pod.ip or current.service is not self.sim.services.get(
                    (wanted.namespace, wanted.service)) or current.port != current.service.spec.engine.port):
                await self._stop_pod(uid)
        assert self._pod_runner is not None
        for uid, pod in sorted(desired.items(), key=lambda item: (item[1].namespace, item[1].name)):
            if uid in self.sim.pods:
                continue
            sim_pod = self.sim.add_pod(pod)
            if sim_pod.key in self.by_address:
                problems[uid] = f"{pod.ip}:{sim_pod.port} is already served for another pod"
                self.sim.remove_pod(uid)
                continue
            site = web.TCPSite(self._pod_runner, pod.ip, sim_pod.port, reuse_address=True)
            try:
                await site.start()
            except OSError as error:
                problems[uid] = f"cannot listen on {pod.ip}:{sim_pod.port}: {error.strerror or error}"
                self.sim.remove_pod(uid)
                continue
            self.sites[uid] = site
            self.by_address[sim_pod.key] = sim_pod
            log.info("serving %s/%s (%s, %s) at http://%s:%d", pod.namespace, pod.name, pod.role,
                     sim_pod.engine.config.kind, pod.ip, sim_pod.port)
        for uid, reason in problems.items():
            if self.problems.get(uid) != reason:
                log.warning("pod %s/%s: %s", self.observed[uid].namespace, self.observed[uid].name, reason)
        self.problems = problems
        self._write_targets()

    def _write_targets(self, final: bool = False) -> None:
        if self.targets_file is None:
            return
        groups = [] if final else target_groups(self.sim.pods.values(), self.owner, self.scrape_interval)
        if groups == self._written and not final:
            return
        try:
            write_targets(self.targets_file, groups, self.owner)
            self._written = groups
        except OSError as error:
            log.warning("cannot write %s: %s", self.targets_file, error)

    # -- HTTP handlers (one app for every pod: the local address says which pod is asked)

    def _pod_of(self, request: web.Request) -> SimPod | None:
        transport = request.transport
        if transport is None:
            return None
        sockname = transport.get_extra_info("sockname")
        if not sockname:
            return None
        return self.by_address.get((str(sockname[0]), int(sockname[1])))

    @staticmethod
    def _gone() -> web.Response:
        return web.json_response({"error": {"message": "no engine here any more", "code": 404}}, status=404)

    async def _metrics(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone()
        return web.Response(body=pod.metrics_page().encode(), headers={"Content-Type": EXPOSITION_CONTENT_TYPE})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200) if self._pod_of(request) is not None else self._gone()

    async def _version(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone()
        version = "0.32.0" if pod.engine.config.kind == "vllm" else "0.5.9"
        return web.json_response({"version": version})

    async def _models(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone()
        name = pod.service.spec.model.name
        return web.json_response({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(self.started_wall), "owned_by": pod.engine.config.kind,
            "root": name, "parent": None, "max_model_len": pod.engine.config.model.max_context,
        }]})

    async def _model_info(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone()
        return web.json_response({"model_path": pod.service.spec.model.name, "is_generation": True,
                                  "disaggregation_mode": pod.pod.role})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone()
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            text = _prompt_text(body, chat)
            max_tokens = _positive_int(body.get("max_completion_tokens", body.get("max_tokens")), 16, 1 << 17)
        except (ValueError, json.JSONDecodeError) as error:
            return web.json_response({"error": {"message": str(error), "type": "BadRequestError", "code": 400}},
                                     status=400)
        model = pod.service.spec.model.name
        if body.get("model") not in (None, model):
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        prompt_tokens = max(1, len(text) // 4)
        self.sim.submit_external(pod, prompt_tokens, max_tokens)
        number = next(self._requests)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{pod.pod.uid[:8]}-{number}"
        content = _filler(max_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                 "total_tokens": prompt_tokens + max_tokens}
        created = int(time.time())
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        payload: dict[str, Any] = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                                   "created": created, "model": model, "choices": [choice], "usage": usage}
        if isinstance(body.get("kv_transfer_params"), dict) and pod.pod.role == "prefill":
            payload["kv_transfer_params"] = {
                "do_remote_prefill": True, "do_remote_decode": False,
                "remote_engine_id": pod.pod.uid, "remote_block_ids": list(range(max(1, prompt_tokens // 16))),
                "remote_host": pod.pod.ip, "remote_port": 5600, "tp_size": pod.engine.config.tensor_parallel,
            }
        if not body.get("stream"):
            return web.json_response(payload)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        chunk = dict(payload, object="chat.completion.chunk" if chat else "text_completion")
        if chat:
            chunk["choices"] = [{"index": 0, "delta": {"role": "assistant", "content": content},
                                 "finish_reason": "length", "logprobs": None}]
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def pod_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/metrics", self._metrics)
        for path in ("/health", "/ping", "/health_generate"):
            app.router.add_get(path, self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/get_model_info", self._model_info)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    # -- control API

    async def _get_load(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.load_state())

    async def _put_load(self, request: web.Request) -> web.Response:
        try:
            namespace, name = parse_service_key(f"{request.match_info['namespace']}/{request.match_info['name']}")
            body = await request.json()
            if not isinstance(body, dict):
                raise LoadError("the body must be a JSON object")
            spec = self._load_from_body(body)
            result = self.sim.set_load(namespace, name, spec)
        except (LoadError, ValueError, json.JSONDecodeError) as error:
            return web.json_response({"error": str(error)}, status=400)
        result["applied_at_unix"] = time.time()
        result["sim_time_s"] = round(self.sim.time, 3)
        log.info("load of %s/%s set to %s", namespace, name, result.get("spec"))
        return web.json_response(result)

    async def _delete_load(self, request: web.Request) -> web.Response:
        try:
            namespace, name = parse_service_key(f"{request.match_info['namespace']}/{request.match_info['name']}")
        except LoadError as error:
            return web.json_response({"error": str(error)}, status=400)
        result = self.sim.set_load(namespace, name, None)
        result["applied_at_unix"] = time.time()
        return web.json_response(result)

    @staticmethod
    def _load_from_body(body: Mapping[str, Any]) -> LoadSpec:
        allowed = {"rps", "x", "spec", "prompt_tokens", "output_tokens"}
        unknown = set(body) - allowed
        if unknown:
            raise LoadError(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        given = [k for k in ("rps", "x", "spec") if k in body]
        if len(given) != 1:
            raise LoadError("give exactly one of 'rps' (requests/s), 'x' (multiple of the base load) or 'spec'")
        if "spec" in body:
            spec = parse_load_spec(str(body["spec"]))
        else:
            value = body[given[0]]
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or not 0 <= value <= MAX_RPS):
                raise LoadError(f"'{given[0]}' must be a number in [0, {MAX_RPS:g}]")
            spec = LoadSpec(steps=((0.0, float(value), given[0] == "x"),))
        sizes: dict[str, int] = {}
        for key in ("prompt_tokens", "output_tokens"):
            if key in body:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
                    raise LoadError(f"'{key}' must be an integer in [1, 1000000]")
                sizes[key] = value
        return LoadSpec(spec.steps, spec.trace, spec.time_scale, sizes.get("prompt_tokens"),
                        sizes.get("output_tokens"))

    async def _get_state(self, request: web.Request) -> web.Response:
        state = self.sim.state()
        state["wall_started_unix"] = self.started_wall
        state["uptime_s"] = round(time.time() - self.started_wall, 3)
        state["cpu_seconds"] = round(time.process_time(), 3)
        state["watches_synced"] = sorted(self.watch_synced)
        state["not_served"] = {
            f"{self.observed[uid].namespace}/{self.observed[uid].name}": reason
            for uid, reason in sorted(self.problems.items()) if uid in self.observed
        }
        state["targets_file"] = str(self.targets_file) if self.targets_file else None
        return web.json_response(state)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "time_s": round(self.sim.time, 3)})

    def control_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 16)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/load", self._get_load)
        app.router.add_put("/load/{namespace}/{name}", self._put_load)
        app.router.add_delete("/load/{namespace}/{name}", self._delete_load)
        app.router.add_get("/state", self._get_state)
        return app

    # -- main loop

    def stop(self) -> None:
        self._stop.set()

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        dt = self.sim.dt
        next_at = loop.time()
        last_retry = next_at
        while not self._stop.is_set():
            next_at += dt
            delay = next_at - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                if self._stop.is_set():
                    return
            behind = int((loop.time() - next_at) / dt)
            if behind > MAX_CATCH_UP_TICKS:
                log.debug("ticker %d steps behind: dropping %d", behind, behind - MAX_CATCH_UP_TICKS)
                next_at += (behind - MAX_CATCH_UP_TICKS) * dt
                behind = MAX_CATCH_UP_TICKS
            for _ in range(1 + max(0, behind)):
                self.sim.tick()
            next_at += max(0, behind) * dt
            if self.problems and loop.time() - last_retry > 5.0:  # e.g. an address that was still in use
                last_retry = loop.time()
                self._events.put_nowait(Event("pods", "RETRY", "", ()))

    async def _consume(self) -> None:
        while not self._stop.is_set():
            event = await self._events.get()
            self.apply(event)
            for _ in range(1000):  # apply what else is queued, then reconcile once
                try:
                    self.apply(self._events.get_nowait())
                except asyncio.QueueEmpty:
                    break
            await self.reconcile()

    async def run(self, duration: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.client().close()  # fail fast: kubeconfig readable, API server on loopback
        await self.start_http()
        post = self._post(loop)
        scopes: list[str | None] = list(self.namespaces) if self.namespaces else [None]
        kinds: tuple[Literal["services", "pods"], ...] = ("services", "pods")
        for scope in scopes:
            for kind in kinds:
                Watcher(kind, scope, self.client, post, self._thread_stop).start()
        tasks = [asyncio.create_task(self._ticker(), name="ticker"),
                 asyncio.create_task(self._consume(), name="consume")]
        try:
            if duration:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=duration)
            else:
                await self._stop.wait()
        finally:
            self._stop.set()
            self._thread_stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.shutdown()
            log.info("stopped")

    async def start_http(self) -> None:
        """The control API, and the (still empty) application every pod's site will serve."""
        if not is_loopback(self.control_host):
            raise OSError(f"the control API may only listen on a loopback address, not {self.control_host}")
        self._pod_runner = web.AppRunner(self.pod_app(), access_log=None, handle_signals=False)
        await self._pod_runner.setup()
        self._control_runner = web.AppRunner(self.control_app(), access_log=None, handle_signals=False)
        await self._control_runner.setup()
        control = web.TCPSite(self._control_runner, self.control_host, self.control_port, reuse_address=True)
        await control.start()
        log.info("control API on http://%s:%d (GET /state, GET /load, PUT /load/NS/NAME)", self.control_host,
                 self.control_port)

    async def shutdown(self) -> None:
        """Stop every pod's site, take our targets out of the targets file, close the servers."""
        for uid in list(self.sim.pods):
            await self._stop_pod(uid)
        for uid in list(self.sites):
            await self._stop_pod(uid)
        self._write_targets(final=True)
        if self._pod_runner is not None:
            await self._pod_runner.cleanup()
            self._pod_runner = None
        if self._control_runner is not None:
            await self._control_runner.cleanup()
            self._control_runner = None


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg fleet",
        description="Simulated vLLM/SGLang engines for every Ready prefill/decode pod of the local cluster: "
                    "per-pod /metrics, /health and a minimal OpenAI API on the pod's own loopback IP, under an "
                    "offered load you control.",
        epilog="Load SPEC: 8 (requests/s) | 4x (times the base load) | steps:0s@2,60s@8,120s@2 | "
               "trace:PATH[:time-scale] (Azure CSV or Mooncake JSONL; relative paths also looked up in "
               "the shared traces directory).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--accelerator-catalog", default=None, help="accelerator catalogue overrides (YAML)")
    parser.add_argument("--load", action="append", default=[], metavar="NS/NAME=SPEC",
                        help="offered load of one service (repeatable)")
    parser.add_argument("--default-load", default="1x", metavar="SPEC",
                        help="load of services without --load (default: 1x, the base load)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"prompt tokens per request (default {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS,
                        help=f"output tokens per request (default {DEFAULT_OUTPUT_TOKENS})")
    parser.add_argument("--base-share", type=float, default=DEFAULT_BASE_SHARE,
                        help="base load as a share of one prefill + one decode replica's SLO capacity (default 0.6)")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--kv-link", choices=("rdma", "tcp"), default="rdma",
                        help="prefill-to-decode KV link of the transfer-time model (default rdma, as the autoscaler)")
    parser.add_argument("--dt", type=float, default=DEFAULT_DT, help="simulation step, seconds (default 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control-host", default="127.0.0.1")
    parser.add_argument("--control-port", type=int, default=DEFAULT_CONTROL_PORT)
    parser.add_argument("--targets-file", default=None,
                        help="Prometheus file_sd file (default $DISAGG_CLUSTER_DIR/prometheus/engines.json, "
                             "cluster dir /tmp/disagg-cluster); 'none' to write none")
    parser.add_argument("--scrape-interval", default=None, metavar="DURATION",
                        help="ask Prometheus to scrape these engines this often (e.g. 1s; default: the job's)")
    parser.add_argument("--traces-dir", default=None, help="where relative trace paths are looked up")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on signal)")
    parser.add_argument("--allow-remote-apiserver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def fleet_main(argv: list[str]) -> int:
    """`disagg fleet`: run the simulated engine fleet until SIGINT/SIGTERM (or --duration)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s fleet: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
        logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if not is_loopback(args.control_host):
        print(f"error: --control-host {args.control_host} is not a loopback address", file=sys.stderr)
        return 2
    try:
        if args.prompt_tokens < 1 or args.output_tokens < 1:
            raise LoadError("--prompt-tokens and --output-tokens must be >= 1")
        if not 0 < args.base_share <= 1:
            raise LoadError("--base-share must be in (0, 1]")
        loads = dict(parse_load_arg(text) for text in args.load)
        catalog = load_catalog(args.accelerator_catalog)
        sim = FleetSim(
            catalog, seed=args.seed, dt=args.dt, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
            base_share=args.base_share, arrivals=args.arrivals, kv_over_rdma=args.kv_link == "rdma",
            default_load=parse_load_spec(args.default_load), loads=loads,
            traces_dir=Path(args.traces_dir) if args.traces_dir else None,
        )
    except (LoadError, CatalogError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    targets = None if args.targets_file == "none" else Path(args.targets_file or _default_targets_file())
    if args.scrape_interval is not None:
        try:
            prometheus_duration_seconds(args.scrape_interval)
        except ValueError as error:
            print(f"error: --scrape-interval: {error}", file=sys.stderr)
            return 2
    server = FleetServer(
        sim, namespaces=args.namespace or None, kubeconfig=args.kubeconfig, targets_file=targets,
        scrape_interval=args.scrape_interval,
        control_host=args.control_host, control_port=args.control_port,
        allow_remote_apiserver=args.allow_remote_apiserver,
    )
    try:
        asyncio.run(server.run(args.duration or None))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(fleet_main(sys.argv[1:]))
