"""Prefill's error budget: the SLO allows 1 - percentile/100 of the requests over the TTFT target over
time, not in every replay window. The policy counts the requests the engines' TTFT histograms put over
the target (an exponentially weighted count over `budget_window_s`); while they stay below
`budget_spend` of the allowance, the replay's allowance grows in proportion (at most `max_budget_gain`
times), and it is back to `miss_share` once they reach it."""

from __future__ import annotations

import math
from typing import NamedTuple

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.engines import engine_adapter
from disagg.scaling.policy.histogram import share_above
from disagg.scaling.policy.picture import LoadPicture
from disagg.scaling.policy.settings import PolicySettings


class ErrorBudget(NamedTuple):
    """Prefill's error budget: exponentially weighted counts (time constant `budget_window_s`)."""

    sampled_at: float
    """The sample the counts last took in."""
    requests: float
    over: float
    """Of those, the requests over the TTFT target."""


def over_target(picture: LoadPicture, spec: InferenceServiceSpec) -> tuple[float, float] | None:
    """Requests per second whose first token came in the rate window, and the share of them over the
    TTFT target, as the engines' histograms tell it: decode's where it counts from the router (SGLang),
    else prefill's over the target less decode's own part at the percentile (vLLM: hand-off, admission,
    first step; an overestimate)."""
    target = spec.slo.ttft_ms / 1000.0
    decode, prefill = picture.decode, picture.prefill
    if decode is not None and decode.ttft_buckets and not engine_adapter(spec.engine).decode_ttft_from_handoff:
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
    out_of_reach: float = 0.0,
) -> ErrorBudget | None:
    """The error budget after this tick. A tick adds the requests of the time since the last one it
    counted (at most a rate window), at the share over the target its window shows; of the requests in
    reach only (`out_of_reach`: the share no replica count serves in time, all of them over the target)."""
    signals = picture.prefill
    assert signals is not None
    observed = over_target(picture, spec)
    if observed is None or (budget is not None and signals.sampled_at <= budget.sampled_at):
        return budget
    if budget is None:
        budget, since = ErrorBudget(signals.sampled_at, 0.0, 0.0), settings.signal_window_s
    else:
        since = min(signals.sampled_at - budget.sampled_at, settings.signal_window_s)
    in_reach = 1.0 - min(max(out_of_reach, 0.0), 1.0)
    requests = observed[0] * since * in_reach
    over = observed[0] * since * min(max(observed[1] - (1.0 - in_reach), 0.0), in_reach)
    kept = math.exp(-(signals.sampled_at - budget.sampled_at) / settings.budget_window_s)
    return ErrorBudget(signals.sampled_at, budget.requests * kept + requests, budget.over * kept + over)


def budget_gain(budget: ErrorBudget | None, slo_allows: float, settings: PolicySettings) -> tuple[float, str]:
    """How far the replay's allowance grows for the error budget left unspent, and a note saying why."""
    if budget is None or budget.requests < settings.budget_min_requests or slo_allows <= 0:
        return 1.0, ""
    share = budget.over / budget.requests
    spend = settings.spend(slo_allows) * slo_allows
    gain = min(settings.max_budget_gain, spend / share) if share > 0 else settings.max_budget_gain
    if gain <= 1.0:
        return 1.0, ""
    return gain, (f"; error budget: {share:.2%} over the target lately, allowance x{gain:.1f}")
