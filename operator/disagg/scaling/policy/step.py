"""A step up: the newest load well above the recent mean is sized for at once, not once the rate windows
have caught up. The last scrape interval's request count shows a step first; it counts only when it is
more than Poisson noise around the recent load (`step_noise_z`)."""

from __future__ import annotations

import math

from disagg.scaling.policy.picture import PoolSignals
from disagg.scaling.policy.settings import PolicySettings
from disagg.scaling.policy.state import PoolMemory


def step_rate(
    signals: PoolSignals | None, baseline_rps: float, settings: PolicySettings
) -> tuple[float, float] | None:
    """The last scrape interval's requests/s, and the upper end of what its count says (what a step is
    sized for), when they are more than Poisson noise around `baseline_rps` over the interval, else None."""
    if signals is None or (length := signals.last_interval_s) is None:
        return None
    rate, count = signals.request_rate_last or 0.0, signals.requests_last or 0.0  # both > 0 with a length
    expected = max(baseline_rps, 0.0) * length
    if count < expected + settings.step_noise_z * math.sqrt(max(expected, 1.0)):
        return None
    # One interval is a small sample of the new level: size for its upper end (a pool scaled up too far
    # comes back after the scale-down window; one left short breaks the SLO until the windows catch up).
    return rate, rate * (count + settings.step_upper_sd * math.sqrt(count)) / count


def step_baseline(usual: float, newest: float, memory: PoolMemory, now: float, settings: PolicySettings) -> float:
    """The load a step up is measured against: the recent mean or, for `max_horizon_s` after a step was
    sized for, the level of that step as best known: what its interval showed or, once the rate window
    has caught up, the window's load (a step first seen in an interval it only partly filled reads low,
    and the noise of the new level is not a second step)."""
    if memory.step is not None and now - memory.step[0] <= settings.max_horizon_s:
        return max(usual, memory.step[1], newest)
    return usual
