"""A fine time-step simulation of a disaggregated service: prefill and decode pools, router, metrics, scaler.

The engine model is two classes, `PrefillReplica` and `DecodePool`, with every cost from the roofline
(`disagg.capacity.roofline`); the local cluster's simulated engines (the development package in lab/,
not shipped) step the same two classes live, behind real HTTP and real routers.

What is simulated (each replica from the roofline capacity model with the engine's true efficiency):
- Router: each arriving request goes to the ready prefill replica with the least outstanding work.
- Prefill: a FIFO per replica; when a replica frees, the queued prompts up to `prefill_batch_tokens` run as
  one batch (sharing one fixed batch overhead) and finish together. Prefill time per prompt comes from the
  roofline (matmuls plus causal attention).
- KV transfer: each prompt's KV cache then moves to decode over the prefill-decode link.
- Decode: continuous batching. A request waits (FIFO) until a ready decode replica has room in its KV cache
  for its prompt plus output, then joins that replica's batch. Every step of a replica lasts the roofline
  step time of its current batch and total context; each running sequence gains one token per step. A
  request's first token is emitted by its first decode step; its mean ITL is (finish - first token) /
  (output - 1). Requests that can never fit (longer than the model's context or a replica's KV cache)
  are rejected and count as SLO misses.
- Replicas: a new replica costs money from the decision and serves after `startup_s`. A scale-down removes
  the replicas the operator would (`disagg.scaling.victims`: not ready first, then the fewest requests in
  flight, then the least KV held); removed prefill replicas stop receiving work and finish their queue,
  removed decode replicas stop admitting and finish their sequences. Both are billed until they are empty.
- Metrics: every `scrape_interval_s` a scrape records counters, gauges and histograms, as Prometheus would
  from the engines; the policy sees rates and histogram quantiles over `rate_window_s`, computed from
  scrapes at least `scrape_delay_s` old. Latency signals come from log-spaced histogram buckets.
- The controller (our policy or a baseline) is called every `interval_s` of its own.
- Warm-up: with `warmup_s`, requests arriving before it are not measured and replicas are not billed
  before it; the controller runs from the start, so every policy enters the measured period in its own
  steady state (the timeline and the result's counts cover the measured period only).

Time advances in steps of `dt` (0.1 s by default); arrivals, prefill batches and the first token of each
request are placed at their exact times, the decode batch evolves per step.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt

from disagg.capacity.models import ModelShape
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    DecodeCost,
    Efficiency,
    kv_capacity_tokens,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.catalog.accelerators import Accelerator
from disagg.scaling.policy import LoadPicture, PoolSignals
from disagg.scaling.victims import WorkerLoad, choose_victims
from disagg.sim.traces import Workload

FloatArray = npt.NDArray[np.float64]

# Log-spaced latency buckets from 1 ms to ~200 s (Prometheus-style cumulative histograms, finer).
BUCKETS: FloatArray = np.geomspace(1e-3, 200.0, 121)


def prompt_buckets(max_context: int) -> FloatArray:
    """vLLM's prompt-length buckets (`vllm:request_prompt_tokens`): 1, 2, 5, 10, 20, 50, ... up to the
    model's context length; the simulator exports the same, with an open last bucket."""
    bounds = [m * 10**e for e in range(12) for m in (1, 2, 5) if m * 10**e <= max_context]
    return np.asarray([*bounds, math.inf])


@dataclass(frozen=True)
class PoolSetup:
    """One simulated pool: its accelerator, tensor parallelism and scaling bounds."""

    accelerator: Accelerator
    tensor_parallel: int = 1
    initial_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 64

    @property
    def accelerators_per_replica(self) -> int:
        return self.tensor_parallel


@dataclass(frozen=True)
class SimSetup:
    """Everything about a simulated service except the workload and the controller."""

    model: ModelShape
    prefill: PoolSetup
    decode: PoolSetup
    ttft_s: float = 1.0
    itl_s: float = 0.05
    percentile: float = 90.0
    startup_s: float = 60.0
    scrape_interval_s: float = 15.0
    scrape_delay_s: float = 15.0
    """Age of the newest samples the controller sees (scrape, rule evaluation, query)."""
    rate_window_s: float = 30.0
    dt: float = 0.1
    engine: Efficiency = DEFAULT_EFFICIENCY
    """The engines' true efficiency; controllers plan with their own prior."""
    prefill_batch_tokens: int = 8192
    prefill_batch_overhead_s: float = 0.01
    rdma: bool = True
    accelerator_budget: int | None = None
    drain_s: float = 900.0
    """After the last arrival, requests get this long to finish (not billed)."""
    timeline_step_s: float = 60.0
    warmup_s: float = 0.0
    """The first `warmup_s` seconds of the workload run with the controller in the loop but are neither
    billed nor measured: results describe a service already running (steady state), not a cold start."""


class NothingMeasured(ValueError):
    """A simulation that would measure nothing (a warm-up covering the workload, a measured span shorter
    than one replica start-up, no request to measure): refused rather than reported as a result."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting
        """The SimSetup or Workload field at fault (`warmup_s`, `startup_s`, `duration_s`, `requests`)."""


def check_measurable(setup: SimSetup, workload: Workload) -> None:
    """Raises NothingMeasured unless `workload` (warm-up included) leaves something to measure."""
    measured_s = workload.duration_s - setup.warmup_s
    if setup.warmup_s > 0 and setup.warmup_s >= measured_s:
        # the warm-up replays the workload's own last `warmup_s` (with_warmup): it cannot be longer
        raise NothingMeasured(
            "warmup_s",
            f"the warm-up ({setup.warmup_s:g} s) is at least as long as the workload it warms up "
            f"({max(measured_s, 0.0):g} s): nothing, or only a replay of the warm-up, would be measured",
        )
    if measured_s < setup.startup_s:
        raise NothingMeasured(
            "duration_s",
            f"the measured span ({measured_s:g} s) is shorter than one replica start-up ({setup.startup_s:g} s): "
            "no scaling decision could take effect within it",
        )
    first_measured = int(np.searchsorted(workload.arrivals, setup.warmup_s))
    if first_measured >= workload.requests:
        raise NothingMeasured(
            "requests",
            f"no request arrives in the measured span ({setup.warmup_s:g} s to {workload.duration_s:g} s): "
            "the trace window is empty",
        )


class Controller(Protocol):
    """An autoscaler in the loop: ours (disagg.scaling.policy) or a baseline."""

    @property
    def name(self) -> str: ...

    @property
    def interval_s(self) -> float:
        """How often the simulator calls decide()."""
        ...

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        """Desired replicas per pool ("prefill", "decode")."""
        ...


K = TypeVar("K")


@dataclass
class PrefillReplica(Generic[K]):
    """One prefill replica of the engine model: a FIFO whose head runs as one batch.

    When the replica frees, the queued prompts up to `batch_tokens` (at least one) start together as one
    batch that lasts the sum of their prefill times plus one fixed `batch_overhead_s`, and they finish
    together. `disagg simulate` and the local cluster's simulated engines both step this class; requests
    are any key (the simulator's request numbers, the lab's HTTP requests).
    """

    batch_tokens: float
    batch_overhead_s: float
    ready_at: float = 0.0
    billed_from: float = 0.0
    draining: bool = False
    busy_until: float = 0.0
    queue: deque[tuple[K, float, float]] = field(default_factory=deque)
    """(request, prompt tokens, prefill seconds) waiting."""
    queued_work: float = 0.0
    batch: list[tuple[K, float, float]] = field(default_factory=list)
    """The running batch (finishes at `busy_until`)."""

    def outstanding(self, at: float) -> float:
        """When this replica would be done with everything it holds, from `at`."""
        busy = self.busy_until
        return (busy if busy > at else at) + self.queued_work

    def submit(self, request: K, prompt_tokens: float, service_s: float, at: float) -> None:
        """A request arriving at `at` (call `advance(at)` first); starts a batch when the replica is idle."""
        self.queue.append((request, prompt_tokens, service_s))
        self.queued_work += service_s
        if not self.batch:
            self._start(max(at, self.ready_at, self.busy_until))

    def _start(self, at: float) -> None:
        tokens = 0.0
        work = self.batch_overhead_s
        queue = self.queue
        while queue and (not self.batch or tokens + queue[0][1] <= self.batch_tokens):
            item = queue.popleft()
            self.queued_work -= item[2]
            self.batch.append(item)
            tokens += item[1]
            work += item[2]
        self.busy_until = at + work

    def advance(self, until: float) -> list[tuple[float, list[tuple[K, float, float]]]]:
        """Runs the batches that end by `until`: each finished batch as (end time, its requests)."""
        done: list[tuple[float, list[tuple[K, float, float]]]] = []
        while self.batch and self.busy_until <= until:
            done.append((self.busy_until, self.batch))
            self.batch = []
            if self.queue:
                self._start(self.busy_until)
        return done

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        return len(self.batch)


@dataclass
class _Snapshot:
    time: float
    arrivals: int
    prefill_done: int
    prompt_tokens: float
    prefill_busy_s: float
    generated_tokens: float
    admitted: int
    finished: int
    finished_output_tokens: float
    ttft_hist: FloatArray
    """The prefill engines' TTFT (arrival to the prefill's token)."""
    prompt_hist: FloatArray
    """Prompt lengths of the requests prefill finished (`prompt_buckets`)."""
    decode_ttft_hist: FloatArray
    """The decode engines' TTFT (the prefill's end to the first decoded token: the KV hand-off, admission
    and first step)."""
    itl_hist: FloatArray
    prefill_waiting: int
    prefill_running: int
    prefill_ready: int
    decode_running: int
    decode_waiting: int
    decode_ready: int
    kv_usage: float


@dataclass
class Timeline:
    """Per `timeline_step_s`: load, replicas and latency, for plots."""

    time_s: list[float] = field(default_factory=list)
    request_rate: list[float] = field(default_factory=list)
    prompt_tokens_per_s: list[float] = field(default_factory=list)
    prefill_replicas: list[int] = field(default_factory=list)
    decode_replicas: list[int] = field(default_factory=list)
    ttft_p90_s: list[float] = field(default_factory=list)
    itl_p90_s: list[float] = field(default_factory=list)


@dataclass
class SimResult:
    """What one simulation produced."""

    policy: str
    requests: int
    ttft_s: FloatArray
    """Per request; inf for rejected or unfinished requests."""
    itl_s: FloatArray
    """Per request mean inter-token latency; nan for one-token outputs, inf when unfinished."""
    accelerator_seconds: dict[str, float]
    usd: float
    max_replicas: dict[str, int]
    scale_events: int
    wall_s: float
    ttft_target_s: float
    itl_target_s: float
    timeline: Timeline
    decisions: list[tuple[float, str, str]] = field(default_factory=list)

    def attainment(self) -> float:
        if self.requests == 0:  # simulate() refuses such runs; never report them as met
            return math.nan
        ok_ttft = self.ttft_s <= self.ttft_target_s
        ok_itl = np.isnan(self.itl_s) | (self.itl_s <= self.itl_target_s)
        return float(np.mean(ok_ttft & ok_itl))

    def accelerator_hours(self) -> dict[str, float]:
        hours = {role: seconds / 3600.0 for role, seconds in self.accelerator_seconds.items()}
        hours["total"] = hours["prefill"] + hours["decode"]
        return hours

    def summary(self) -> dict[str, object]:
        """The fields of `disagg simulate -o json`."""

        def percentiles(values: FloatArray) -> dict[str, float]:
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                return {"p50": math.nan, "p90": math.nan, "p99": math.nan}
            p50, p90, p99 = np.percentile(finite, [50, 90, 99]) * 1000.0
            return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1)}

        hours = self.accelerator_hours()
        return {
            "policy": self.policy,
            "requests": self.requests,
            "slo_attainment": round(self.attainment(), 5),
            "ttft_ms": percentiles(self.ttft_s),
            "itl_ms": percentiles(self.itl_s),
            "accelerator_hours": {k: round(v, 3) for k, v in hours.items()},
            "cost_usd": round(self.usd, 2),
            "max_replicas": dict(self.max_replicas),
            "scale_events": self.scale_events,
            "sim_wall_s": round(self.wall_s, 2),
        }


def _bucket(seconds: float) -> int:
    """The BUCKETS index an observation falls in (the last bucket is open)."""
    return min(int(np.searchsorted(BUCKETS, seconds)), BUCKETS.size - 1)


def _quantile(hist: FloatArray, percentile: float) -> float | None:
    """histogram_quantile over BUCKETS (upper bounds; the last bucket is open)."""
    total = float(hist.sum())
    if total <= 0:
        return None
    rank = total * percentile / 100.0
    cumulative = np.cumsum(hist)
    index = int(np.searchsorted(cumulative, rank))
    index = min(index, len(BUCKETS) - 1)
    upper = float(BUCKETS[index])
    lower = float(BUCKETS[index - 1]) if index > 0 else 0.0
    below = float(cumulative[index - 1]) if index > 0 else 0.0
    inside = float(hist[index])
    share = (rank - below) / inside if inside > 0 else 1.0
    return lower + (upper - lower) * min(max(share, 0.0), 1.0)


def _buckets(hist: FloatArray, span: float) -> tuple[tuple[float, float], ...]:
    """A BUCKETS histogram's counts over `span` seconds as Prometheus' `rate` of its cumulative buckets:
    (upper bound, per second), the last one open."""
    cumulative = np.cumsum(hist) / span
    pairs = zip(BUCKETS[:-1].tolist(), cumulative[:-1].tolist(), strict=True)
    return (*pairs, (math.inf, float(cumulative[-1])))


def _picture(snapshots: list[_Snapshot], now: float, setup: SimSetup) -> LoadPicture | None:
    """The signals a controller reading Prometheus at `now` gets."""
    visible = [s for s in snapshots if s.time <= now - setup.scrape_delay_s + 1e-9]
    if len(visible) < 2:
        return None
    newest = visible[-1]
    oldest = visible[-2]
    for snap in reversed(visible[:-1]):
        oldest = snap
        if newest.time - snap.time >= setup.rate_window_s - 1e-9:
            break
    span = newest.time - oldest.time
    last = visible[-2]  # the previous scrape: Prometheus' irate
    last_span = newest.time - last.time
    done = newest.prefill_done - oldest.prefill_done
    finished = newest.finished - oldest.finished
    prompt = newest.prompt_tokens - oldest.prompt_tokens
    mean_prompt = prompt / done if done > 0 else None
    ttft_hist = newest.ttft_hist - oldest.ttft_hist
    lengths = np.cumsum(newest.prompt_hist - oldest.prompt_hist) / span
    bounds = prompt_buckets(setup.model.max_context)
    decode_ttft_hist = newest.decode_ttft_hist - oldest.decode_ttft_hist
    mean_output = (newest.finished_output_tokens - oldest.finished_output_tokens) / finished if finished else None
    prefill = PoolSignals(
        ready_replicas=newest.prefill_ready,
        sampled_at=newest.time,
        waiting_requests=float(newest.prefill_waiting),
        running_requests=float(newest.prefill_running),
        prompt_tokens_per_s=prompt / span,
        request_rate=(newest.arrivals - oldest.arrivals) / span,
        request_rate_last=(newest.arrivals - last.arrivals) / last_span,
        requests_last=float(newest.arrivals - last.arrivals),
        ttft_s=_quantile(ttft_hist, setup.percentile),
        ttft_buckets=_buckets(ttft_hist, span),
        prompt_buckets=tuple(zip(bounds.tolist(), lengths.tolist(), strict=True)),
        mean_prompt_tokens=mean_prompt,
        mean_output_tokens=mean_output,
        prefill_time_s=(newest.prefill_busy_s - oldest.prefill_busy_s) / done if done > 0 else None,
    )
    decode = PoolSignals(
        ready_replicas=newest.decode_ready,
        sampled_at=newest.time,
        waiting_requests=float(newest.decode_waiting),
        running_requests=float(newest.decode_running),
        generation_tokens_per_s=(newest.generated_tokens - oldest.generated_tokens) / span,
        request_rate=(newest.admitted - oldest.admitted) / span,
        request_rate_last=(newest.admitted - last.admitted) / last_span,
        requests_last=float(newest.admitted - last.admitted),
        kv_usage=newest.kv_usage,
        ttft_s=_quantile(decode_ttft_hist, setup.percentile),
        ttft_buckets=_buckets(decode_ttft_hist, span),
        itl_s=_quantile(newest.itl_hist - oldest.itl_hist, setup.percentile),
        itl_buckets=_buckets(newest.itl_hist - oldest.itl_hist, span),
        mean_prompt_tokens=mean_prompt,
        mean_output_tokens=mean_output,
    )
    return LoadPicture(prefill, decode)


class DecodePool:
    """Decode replicas of the engine model, as arrays (one slot per replica).

    Continuous batching within the KV cache: a request is admitted to a slot only when the slot's free KV
    holds its prompt plus its whole output (reserved at admission, so a running sequence is never
    preempted); every step of a slot lasts the roofline step time (`DecodeCost`) of its current batch and
    total context, and each running sequence gains one token per step. A slot's `clock` counts its steps
    (fractionally: `step` advances it by dt / step time), so a sequence admitted at clock c with n output
    tokens emits its k-th token when the clock passes c + k and finishes at c + n. `disagg simulate` and
    the local cluster's simulated engines both step this class.
    """

    FREE, STARTING, READY, DRAINING = 0, 1, 2, 3

    def __init__(self, model: ModelShape, accelerator: Accelerator, tensor_parallel: int,
                 eff: Efficiency = DEFAULT_EFFICIENCY, size: int = 8) -> None:
        self.model = model
        self.capacity = kv_capacity_tokens(model, accelerator, tensor_parallel, eff)
        self.cost = DecodeCost.of(model, accelerator, tensor_parallel, eff)
        size = max(1, size)
        self.state = np.zeros(size, dtype=np.int8)
        self.ready_at = np.zeros(size)
        self.billed_from = np.zeros(size)
        self.batch = np.zeros(size)
        self.clock = np.zeros(size)
        self.sum_prompt = np.zeros(size)
        self.sum_start = np.zeros(size)
        self.reserved = np.zeros(size)
        self.next_done = np.full(size, np.inf)
        self.heaps: list[list[tuple[float, int, float, float]]] = [[] for _ in range(size)]
        """Per slot: (finish clock, request, prompt, output) of its running sequences."""

    def _grow(self) -> None:
        size = self.state.size
        self.state = np.concatenate([self.state, np.zeros(size, dtype=np.int8)])
        for name in ("ready_at", "billed_from", "batch", "clock", "sum_prompt", "sum_start", "reserved"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(size)]))
        self.next_done = np.concatenate([self.next_done, np.full(size, np.inf)])
        self.heaps.extend([] for _ in range(size))

    def add(self, now: float, ready_at: float) -> int:
        """A new replica (ready from `ready_at`); its slot."""
        free = np.flatnonzero(self.state == self.FREE)
        if free.size == 0:
            self._grow()
            free = np.flatnonzero(self.state == self.FREE)
        slot = int(free[0])
        self.state[slot] = self.READY if ready_at <= now else self.STARTING
        self.ready_at[slot] = ready_at
        self.billed_from[slot] = now
        self.batch[slot] = self.clock[slot] = self.sum_prompt[slot] = self.sum_start[slot] = 0.0
        self.reserved[slot] = 0.0
        self.next_done[slot] = np.inf
        self.heaps[slot] = []
        return slot

    def free_kv(self, slot: int) -> float:
        return float(self.capacity - self.reserved[slot])

    def scale_down(self, count: int) -> list[int]:
        """Removes `count` replicas as the operator chooses them (scaling/victims.py): a starting one stops at
        once, a ready one stops admitting and drains its sequences. The slots removed."""
        slots = np.flatnonzero((self.state == self.STARTING) | (self.state == self.READY))
        chosen = [int(name) for name in choose_victims([self.load(int(slot)) for slot in slots], count)]
        for slot in chosen:
            if self.state[slot] == self.STARTING or self.batch[slot] <= 0:
                self.state[slot] = self.FREE
            else:
                self.state[slot] = self.DRAINING
        return chosen

    def load(self, slot: int) -> WorkerLoad:
        """What the operator's scale-down choice reads of a replica (its engine's gauges)."""
        kv = float(self.reserved[slot] / self.capacity) if self.capacity > 0 else 0.0
        return WorkerLoad(str(slot), bool(self.state[slot] == self.READY), float(self.batch[slot]), kv,
                          float(self.ready_at[slot]))

    def admit(self, slot: int, request: int, prompt: float, output: float) -> float:
        """Starts a sequence on `slot` (the caller checked `free_kv`); its step time right after joining,
        which is when its first token comes out."""
        self.batch[slot] += 1
        self.sum_prompt[slot] += prompt
        self.sum_start[slot] += self.clock[slot]
        self.reserved[slot] += prompt + output
        heapq.heappush(self.heaps[slot], (self.clock[slot] + output, request, prompt, output))
        self.next_done[slot] = self.heaps[slot][0][0]
        return self.step_one(slot)

    def abort(self, slot: int, request: int) -> None:
        """Ends a running sequence early (its client went away), freeing its KV reservation."""
        heap = self.heaps[slot]
        kept = [entry for entry in heap if entry[1] != request]
        for target, _, prompt, output in (entry for entry in heap if entry[1] == request):
            self.batch[slot] -= 1
            self.sum_prompt[slot] -= prompt
            self.sum_start[slot] -= target - output
            self.reserved[slot] -= prompt + output
        heapq.heapify(kept)
        self.heaps[slot] = kept
        self.next_done[slot] = kept[0][0] if kept else np.inf
        if not kept:
            self.batch[slot] = self.sum_prompt[slot] = self.sum_start[slot] = self.reserved[slot] = 0.0

    def release(self, slot: int) -> None:
        """The replica is gone: its slot is free for the next `add`."""
        self.state[slot] = self.FREE
        self.heaps[slot] = []
        self.batch[slot] = self.sum_prompt[slot] = self.sum_start[slot] = self.reserved[slot] = 0.0
        self.next_done[slot] = np.inf

    def weights(self, batch: FloatArray) -> FloatArray:
        cost = self.cost
        if cost.active_share >= 1.0:
            return np.full_like(batch, cost.weight_bytes)
        result: FloatArray = cost.weight_bytes * (1.0 - (1.0 - cost.active_share) ** np.maximum(batch, 1.0))
        return result

    def step_seconds(self, slots: npt.NDArray[np.int64]) -> FloatArray:
        """`DecodeCost.step_seconds` of the slots' current batches, as arrays."""
        cost = self.cost
        batch = self.batch[slots]
        context = self.sum_prompt[slots] + batch * self.clock[slots] - self.sum_start[slots]
        memory = self.weights(batch) * cost.seconds_per_weight_byte + context * cost.seconds_per_context_token
        result: FloatArray = np.maximum(memory, batch * cost.seconds_per_sequence) + cost.overhead_s
        return result

    def step_one(self, slot: int) -> float:
        """`step_seconds` of one slot, in scalar arithmetic."""
        batch = float(self.batch[slot])
        context = float(self.sum_prompt[slot]) + batch * float(self.clock[slot]) - float(self.sum_start[slot])
        return self.cost.step_seconds(batch, context)

    def step(self, end: float, dt: float) -> tuple[npt.NDArray[np.int64], FloatArray, FloatArray, FloatArray,
                                                    list[tuple[int, int, float, float, float]]]:
        """Runs every busy slot for `dt` seconds ending at `end`: (busy slots, their step times, the steps
        each ran, the tokens each generated, finished sequences as (slot, request, prompt, output, finish
        time))."""
        active = np.flatnonzero(self.batch > 0)
        finished: list[tuple[int, int, float, float, float]] = []
        if not active.size:
            empty = np.zeros(0)
            return active, empty, empty, empty, finished
        steps_s = self.step_seconds(active)
        advance = dt / steps_s
        self.clock[active] += advance
        tokens: FloatArray = self.batch[active] * advance
        done_slots = active[self.clock[active] >= self.next_done[active]]
        for slot_value in done_slots:
            slot = int(slot_value)
            heap = self.heaps[slot]
            step_s = float(steps_s[np.searchsorted(active, slot)])
            while heap and heap[0][0] <= self.clock[slot]:
                target, request, prompt, output = heapq.heappop(heap)
                finished.append((slot, request, prompt, output, end - (self.clock[slot] - target) * step_s))
                self.batch[slot] -= 1
                self.sum_prompt[slot] -= prompt
                self.sum_start[slot] -= target - output
                self.reserved[slot] -= prompt + output
            self.next_done[slot] = heap[0][0] if heap else np.inf
            if not heap:
                self.batch[slot] = self.sum_prompt[slot] = self.sum_start[slot] = 0.0
                self.reserved[slot] = 0.0
        return active, steps_s, advance, tokens, finished


def prefill_victims(replicas: list[PrefillReplica[K]], now: float, count: int) -> list[PrefillReplica[K]]:
    """The prefill replicas a scale-down removes, as the operator chooses them (scaling/victims.py)."""
    loads = [WorkerLoad(str(i), r.ready_at <= now, float(r.running + r.waiting), 0.0, r.ready_at)
             for i, r in enumerate(replicas)]
    return [replicas[int(name)] for name in choose_victims(loads, count)]


def _per_prompt(formula: Callable[[float], float], prompts: FloatArray) -> FloatArray:
    """A roofline formula of one prompt applied to every prompt at once (its arithmetic is elementwise)."""
    return np.asarray(formula(cast(float, prompts)), dtype=np.float64)


def _fill_timeline(
    timeline: Timeline, step_s: float, arrivals: FloatArray, prompt: FloatArray, ttft: FloatArray, itl: FloatArray
) -> None:
    """Load and p90 latencies of the requests arriving in each timeline step."""
    edges = np.searchsorted(arrivals, np.asarray(timeline.time_s) - step_s)
    ends = np.searchsorted(arrivals, np.asarray(timeline.time_s))
    for low, high in zip(edges, ends, strict=True):
        timeline.request_rate.append((high - low) / step_s)
        timeline.prompt_tokens_per_s.append(float(prompt[low:high].sum()) / step_s)
        first = np.minimum(ttft[low:high], 600.0)
        timeline.ttft_p90_s.append(float(np.percentile(first, 90)) if first.size else math.nan)
        inter = itl[low:high]
        inter = np.minimum(inter[~np.isnan(inter)], 600.0)
        timeline.itl_p90_s.append(float(np.percentile(inter, 90)) if inter.size else math.nan)


def simulate(
    setup: SimSetup, workload: Workload, controller: Controller, *, record_decisions: bool = False
) -> SimResult:
    """Replay `workload` through the pools of `setup` with `controller` deciding replicas.

    Raises NothingMeasured for a run that would measure nothing (see `check_measurable`)."""
    check_measurable(setup, workload)
    wall_start = time.perf_counter()
    replay = _Replay(setup, workload, controller, record_decisions)
    replay.run()
    return replay.result(wall_start)


class _Requests:
    """The workload's requests as arrays: their sizes, their prefill and hand-off costs, and what happened
    to each (rejected, engine TTFT, first token, finish)."""

    def __init__(self, setup: SimSetup, workload: Workload, decode: DecodePool) -> None:
        model = setup.model
        eff = setup.engine
        pre = setup.prefill
        self.count = workload.requests
        self.arrivals = workload.arrivals
        self.prompt = workload.prompt_tokens.astype(np.float64)
        self.output = workload.output_tokens.astype(np.float64)
        # prefill time and KV hand-off of every prompt, vectorised
        link = kv_link_bytes_per_s(pre.tensor_parallel, setup.decode.tensor_parallel, setup.rdma)
        self.service = _per_prompt(
            lambda p: prefill_seconds(model, pre.accelerator, pre.tensor_parallel, p, eff), self.prompt
        )
        self.transfer = _per_prompt(lambda p: kv_transfer_seconds(model, p, link, eff), self.prompt)
        self.rejected = (self.prompt + self.output > decode.capacity) | (self.prompt > model.max_context)
        self.ttft = np.full(self.count, np.inf)
        self.first_token = np.full(self.count, np.nan)
        self.finish = np.full(self.count, np.nan)
        self.engine_ttft = np.zeros(self.count)


class _Meters:
    """The engines' counters and histograms, as a scrape reads them."""

    def __init__(self, model: ModelShape, prompt: FloatArray) -> None:
        self.arrivals = 0
        self.prefill_done = 0
        self.admitted = 0
        self.finished = 0
        self.prompt_tokens = 0.0
        self.prefill_busy_s = 0.0
        self.generated_tokens = 0.0
        self.finished_output_tokens = 0.0
        self.ttft_hist = np.zeros(BUCKETS.size)
        length_bounds = prompt_buckets(model.max_context)
        self.prompt_hist = np.zeros(length_bounds.size)
        self.length_bucket = np.minimum(np.searchsorted(length_bounds, prompt), length_bounds.size - 1)
        self.decode_ttft_hist = np.zeros(BUCKETS.size)
        self.itl_hist = np.zeros(BUCKETS.size)


class _Replay:
    """One run of `simulate`: the pools, the requests and the meters, advanced one `dt` step at a time."""

    def __init__(self, setup: SimSetup, workload: Workload, controller: Controller, record_decisions: bool) -> None:
        self.setup = setup
        self.controller = controller
        self.record_decisions = record_decisions
        self.decode = DecodePool(setup.model, setup.decode.accelerator, setup.decode.tensor_parallel, setup.engine)
        self.requests = _Requests(setup, workload, self.decode)
        self.meters = _Meters(setup.model, self.requests.prompt)
        self.prefill_replicas = [self._new_prefill(0.0, 0.0) for _ in range(setup.prefill.initial_replicas)]
        self.prefill_draining: list[PrefillReplica[int]] = []
        for _ in range(setup.decode.initial_replicas):
            self.decode.add(0.0, 0.0)
        self.decode_inbox: list[tuple[float, int]] = []  # (arrival at decode, request)
        self.decode_queue: deque[int] = deque()
        self.accel_seconds = {"prefill": 0.0, "decode": 0.0}
        self.max_replicas = {"prefill": setup.prefill.initial_replicas, "decode": setup.decode.initial_replicas}
        self.scale_events = 0
        self.decisions: list[tuple[float, str, str]] = []
        self.snapshots: list[_Snapshot] = []
        self.timeline = Timeline()
        self.end = workload.duration_s
        self.next_scrape = 0.0
        self.next_decision = controller.interval_s
        self.next_timeline = setup.warmup_s + setup.timeline_step_s
        self.measuring = setup.warmup_s <= 0.0
        self.arrival_index = 0

    def _new_prefill(self, ready_at: float, billed_from: float) -> PrefillReplica[int]:
        setup = self.setup
        return PrefillReplica(setup.prefill_batch_tokens, setup.prefill_batch_overhead_s, ready_at, billed_from)

    def _decode_serving(self) -> int:
        """Decode replicas starting or ready (not draining)."""
        return int(np.count_nonzero((self.decode.state == 1) | (self.decode.state == 2)))

    def run(self) -> None:
        """Every step until the drain ends, or earlier once every request is done."""
        dt = self.setup.dt
        end = self.end
        for step_index in range(math.ceil((end + self.setup.drain_s) / dt)):
            now = step_index * dt
            later = now + dt
            if not self.measuring and now >= self.setup.warmup_s:
                self.measuring = True
                self.max_replicas = {"prefill": len(self.prefill_replicas), "decode": self._decode_serving()}
            billing = self.measuring and now < end
            starting = self.decode.state == 1  # replicas becoming ready
            if starting.any():
                self.decode.state[starting & (self.decode.ready_at <= now)] = 2
            self._arrive(later)
            for replica in self.prefill_replicas:
                self._advance_prefill(replica, later)
            for replica in self.prefill_draining:
                self._advance_prefill(replica, later)
            if self.prefill_draining:
                self.prefill_draining = [r for r in self.prefill_draining if r.batch or r.queue]
            self._admit_decode(now, later)
            self._step_decode(later)
            if billing:
                self._bill()
            if now >= self.next_scrape:
                self._scrape(now)
            if now < end and now >= self.next_decision:
                self._decide(now)
            if now >= self.next_timeline and now <= end:
                self._record_timeline(now)
            if now > end and self._idle():
                break

    def _idle(self) -> bool:
        """Every request arrived and nothing is queued or running anywhere."""
        decode = self.decode
        idle = not self.decode_queue and not self.decode_inbox and not (decode.batch > 0).any()
        return (self.arrival_index >= self.requests.count and idle
                and not any(r.batch or r.queue for r in self.prefill_replicas))

    def _advance_prefill(self, replica: PrefillReplica[int], until: float) -> None:
        """Runs `replica`'s batches that end by `until`; their requests leave for decode."""
        requests = self.requests
        meters = self.meters
        for done_at, batch in replica.advance(until):
            for request, tokens, seconds in batch:
                meters.prefill_busy_s += seconds
                requests.engine_ttft[request] = done_at - requests.arrivals[request]
                meters.ttft_hist[_bucket(requests.engine_ttft[request])] += 1
                meters.prompt_hist[meters.length_bucket[request]] += 1
                meters.prompt_tokens += tokens
                meters.prefill_done += 1
                heapq.heappush(self.decode_inbox, (done_at + requests.transfer[request], request))

    def _arrive(self, later: float) -> None:
        """Arrivals before `later` go to the ready prefill replica with the least outstanding work."""
        requests = self.requests
        while self.arrival_index < requests.count and requests.arrivals[self.arrival_index] < later:
            request = self.arrival_index
            self.arrival_index += 1
            self.meters.arrivals += 1
            at = float(requests.arrivals[request])
            if requests.rejected[request]:
                continue
            best = self._route(at)
            self._advance_prefill(best, at)
            best.submit(request, requests.prompt[request], requests.service[request], at)

    def _route(self, at: float) -> PrefillReplica[int]:
        """The router's choice at `at`: the least outstanding work among ready replicas."""
        best: PrefillReplica[int] | None = None
        best_work = math.inf
        for replica in self.prefill_replicas:
            if replica.ready_at > at:
                continue
            work = replica.outstanding(at)
            if work < best_work:
                best, best_work = replica, work
        if best is None:  # nothing ready yet: the earliest starting replica takes it
            best = min(self.prefill_replicas, key=lambda r: r.ready_at)
        return best

    def _admit_decode(self, now: float, later: float) -> None:
        """Decode admission: FIFO, to the ready replica with the most free KV cache."""
        decode = self.decode
        requests = self.requests
        while self.decode_inbox and self.decode_inbox[0][0] < later:
            self.decode_queue.append(heapq.heappop(self.decode_inbox)[1])
        while self.decode_queue:
            request = self.decode_queue[0]
            ready = decode.state == 2
            if not ready.any():
                break
            free = np.where(ready, decode.capacity - decode.reserved, -np.inf)
            slot = int(np.argmax(free))
            need = requests.prompt[request] + requests.output[request]
            if free[slot] < need:
                break
            self.decode_queue.popleft()
            self.meters.admitted += 1
            first_step = decode.admit(slot, request, requests.prompt[request], requests.output[request])
            # Arrived this step: the first step starts at its arrival, else now.
            arrived = max(now, float(requests.transfer[request] + requests.arrivals[request]
                                     + requests.engine_ttft[request]))
            first = min(arrived, later) + first_step
            requests.first_token[request] = first
            requests.ttft[request] = first - requests.arrivals[request]
            self.meters.decode_ttft_hist[
                _bucket(first - requests.arrivals[request] - requests.engine_ttft[request])] += 1

    def _step_decode(self, later: float) -> None:
        """One decode step of every busy replica; draining replicas that emptied are gone."""
        decode = self.decode
        meters = self.meters
        active, steps_s, _, tokens, done = decode.step(later, self.setup.dt)
        if active.size:
            meters.generated_tokens += float(tokens.sum())
            buckets = np.minimum(np.searchsorted(BUCKETS, steps_s), BUCKETS.size - 1)
            np.add.at(meters.itl_hist, buckets, tokens)
            for _, request, _, tokens_out, finished_at in done:
                self.requests.finish[request] = max(finished_at, self.requests.first_token[request])
                meters.finished += 1
                meters.finished_output_tokens += tokens_out
        draining_empty = (decode.state == 3) & (decode.batch <= 0)
        if draining_empty.any():
            decode.state[draining_empty] = 0

    def _bill(self) -> None:
        """This step's accelerator time: every replica that exists, draining ones included."""
        dt = self.setup.dt
        pcount = self.setup.prefill.accelerators_per_replica
        self.accel_seconds["prefill"] += len(self.prefill_replicas) * pcount * dt
        self.accel_seconds["prefill"] += len(self.prefill_draining) * pcount * dt
        self.accel_seconds["decode"] += (
            int(np.count_nonzero(self.decode.state)) * self.setup.decode.accelerators_per_replica * dt
        )

    def _scrape(self, now: float) -> None:
        """What Prometheus would scrape from the engines at `now` (the newest 64 scrapes are kept)."""
        self.next_scrape += self.setup.scrape_interval_s
        decode = self.decode
        meters = self.meters
        ready_decode = decode.state == 2
        capacity = decode.capacity if decode.capacity > 0 else 1.0
        usage = float(np.mean(decode.reserved[ready_decode]) / capacity) if ready_decode.any() else 0.0
        self.snapshots.append(
            _Snapshot(
                time=now,
                arrivals=meters.arrivals,
                prefill_done=meters.prefill_done,
                prompt_tokens=meters.prompt_tokens,
                prefill_busy_s=meters.prefill_busy_s,
                generated_tokens=meters.generated_tokens,
                admitted=meters.admitted,
                finished=meters.finished,
                finished_output_tokens=meters.finished_output_tokens,
                ttft_hist=meters.ttft_hist.copy(),
                prompt_hist=meters.prompt_hist.copy(),
                decode_ttft_hist=meters.decode_ttft_hist.copy(),
                itl_hist=meters.itl_hist.copy(),
                prefill_waiting=sum(len(r.queue) for r in self.prefill_replicas),
                prefill_running=sum(len(r.batch) for r in self.prefill_replicas),
                prefill_ready=sum(1 for r in self.prefill_replicas if r.ready_at <= now),
                decode_running=int(decode.batch.sum()),
                decode_waiting=len(self.decode_queue),
                decode_ready=int(np.count_nonzero(ready_decode)),
                kv_usage=usage,
            )
        )
        if len(self.snapshots) > 64:
            del self.snapshots[:-64]

    def _decide(self, now: float) -> None:
        """The controller's tick: each pool moves to its desired replicas, within its bounds."""
        self.next_decision += self.controller.interval_s
        current = {"prefill": len(self.prefill_replicas), "decode": self._decode_serving()}
        desired = self.controller.decide(now, _picture(self.snapshots, now, self.setup), current)
        for role in ("prefill", "decode"):
            pool = self.setup.prefill if role == "prefill" else self.setup.decode
            target = max(pool.min_replicas, min(pool.max_replicas, desired.get(role, current[role])))
            if target == current[role]:
                continue
            self.scale_events += 1 if self.measuring else 0
            if self.record_decisions:
                self.decisions.append((now, role, f"{current[role]} -> {target}"))
            if role == "prefill":
                self._scale_prefill(now, current[role], target)
            else:
                self._scale_decode(now, current[role], target)

    def _scale_prefill(self, now: float, current: int, target: int) -> None:
        if target > current:
            self.prefill_replicas.extend(
                self._new_prefill(now + self.setup.startup_s, now) for _ in range(target - current)
            )
        else:
            # the operator's choice (scaling/victims.py): not ready first, then the least busy
            for replica in prefill_victims(self.prefill_replicas, now, current - target):
                self.prefill_replicas.remove(replica)
                if replica.ready_at > now or (not replica.batch and not replica.queue):
                    continue
                replica.draining = True
                self.prefill_draining.append(replica)
        if self.measuring:
            self.max_replicas["prefill"] = max(self.max_replicas["prefill"], len(self.prefill_replicas))

    def _scale_decode(self, now: float, current: int, target: int) -> None:
        if target > current:
            for _ in range(target - current):
                self.decode.add(now, now + self.setup.startup_s)
        else:
            self.decode.scale_down(current - target)
        if self.measuring:
            self.max_replicas["decode"] = max(self.max_replicas["decode"], self._decode_serving())

    def _record_timeline(self, now: float) -> None:
        """Replicas over time, for plots (latencies are filled in at the end)."""
        self.timeline.time_s.append(now - self.setup.warmup_s)
        self.timeline.prefill_replicas.append(len(self.prefill_replicas))
        self.timeline.decode_replicas.append(self._decode_serving())
        self.next_timeline += self.setup.timeline_step_s

    def result(self, wall_start: float) -> SimResult:
        """The measured requests' latencies, the bill and the timeline."""
        setup = self.setup
        requests = self.requests
        output = requests.output
        itl = np.where(
            output > 1, (requests.finish - requests.first_token) / np.maximum(output - 1.0, 1.0), np.nan
        )
        unfinished = np.isnan(requests.finish)
        ttft = np.where(unfinished, np.inf, requests.ttft)
        itl = np.where(unfinished, np.inf, itl)
        warmup = setup.warmup_s
        arrivals = requests.arrivals
        count = requests.count
        measured = slice(int(np.searchsorted(arrivals, warmup)), count) if warmup > 0 else slice(0, count)
        ttft, itl = ttft[measured], itl[measured]
        _fill_timeline(self.timeline, setup.timeline_step_s, arrivals[measured] - warmup, requests.prompt[measured],
                       ttft, itl)
        hours = {role: seconds / 3600.0 for role, seconds in self.accel_seconds.items()}
        usd = (hours["prefill"] * setup.prefill.accelerator.usd_per_hour
               + hours["decode"] * setup.decode.accelerator.usd_per_hour)
        return SimResult(
            policy=self.controller.name,
            requests=int(ttft.size),
            ttft_s=ttft,
            itl_s=itl,
            accelerator_seconds=self.accel_seconds,
            usd=usd,
            max_replicas=self.max_replicas,
            scale_events=self.scale_events,
            wall_s=time.perf_counter() - wall_start,
            ttft_target_s=setup.ttft_s,
            itl_target_s=setup.itl_s,
            timeline=self.timeline,
            decisions=self.decisions,
        )
