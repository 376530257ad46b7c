"""The policy's settings: each default is what the autoscaling benchmark measured (docs/capacity-and-simulation.md)."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.capacity.roofline import DEFAULT_EFFICIENCY, Efficiency


@dataclass(frozen=True)
class PolicySettings:
    """Knobs of the policy; the defaults are what bench/autoscale.py measures."""

    tick_s: float = 15.0
    """How often the operator calls decide()."""
    scale_down_window_s: float = 1200.0
    """A pool scales down only to the highest count recommended during this window."""
    hysteresis: float = 0.05
    """A scale-down must remove at least this share of the pool (and at least one replica): one replica
    up to 20, two up to 40. (At 10 % an 11-replica pool could not go to 10: on the Azure code day that
    held 6 % more accelerator-hours for 0.08 points of attainment; the window already keeps a pool from
    flapping.)"""
    staleness_s: float = 90.0
    """Signals older than this are treated as missing."""
    prefill_headroom: float = 0.0
    """Extra share of prefill load provisioned for (the replay and the learnt effective load already
    provision for what the pool saw)."""
    decode_headroom: float = 0.0
    """Extra share of decode load provisioned for."""
    target_fraction: float = 0.85
    """Plan prefill for this share of the TTFT target, keeping the rest as margin."""
    itl_target_fraction: float = 0.95
    """Plan decode's mean step for this share of the ITL target (the rest covers replicas busier than
    the mean). At 0.85 the MI300X decode pools held a replica more than static-best on the Mooncake
    hours (5 vs 4, 3.3 vs 2) with ITL p99 under 46 ms of 50; at 0.95 the observed ITL p99 stays at or
    under 49 ms on every benchmark workload (1.0 sizes the same: the KV cache binds there)."""
    backlog_drain_s: float = 60.0
    """Waiting requests are added to the load as if they had to be served within this time."""
    correction_smoothing: float = 0.1
    """Weight of a newest observed/predicted ratio above the running correction (things got worse)."""
    correction_decay: float = 0.1
    """Weight of a newest ratio below the running correction (bursts are provisioned for by the replay
    and the effective load, not by the correction)."""
    correction_bounds: tuple[float, float] = (0.6, 6.0)
    """The correction never leaves this range (a broken histogram must not run the pool to its max)."""
    signal_window_s: float = 30.0
    """The rate window of the signals: latency observed less than this after the ready count changed
    mixes two pool sizes and does not update what the policy learns."""
    memory_ticks: int = 40
    """How many recent steady ticks the prefill effective load and TTFT floor are fitted to."""
    fit_percentile: float = 99.0
    """The effective load is also fitted to the TTFT at this percentile, and the lower of that and the
    one fitted at the SLO's percentile counts: at a lower percentile the M/M/c wait reads zero until the
    pool is nearly full, and a load factor fitted there alone grew as the SLO loosened (p99 -> p90 cost
    12 % more accelerator-hours on a workload of periodic bursts, sized by the step test with that
    factor); one fitted at p99 alone sized p90 pools for the long prompts' queueing that only p99 shows
    (generalisation workload g13: load factor 3.4)."""
    load_factor_bounds: tuple[float, float] = (1.0, 8.0)
    """The effective-load factor stays in this range: never smoother than Poisson arrivals."""
    slo_guard_step: float = 0.05
    """When a steady tick's TTFT at the percentile exceeds the target itself (the SLO broken, whatever the
    model predicted), the prefill effective load grows by this share ..."""
    slo_guard_decay: float = 0.005
    """... and shrinks back towards the fitted one by this share on every tick that keeps the SLO: the
    guard settles where about decay / (step + decay) of the rate windows (here 1 in 11) miss the target."""
    slo_guard_bounds: tuple[float, float] = (1.0, 4.0)
    replay_s: float = 300.0
    """Prefill is sized by replaying the load of this many recent seconds against candidate pool sizes."""
    persist_s: float = 60.0
    """Prefill is also sized for the newest load lasting this long: a step up is answered as soon as the
    signals show it, not once the replay has seen enough of it to outweigh the calm before (that took
    10-20 ticks). 0 turns the step test off, for decode too."""
    persist_step: float = 2.0
    """... but only when that load is at least this multiple of the replay's mean: a step to a new level,
    not one of the bursts the replay already provisions for (sizing every window as if it lasted cost
    7-28 % more accelerator-hours on the four production traces' hours for 0.0-0.2 points of attainment;
    at 1.5x still 0-10 %, at 2x nothing)."""
    step_noise_z: float = 4.0
    """The last scrape interval counts as a step only when its request count is this many standard
    deviations (Poisson) above what the recent load would bring in the same time: a 1-s interval at
    6 req/s reaches 2x by chance every few minutes, 6 + 4 x sqrt(6) = 16 requests about once in 2,000."""
    step_upper_sd: float = 1.0
    """A step seen in the last scrape interval is sized for its request count plus this many standard
    deviations (46 requests in 2 s are a level of 23 +- 3.4 req/s)."""
    miss_share: float = 0.5
    """Prefill aims at this share of the misses the SLO allows (1 - percentile/100) over the replay."""
    budget_window_s: float = 21600.0
    """The error budget's memory (time constant of its weighted counts of requests and of those over the
    TTFT target). Hours, not minutes: with 1 h the quiet hours after a busy peak spent again what the
    peak had used (Azure code day 99.35 % -> 99.28 %; with plain 1-h windows 99.09 %) ..."""
    budget_spend: float = 0.5
    """... while the share over the target stays below this share of what the SLO allows (at a 1 %
    allowance; `budget_spend_wide` at 10 %, linear in between), the replay's allowance grows by
    budget_spend x allowance / share ..."""
    budget_spend_wide: float = 0.65
    """... a larger allowance holds more misses, and more of it can be spent: at p90 0.5 left bursty
    services at 3 % misses for 1.2-1.5x static-best's accelerator-hours; 0.8 took a p90 workload to
    89.1 % and a p99 one to 97.7 % (bursts that came after the budget had shown slack) ..."""
    max_budget_gain: float = 4.0
    """... by at most this factor (miss_share 0.5 x 4: the replay may plan for twice the SLO's allowance
    while the last hours kept well inside it) ..."""
    budget_min_requests: float = 2000.0
    """... and only once the count holds this many requests (20 misses at a 1 % allowance; a share of
    fewer says little about a 1 % tail). The count begins a scale-down window after the policy first
    sized the pool (`budget_after_s`)."""
    horizon_per_budget: float = 4.0
    """Decode is sized for the mean load over this many TTFT budgets (at least one rate window, at most
    `max_horizon_s`): the queue ahead of it absorbs a 25 % overload for about four budgets."""
    max_horizon_s: float = 180.0
    min_horizon_ticks: int = 2
    """Decode's horizon spans at least this many ticks' samples: with a 1-s TTFT target four budgets are
    3 s, and decode sized on one scrape of its running-sequences gauge followed that gauge's noise (Azure
    conversation hour: a one-tick burst asked for a 5th replica now and then, the scale-down window held
    it on 361 of 399 ticks, where 4 keep the same 99.96 %)."""
    efficiency: Efficiency = DEFAULT_EFFICIENCY
    """Roofline efficiency factors of the capacity-model prior."""
    kv_over_rdma: bool = True
    """Whether KV hand-offs run over RDMA (else TCP) when predicting the TTFT budget."""

    @property
    def step_hold_s(self) -> float:
        """How long a count sized for a step up (the newest load as if it lasted `persist_s`) is held while
        the service leaves its error budget well unspent: until the rate windows hold the step (persist_s,
        a signal window and a tick); then only as far as their own recommendations ask. While the budget
        is spent it is held for the whole scale-down window (the bursts that follow a burst are caught by
        the pool kept up). Never longer than the scale-down window itself."""
        return min(self.persist_s + self.signal_window_s + self.tick_s, self.scale_down_window_s)

    @property
    def budget_after_s(self) -> float:
        """The error budget counts from this long after the policy first sized a pool: a new service's
        ramp-up (or the benchmark's cold start) left its misses in the count for hours and said nothing
        of the slack the sizing leaves."""
        return self.scale_down_window_s

    def spend(self, slo_allows: float) -> float:
        """The share of the SLO's allowance the error budget lets the replay plan to spend."""
        wide = min(max((slo_allows - 0.01) / 0.09, 0.0), 1.0)
        return self.budget_spend + (self.budget_spend_wide - self.budget_spend) * wide
