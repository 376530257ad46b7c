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
