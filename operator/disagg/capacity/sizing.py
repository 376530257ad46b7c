"""Pool sizing from the roofline: how many replicas of each phase a load needs to keep the SLO.

Shared by the planner, the autoscaling policy and the simulator's oracle, so that all three agree on
what "enough" means.

Prefill is a queue: requests arrive at `rate`, each occupies one replica for its prompt's prefill time.
The TTFT at a percentile is that service time plus the queueing delay of an M/M/c queue (Erlang C),
which is close for Poisson arrivals and optimistic for bursty ones (the autoscaler's online correction
learns the difference). Decode is a batch: a replica runs as many sequences as its step time (the ITL)
and its KV cache allow; the pool needs enough of them for the generated tokens per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.capacity.models import ModelShape
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_max_batch,
    decode_step_seconds,
    prefill_seconds,
)
from disagg.catalog.accelerators import Accelerator


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with `servers` and `offered_load` (= rate/mu)."""
    if offered_load <= 0:
        return 0.0
    if offered_load >= servers:
        return 1.0
    blocking = 1.0  # Erlang B by its stable recursion
    for k in range(1, servers + 1):
        blocking = offered_load * blocking / (k + offered_load * blocking)
    return servers * blocking / (servers - offered_load * (1.0 - blocking))


def queue_wait_percentile(servers: int, rate: float, service_s: float, percentile: float) -> float:
    """Waiting time at `percentile` (0-100) of an M/M/c queue; infinite when the queue is overloaded."""
    if rate <= 0 or service_s <= 0:
        return 0.0
    offered = rate * service_s
    if offered >= servers:
        return math.inf
    waiting_probability = erlang_c(servers, offered)
    tail = 1.0 - percentile / 100.0
    if waiting_probability <= tail:
        return 0.0
    return math.log(waiting_probability / tail) / (servers / service_s - rate)


@dataclass(frozen=True)
class PrefillSizing:
    """Replicas a prefill load needs, with the figures that explain it."""

    replicas: int
    service_s: float
    """Prefill time of a mean prompt on one replica."""
    tokens_per_s_per_replica: float
    predicted_ttft_s: float
    """Predicted TTFT at the percentile with `replicas` (prefill side: queue + prefill)."""
    utilization: float


def predicted_prefill_ttft(
    replicas: int, rate: float, service_s: float, percentile: float
) -> float:
    """Prefill-side TTFT at `percentile`: queueing at `replicas` plus one mean prompt's prefill."""
    if replicas <= 0:
        return math.inf
    return queue_wait_percentile(replicas, rate, service_s, percentile) + service_s


def size_prefill(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    *,
    prompt_tokens_per_s: float,
    mean_prompt_tokens: float,
    ttft_budget_s: float,
    percentile: float,
    correction: float = 1.0,
    headroom: float = 0.0,
    max_utilization: float = 0.9,
    max_replicas: int = 1000,
    eff: Efficiency = DEFAULT_EFFICIENCY,
    service_scale: float = 1.0,
) -> PrefillSizing:
    """Fewest replicas whose predicted prefill TTFT at `percentile` stays within `ttft_budget_s`.

    `correction` multiplies predicted latencies (observed / predicted, learnt online: it absorbs what the
    mean-prompt queue model misses, such as the spread of prompt sizes and bursty arrivals); `headroom`
    adds a share of load; utilisation never exceeds `max_utilization`. When no count up to
    `max_replicas` meets the budget, the answer is the count that keeps utilisation at half of
    `max_utilization`. `service_scale` multiplies the roofline's prefill time of the mean prompt (the
    measured mean prefill time per request over the predicted one).
    """
    mean_prompt = max(mean_prompt_tokens, 1.0)
    service = prefill_seconds(model, accelerator, tensor_parallel, mean_prompt, eff) * service_scale
    per_replica = mean_prompt / service
    rate = max(prompt_tokens_per_s, 0.0) * (1.0 + headroom) / mean_prompt
    if rate <= 0:
        return PrefillSizing(1, service, per_replica, service * correction, 0.0)
    least = max(1, math.ceil(rate * service / max_utilization))
    fallback = max(least, math.ceil(rate * service / (max_utilization / 2.0)))
    for replicas in range(least, max(least, max_replicas) + 1):
        ttft = predicted_prefill_ttft(replicas, rate, service, percentile) * correction
        if ttft <= ttft_budget_s:
            return PrefillSizing(replicas, service, per_replica, ttft, rate * service / replicas)
        if replicas >= fallback:
            break
    replicas = fallback
    return PrefillSizing(
        replicas, service, per_replica, predicted_prefill_ttft(replicas, rate, service, percentile) * correction,
        rate * service / replicas,
    )


@dataclass(frozen=True)
class DecodeSizing:
    """Replicas a decode load needs, with the figures that explain it."""

    replicas: int
    max_batch: float
    """Sequences one replica runs within the ITL target and its KV cache."""
    tokens_per_s_per_replica: float
    predicted_itl_s: float
    """Predicted step time of one replica at the load's batch with `replicas` (times the correction)."""


def size_decode(
    model: ModelShape,
    accelerator: Accelerator,
    tensor_parallel: int,
    *,
    generation_tokens_per_s: float,
    concurrent_sequences: float,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    itl_target_s: float,
    correction: float = 1.0,
    headroom: float = 0.0,
    eff: Efficiency = DEFAULT_EFFICIENCY,
) -> DecodeSizing:
    """Fewest replicas that generate `generation_tokens_per_s` and hold `concurrent_sequences` within the ITL.

    The mean context of a running sequence is its prompt plus half its output; each sequence reserves its
    full prompt plus output in the KV cache. `correction` multiplies the predicted step time.
    """
    context = max(mean_prompt_tokens, 1.0) + max(mean_output_tokens, 1.0) / 2.0
    reserved = max(mean_prompt_tokens, 1.0) + max(mean_output_tokens, 1.0)
    batch = decode_max_batch(
        model, accelerator, tensor_parallel, context, itl_target_s / max(correction, 1e-6), eff, reserved
    )
    # A step slower than the target even for one sequence is not cured by more replicas: never plan for
    # fewer sequences per replica than the uncorrected capacity shrunk by the correction.
    uncorrected = decode_max_batch(model, accelerator, tensor_parallel, context, itl_target_s, eff, reserved)
    batch = max(batch, uncorrected / max(correction, 1.0), 1.0)
    step = decode_step_seconds(model, accelerator, tensor_parallel, batch, context, eff) * correction
    per_replica = batch / step
    load_tokens = max(generation_tokens_per_s, 0.0) * (1.0 + headroom)
    load_sequences = max(concurrent_sequences, 0.0) * (1.0 + headroom)
    replicas = max(1, math.ceil(load_tokens / per_replica - 1e-9), math.ceil(load_sequences / batch - 1e-9))
    # Batch per replica once the load is spread: the ITL the pool is predicted to deliver.
    spread = max(load_tokens / per_replica * batch, load_sequences) / replicas
    itl = decode_step_seconds(model, accelerator, tensor_parallel, max(spread, 1.0), context, eff) * correction
    return DecodeSizing(replicas, batch, per_replica, itl)


def settled_utilization(replicas: int, service_s: float, span_s: float) -> float:
    """The highest utilisation whose M/M/c queue settles within `span_s`: the relaxation time of a
    queue of `replicas` at utilisation rho is about (service / replicas) / (1 - sqrt(rho))^2. Above it, a
    window's queue is still building when the window ends (and a fluid backlog describes it better)."""
    settle = math.sqrt(service_s / (replicas * span_s)) if span_s > 0 and replicas > 0 else 0.0
    return min(max((1.0 - settle) ** 2, 0.5), 0.99)


def prefill_miss_share(
    replicas: int,
    windows: list[tuple[float, float]],
    *,
    step_s: float,
    service_s: float,
    tokens_per_replica_s: float,
    ttft_budget_s: float,
    load_factor: float = 1.0,
    floor_s: float | None = None,
) -> float:
    """Predicted share of requests whose prefill-side TTFT exceeds `ttft_budget_s`, had the pool had
    `replicas` during `windows` ((prompt tokens/s, requests/s), one every `step_s`).

    Two time scales. A fluid backlog carries what the windows brought beyond the pool's throughput from
    one window to the next; it delays every request of the window. Within a window, an M/M/c queue at
    `load_factor` x the window's load leaves P(wait > t) = C x exp(-(c - a) t / service), and a request
    misses when its wait exceeds the budget less the backlog's delay and the floor (`floor_s`, default
    one mean prefill: the part of the TTFT more replicas do not shorten). The queue relaxes towards
    that distribution only as fast as (service / c) / (1 - sqrt(rho))^2, so a window's utilisation counts
    up to the level it settles at within one step (`settled_utilization`); above it the backlog takes over.
    """
    if replicas <= 0 or tokens_per_replica_s <= 0:
        return 1.0
    capacity = replicas * tokens_per_replica_s
    rho_cap = settled_utilization(replicas, service_s, step_s)
    floor = service_s if floor_s is None else floor_s
    backlog = 0.0
    missed = total = 0.0
    for tokens, requests in windows:
        backlog = max(0.0, backlog + (tokens - capacity) * step_s)
        remaining = ttft_budget_s - floor - backlog / capacity
        if remaining <= 0:
            miss = 1.0
        else:
            offered = min(load_factor * tokens / tokens_per_replica_s, rho_cap * replicas)
            theta = (replicas - offered) / service_s
            miss = min(1.0, erlang_c(replicas, offered) * math.exp(-theta * remaining))
        missed += requests * miss
        total += requests
    return missed / total if total > 0 else 0.0


def size_prefill_attainment(
    windows: list[tuple[float, float]],
    *,
    step_s: float,
    service_s: float,
    tokens_per_replica_s: float,
    ttft_budget_s: float,
    miss_share: float,
    load_factor: float = 1.0,
    floor_s: float | None = None,
    max_utilization: float = 0.95,
    max_replicas: int = 1000,
) -> tuple[int, float]:
    """Fewest replicas whose predicted miss share over `windows` (see `prefill_miss_share`) is at most
    `miss_share`, with the windows' mean effective utilisation at most `max_utilization`; and that share."""
    if not windows or tokens_per_replica_s <= 0:
        return 1, 0.0
    mean_tokens = sum(tokens for tokens, _ in windows) / len(windows)
    low = max(1, math.ceil(load_factor * mean_tokens / (tokens_per_replica_s * max_utilization)))
    low = min(low, max_replicas)

    def share(replicas: int) -> float:
        return prefill_miss_share(
            replicas, windows, step_s=step_s, service_s=service_s, tokens_per_replica_s=tokens_per_replica_s,
            ttft_budget_s=ttft_budget_s, load_factor=load_factor, floor_s=floor_s,
        )

    # The share falls as replicas grow: double until it fits, then bisect.
    high = low
    high_share = share(high)
    while high_share > miss_share and high < max_replicas:
        low = high + 1
        high = min(max_replicas, high * 2)
        high_share = share(high)
    while low < high:
        middle = (low + high) // 2
        middle_share = share(middle)
        if middle_share <= miss_share:
            high, high_share = middle, middle_share
        else:
            low = middle + 1
    return high, high_share
