"""Requests no replica count can serve within the SLO, and why.

A request is out of reach when, alone on idle replicas, it still misses a target:
- its prompt's prefill, the KV hand-off and the first decode step take longer than the TTFT target
  (more prefill replicas do not shorten one prompt's prefill; a larger tensor-parallel size does);
- its context (prompt and output) does not fit one decode replica's KV cache, or the model's context
  (the engine refuses it);
- one decode step at its context is slower than the ITL target.

The autoscaler must not size pools for these requests (more replicas do not help them); the planner
says up front how many of a trace's requests are out of reach; the benchmark judges attainment over
the requests in reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from disagg.capacity.models import ModelShape
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_step_seconds,
    kv_capacity_tokens,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.catalog.accelerators import Accelerator

if TYPE_CHECKING:  # numpy is the simulator's and the planner's (--trace), not the operator's
    import numpy as np
    import numpy.typing as npt


@dataclass(frozen=True)
class Phase:
    """One pool's capacity model: what a replica is."""

    accelerator: Accelerator
    tensor_parallel: int = 1


@dataclass(frozen=True)
class Reach:
    """The limits of what replicas can serve within the targets."""

    longest_prompt: float
    """The longest prompt whose unloaded prefill, hand-off and first step fit the TTFT target (tokens;
    0 when none does)."""
    kv_tokens: float
    """Prompt plus output one decode replica's KV cache holds."""
    max_context: float
    """The model's context length."""
    itl_context: float
    """The longest context whose single-sequence decode step fits the ITL target (tokens)."""


def unloaded_ttft_s(
    model: ModelShape, prefill: Phase, decode: Phase, prompt_tokens: float, *,
    eff: Efficiency = DEFAULT_EFFICIENCY, rdma: bool = True, batch_overhead_s: float = 0.0,
    prefill_scale: float = 1.0,
) -> float:
    """TTFT of one prompt on idle replicas: its prefill (the model's times `prefill_scale`, what the
    engine measured over what the model predicts), the KV hand-off and one decode step."""
    prefill_s = prefill_seconds(model, prefill.accelerator, prefill.tensor_parallel, prompt_tokens, eff) * prefill_scale
    link = kv_link_bytes_per_s(prefill.tensor_parallel, decode.tensor_parallel, rdma)
    handoff = kv_transfer_seconds(model, prompt_tokens, link, eff)
    first_step = decode_step_seconds(model, decode.accelerator, decode.tensor_parallel, 1.0, prompt_tokens, eff)
    return prefill_s + batch_overhead_s + handoff + first_step


def _longest(fits: object, high: float) -> float:
    """The largest token count in [0, high] for which `fits(tokens)` holds (monotone: true, then false)."""
    assert callable(fits)
    if fits(high):
        return high
    if not fits(1.0):
        return 0.0
    low = 1.0
    for _ in range(50):
        middle = (low + high) / 2.0
        if fits(middle):
            low = middle
        else:
            high = middle
        if high - low < 1.0:
            break
    return low


def longest_prompt(
    model: ModelShape, prefill: Phase, decode: Phase, *, ttft_s: float, eff: Efficiency = DEFAULT_EFFICIENCY,
    rdma: bool = True, batch_overhead_s: float = 0.0, prefill_scale: float = 1.0,
) -> float:
    """The longest prompt whose unloaded TTFT (`unloaded_ttft_s`) fits `ttft_s` (tokens; 0 when none does)."""
    return _longest(
        lambda tokens: unloaded_ttft_s(model, prefill, decode, tokens, eff=eff, rdma=rdma,
                                       batch_overhead_s=batch_overhead_s, prefill_scale=prefill_scale) <= ttft_s,
        float(model.max_context),
    )


def longest_context(model: ModelShape, decode: Phase, *, itl_s: float, eff: Efficiency = DEFAULT_EFFICIENCY) -> float:
    """The longest context whose single-sequence decode step fits `itl_s` (tokens; 0 when none does)."""
    return _longest(
        lambda tokens: decode_step_seconds(model, decode.accelerator, decode.tensor_parallel, 1.0, tokens, eff)
        <= itl_s,
        float(model.max_context),
    )


def reach(
    model: ModelShape, prefill: Phase, decode: Phase, *, ttft_s: float, itl_s: float,
    eff: Efficiency = DEFAULT_EFFICIENCY, rdma: bool = True, batch_overhead_s: float = 0.0,
) -> Reach:
    """The limits of what one replica of each pool serves within `ttft_s` and `itl_s`."""
    max_context = float(model.max_context)
    kv_tokens = kv_capacity_tokens(model, decode.accelerator, decode.tensor_parallel, eff)
    prompt = longest_prompt(model, prefill, decode, ttft_s=ttft_s, eff=eff, rdma=rdma,
                            batch_overhead_s=batch_overhead_s)
    return Reach(prompt, kv_tokens, max_context, longest_context(model, decode, itl_s=itl_s, eff=eff))


@dataclass(frozen=True)
class OutOfReach:
    """Per request of a workload: why it is out of reach (several reasons may hold)."""

    ttft: npt.NDArray[np.bool_]
    """Its prompt alone takes longer than the TTFT target."""
    fit: npt.NDArray[np.bool_]
    """It does not fit a decode replica's KV cache or the model's context."""
    itl: npt.NDArray[np.bool_]
    """A decode step at its context alone is slower than the ITL target."""

    @property
    def any(self) -> npt.NDArray[np.bool_]:
        result: npt.NDArray[np.bool_] = self.ttft | self.fit | self.itl
        return result

    def shares(self) -> dict[str, float]:
        """Share of requests out of reach, in all and per reason."""
        count = max(self.ttft.size, 1)
        return {
            "any": float(self.any.sum()) / count,
            "ttft": float(self.ttft.sum()) / count,
            "fit": float(self.fit.sum()) / count,
            "itl": float(self.itl.sum()) / count,
        }


def out_of_reach(
    limits: Reach, prompt_tokens: npt.NDArray[np.int64], output_tokens: npt.NDArray[np.int64]
) -> OutOfReach:
    """Which of these requests no replica count serves within the targets, and why."""
    import numpy as np

    prompt = prompt_tokens.astype(np.float64)
    output = output_tokens.astype(np.float64)
    fit = (prompt + output > limits.kv_tokens) | (prompt > limits.max_context)
    # a one-token output has no inter-token latency
    itl = (output > 1) & (prompt + output / 2.0 > limits.itl_context)
    return OutOfReach(ttft=(prompt > limits.longest_prompt) & ~fit, fit=fit, itl=itl & ~fit)
