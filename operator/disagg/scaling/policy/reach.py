"""Prompts no prefill replica count serves within the TTFT target: their prefill alone, the KV hand-off
and the first decode step take longer (disagg.capacity.reach, with the prefill time the pool measured).

They must not drive scaling: more replicas do not shorten one prompt's prefill. The prefill pool's
prompt-length histogram (vLLM `vllm:request_prompt_tokens`, SGLang `sglang:prompt_tokens_histogram`)
says how many of the rate window's requests they are; the policy then reads the TTFT percentile, the SLO
guard and the error budget over the requests in reach, and reports the share in the pool's status.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.reach import Phase, longest_context, longest_prompt
from disagg.scaling.policy.histogram import histogram_quantile, tail_share
from disagg.scaling.policy.model import Capacity
from disagg.scaling.policy.picture import LoadPicture, PoolSignals
from disagg.scaling.policy.settings import PolicySettings


@dataclass(frozen=True)
class OutOfReach:
    """The share of a pool's recent requests out of reach, and why."""

    share: float
    longest_prompt: float
    """Tokens: longer prompts miss the TTFT target on idle replicas."""
    reason: str


def prompts_out_of_reach(
    signals: PoolSignals, spec: InferenceServiceSpec, prefill: Capacity, decode: Capacity, service_correction: float,
    settings: PolicySettings,
) -> OutOfReach | None:
    """The rate window's prompts too long for the TTFT target; None without a prompt-length histogram."""
    if not signals.prompt_buckets:
        return None
    longest = longest_prompt(
        prefill.model, Phase(prefill.accelerator, prefill.tensor_parallel),
        Phase(decode.accelerator, decode.tensor_parallel), ttft_s=spec.slo.ttft_ms / 1000.0,
        eff=settings.efficiency, rdma=settings.kv_over_rdma, prefill_scale=service_correction,
    )
    share = tail_share(longest, signals.prompt_buckets, float(prefill.model.max_context))
    if share is None:
        return None
    reason = (f"prompts over {longest:,.0f} tokens take longer than the {spec.slo.ttft_ms:g}ms TTFT "
              f"target to prefill on an idle replica ({prefill.tensor_parallel} x {prefill.accelerator.name}); "
              "more replicas do not shorten them")
    return OutOfReach(share, longest, reason)


def ttft_in_reach(signals: PoolSignals, percentile: float, out: OutOfReach | None) -> float | None:
    """The TTFT at `percentile` of the requests in reach: those out of reach are all above the target, so
    the in-reach percentile is the whole histogram's at percentile x (1 - share out of reach)."""
    if out is None or out.share <= 0.0 or not signals.ttft_buckets:
        return signals.ttft_s
    if out.share >= 0.999:
        return None
    return histogram_quantile(percentile / 100.0 * (1.0 - out.share), signals.ttft_buckets)


def quantile_in_reach(
    value: float | None, buckets: tuple[tuple[float, float], ...], percentile: float, share_out: float
) -> float | None:
    """A latency percentile of the requests in reach, from a histogram whose top `share_out` are the
    requests out of reach (`value`, the whole histogram's percentile, when none are)."""
    if share_out <= 0.0 or not buckets:
        return value
    if share_out >= 0.999:
        return None
    return histogram_quantile(percentile / 100.0 * (1.0 - share_out), buckets)


def decode_out_of_reach(
    picture: LoadPicture, spec: InferenceServiceSpec, prefill: Capacity, decode: Capacity, settings: PolicySettings,
) -> tuple[float, float]:
    """For decode's readings: the share of requests whose prompt alone misses the TTFT target, and of
    those whose context alone steps slower than the ITL target (from the prompt-length histogram)."""
    signals = picture.prefill if picture.prefill is not None and picture.prefill.prompt_buckets else picture.decode
    if signals is None or not signals.prompt_buckets:
        return 0.0, 0.0
    prompts = prompts_out_of_reach(signals, spec, prefill, decode, 1.0, settings)
    context = longest_context(decode.model, Phase(decode.accelerator, decode.tensor_parallel),
                              itl_s=spec.slo.itl_ms / 1000.0, eff=settings.efficiency)
    steps = tail_share(context, signals.prompt_buckets, float(decode.model.max_context))
    return (prompts.share if prompts is not None else 0.0), (steps or 0.0)
