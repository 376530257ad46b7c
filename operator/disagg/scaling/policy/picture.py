"""What the policy sees of a service on one tick: each pool's signals, as Prometheus (or the simulator) gives them."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.engines import Role


@dataclass(frozen=True)
class PoolSignals:
    """What Prometheus says about one pool, summed (counts, rates) or aggregated (latencies) over its pods."""

    ready_replicas: int
    sampled_at: float
    """Clock seconds of the newest sample these values come from."""
    waiting_requests: float | None = None
    running_requests: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    request_rate: float | None = None
    """Requests per second entering the pool."""
    request_rate_last: float | None = None
    """Requests per second over the last scrape interval only (Prometheus `irate`): noisier than
    `request_rate`, but it shows a step up a window sooner."""
    requests_last: float | None = None
    """How many requests that interval held (`idelta`): how far its rate is from noise."""
    kv_usage: float | None = None
    """Mean KV-cache occupancy of the pool's replicas, 0..1."""
    ttft_s: float | None = None
    """Time to first token at the SLO percentile, as the pool's engines measure it."""
    ttft_buckets: tuple[tuple[float, float], ...] = ()
    """The rate window's TTFT histogram: (upper bound, cumulative requests per second), ascending."""
    prompt_buckets: tuple[tuple[float, float], ...] = ()
    """The rate window's prompt-length histogram: (upper bound in tokens, cumulative requests per second)."""
    itl_s: float | None = None
    """Inter-token latency at the SLO percentile."""
    itl_buckets: tuple[tuple[float, float], ...] = ()
    """The rate window's inter-token latency histogram (per token), as `ttft_buckets`."""
    mean_prompt_tokens: float | None = None
    mean_output_tokens: float | None = None
    prefill_time_s: float | None = None
    """Mean time a request spends in prefill compute, without queueing (vLLM:
    `vllm:request_prefill_time_seconds` sum / count); optional, sharpens the prefill correction."""

    @property
    def last_interval_s(self) -> float | None:
        """The last scrape interval's length: its request count over its rate (`idelta` / `irate` of one
        counter); None without requests in it."""
        rate, count = self.request_rate_last, self.requests_last
        if rate is None or count is None or rate <= 0 or count <= 0:
            return None
        return count / rate


@dataclass(frozen=True)
class LoadPicture:
    """One tick's signals of both pools of a service."""

    prefill: PoolSignals | None
    decode: PoolSignals | None

    def pool(self, role: Role) -> PoolSignals | None:
        return self.prefill if role == "prefill" else self.decode
