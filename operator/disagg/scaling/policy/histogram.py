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


def tail_share(bound: float, buckets: Sequence[tuple[float, float]], largest: float) -> float | None:
    """Share of a size histogram's observations above `bound` (prompt lengths: 1-2-5 buckets, the last one
    open up to `largest`). Within the bucket holding `bound` the density is taken as a power of the size,
    its exponent from that bucket's and a neighbour's mass per unit of log size: sizes thin out across a
    bucket of the tail, and a linear reading of a 50k-100k bucket put four times the prompts over 85k
    that were there. None for an empty histogram."""
    edges = sorted((min(upper, largest) if math.isinf(upper) else upper, count) for upper, count in buckets)
    if not edges or edges[-1][1] <= 0:
        return None
    total = edges[-1][1]
    uppers = [upper for upper, _ in edges]
    masses = [count - (edges[i - 1][1] if i else 0.0) for i, (_, count) in enumerate(edges)]
    index = next((i for i, upper in enumerate(uppers) if bound <= upper), None)
    if index is None:
        return 0.0
    above = (total - edges[index][1]) / total
    lower = uppers[index - 1] if index else 0.0
    upper = uppers[index]
    if masses[index] <= 0 or bound <= lower:
        return above + max(masses[index], 0.0) / total
    if lower <= 0 or upper <= lower:
        return above + masses[index] / total * (upper - bound) / (upper - lower) if upper > lower else above
    slope = _log_density_slope(index, uppers, masses)
    low, high, at = 0.0, math.log(upper / lower), math.log(bound / lower)
    if abs(slope) < 1e-6:
        within = (high - at) / high
    else:
        within = (math.exp(slope * high) - math.exp(slope * at)) / (math.exp(slope * high) - math.exp(slope * low))
    return above + masses[index] / total * min(max(within, 0.0), 1.0)


def _log_density_slope(index: int, uppers: list[float], masses: list[float]) -> float:
    """The slope of log(mass per unit of log size) from bucket `index` to its next non-empty neighbour
    (or from its previous one when nothing lies above), at the buckets' geometric centres."""

    def density(i: int) -> tuple[float, float] | None:
        lower = uppers[i - 1] if i else 0.0
        if lower <= 0 or masses[i] <= 0 or uppers[i] <= lower:
            return None
        return math.log(math.sqrt(lower * uppers[i])), math.log(masses[i] / math.log(uppers[i] / lower))

    here = density(index)
    neighbour = density(index + 1) if index + 1 < len(uppers) else None
    if neighbour is None and index > 0:
        neighbour = density(index - 1)
    if here is None or neighbour is None or neighbour[0] == here[0]:
        return 0.0
    return min(max((neighbour[1] - here[1]) / (neighbour[0] - here[0]), -20.0), 20.0)
