"""What the policy remembers between ticks (immutable: `decide()` returns the next state) and what it answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.scaling.policy.budget import ErrorBudget


@dataclass(frozen=True)
class PoolMemory:
    """What the policy remembers about one pool between ticks."""

    recommendations: tuple[tuple[float, int], ...] = ()
    """(time, replicas) recommended during the scale-down window."""
    step_hold: tuple[float, int] | None = None
    """(until, replicas): a count sized for a step up, held for `step_hold_s` only (the scale-down window
    remembers what the step's ticks recommended without it)."""
    last_scale_at: float | None = None
    correction: float = 1.0
    """Decode only: observed / predicted step time, smoothed: multiplies the capacity model's steps."""
    service_correction: float = 1.0
    """Prefill only: observed / predicted prefill time per request, smoothed: the capacity model's
    throughput error (engine speed, and the spread of prompt sizes around the mean)."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    load_factor: float = 1.0
    """Prefill only: effective load / measured load (arrivals burstier than Poisson within the rate window
    queue like more load), fitted to the TTFT the pool reported."""
    fitted_load_factors: tuple[float, float] = (1.0, 1.0)
    """Prefill only: the load factor fitted at the SLO's percentile and at the fit percentile (each fit
    starts from its own last value; `load_factor` is the lower)."""
    queue_samples: tuple[tuple[int, float, float, float, float], ...] = ()
    """Prefill only: (ready replicas, requests/s, mean prefill s, TTFT at the SLO percentile, TTFT at the
    fit percentile) of recent steady ticks, to which the effective load and the TTFT floor are fitted."""
    slo_guard: float = 1.0
    """Prefill: extra effective-load factor while the observed TTFT breaks the SLO more often than the
    model expects (see `PolicySettings.slo_guard_step`); decode: extra share of sequences planned for
    while decode's own part of the TTFT (admission into a full KV cache) breaks it."""
    rate_samples: tuple[tuple[float, ...], ...] = ()
    """Prefill: (sample time, prompt tokens/s incl. backlog, requests/s) of recent ticks; decode: (sample
    time, generated tokens/s, sequences, mean prompt, mean output)."""
    step: tuple[float, float] | None = None
    """(sample time, load) of the last step up sized for at once (prefill prompt tok/s, decode generated
    tok/s): the next one must be a step above it, not the noise of the same level."""
    ready: int | None = None
    """Ready replicas at the last tick, and since when (sample time) that count holds."""
    ready_since: float | None = None
    error_budget: ErrorBudget | None = None
    """Prefill only: requests, and those over the TTFT target, lately."""
    sized_since: float | None = None
    """Sample time of the first signals the policy sized the pool from."""


@dataclass(frozen=True)
class PolicyState:
    """Per-service memory of the policy; immutable, `decide()` returns the next one."""

    pools: dict[str, PoolMemory] = field(default_factory=dict)

    def pool(self, role: str) -> PoolMemory:
        return self.pools.get(role, PoolMemory())


@dataclass(frozen=True)
class PoolDecision:
    """The policy's answer for one pool."""

    role: str
    current: int
    desired: int
    reason: str
    """Why, with the numbers that drove it."""
    changed: bool
    metrics_available: bool
    out_of_reach: tuple[float, str] | None = None
    """The share of the pool's recent requests no replica count serves within the SLO, and why."""


@dataclass(frozen=True)
class Need:
    """One pool's sizing on one tick, and what the policy remembers of it."""

    replicas: int
    correction: float
    service_correction: float
    mean_prompt: float | None
    mean_output: float | None
    explanation: str
    load_factor: float = 1.0
    queue_samples: tuple[tuple[int, float, float, float, float], ...] = ()
    slo_guard: float = 1.0
    rate_samples: tuple[tuple[float, ...], ...] = ()
    step: tuple[float, float] | None = None
    error_budget: ErrorBudget | None = None
    out_of_reach: tuple[float, str] | None = None
    held_replicas: int | None = None
    """What the scale-down window remembers of this tick: `replicas` without a step's sizing (None: the
    same)."""
    fitted_load_factors: tuple[float, float] = (1.0, 1.0)
