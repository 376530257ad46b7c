"""Prefill's error budget: the SLO allows 1 - percentile/100 of the requests over the TTFT target over
time, not in every replay window. The policy counts the requests the engines' TTFT histograms put over
the target (an exponentially weighted count over `budget_window_s`); while they stay below
`budget_spend` of the allowance, the replay's allowance grows in proportion (at most `max_budget_gain`
times), and it is back to `miss_share` once they reach it."""

from __future__ import annotations

import math
from typing import NamedTuple

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.catalog.engines import ENGINES
from disagg.scaling.policy.picture import LoadPicture
from disagg.scaling.policy.settings import PolicySettings


class ErrorBudget(NamedTuple):
    """Prefill's error budget: exponentially weighted counts (time constant `budget_window_s`)."""

    sampled_at: float
    """The sample the counts last took in."""
    requests: float
    over: float
    """Of those, the requests over the TTFT target."""


def share_above(bound: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Share of a cumulative histogram's observations above `bound`, linear within the bucket holding
    it (histogram_quantile's assumption); None for an empty histogram."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for upper, count in buckets:
        if bound <= upper:
            if math.isinf(upper):
                return (total - lower_count) / total
            within = (bound - lower_bound) / (upper - lower_bound) if upper > lower_bound else 1.0
            below = lower_count + (count - lower_count) * min(max(within, 0.0), 1.0)
            return (total - below) / total
        lower_bound, lower_count = upper, count
    return 0.0


def over_target(picture: LoadPicture, spec: InferenceServiceSpec) -> tuple[float, float] | None:
    """Requests per second whose first token came in the rate window, and the share of them over the
    TTFT target, as the engines' histograms tell it: decode's where it counts from the router (SGLang),
    else prefill's over the target less decode's own part at the percentile (vLLM: hand-off, admission,
    first step; an overestimate)."""
    target = spec.slo.ttft_ms / 1000.0
    decode, prefill = picture.decode, picture.prefill
    if decode is not None and decode.ttft_buckets and not ENGINES[spec.engine.kind].decode_ttft_from_handoff:
        buckets, bound = decode.ttft_buckets, target
    elif prefill is not None and prefill.ttft_buckets:
        own = decode.ttft_s if decode is not None and decode.ttft_s is not None else 0.0
        buckets, bound = prefill.ttft_buckets, max(target - own, 0.0)
    else:
        return None
    share = share_above(bound, buckets)
    return None if share is None else (buckets[-1][1], share)


def count_budget(
    budget: ErrorBudget | None, picture: LoadPicture, spec: InferenceServiceSpec, settings: PolicySettings,
) -> ErrorBudget | None:
    """The error budget after this tick. A tick adds the requests of the time since the last one it
    counted (at most a rate window), at the share over the target its window shows."""
    signals = picture.prefill
    assert signals is not None
    observed = over_target(picture, spec)
    if observed is None or (budget is not None and signals.sampled_at <= budget.sampled_at):
        return budget
    if budget is None:
        budget, since = ErrorBudget(signals.sampled_at, 0.0, 0.0), settings.signal_window_s
    else:
        since = min(signals.sampled_at - budget.sampled_at, settings.signal_window_s)
    requests = observed[0] * since
    over = requests * min(max(observed[1], 0.0), 1.0)
    kept = math.exp(-(signals.sampled_at - budget.sampled_at) / settings.budget_window_s)
    return ErrorBudget(signals.sampled_at, budget.requests * kept + requests, budget.over * kept + over)


def budget_gain(budget: ErrorBudget | None, slo_allows: float, settings: PolicySettings) -> tuple[float, str]:
    """How far the replay's allowance grows for the error budget left unspent, and a note saying why."""
    if budget is None or budget.requests < settings.budget_min_requests or slo_allows <= 0:
        return 1.0, ""
    share = budget.over / budget.requests
    spend = settings.budget_spend * slo_allows
    gain = min(settings.max_budget_gain, spend / share) if share > 0 else settings.max_budget_gain
    if gain <= 1.0:
        return 1.0, ""
    return gain, (f"; error budget: {share:.2%} over the target lately, allowance x{gain:.1f}")
