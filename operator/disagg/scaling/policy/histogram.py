"""Reading Prometheus histograms given as (upper bound, cumulative count or rate) pairs, ascending."""

from __future__ import annotations

import math
from collections.abc import Sequence


def histogram_quantile(q: float, pairs: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative rate) pairs."""
    if not pairs:
        return None
    buckets = sorted(pairs)
    total = buckets[-1][1]
    if total <= 0 or math.isnan(total):
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # the answer is above the highest finite bucket: its bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return buckets[-1][0]


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
