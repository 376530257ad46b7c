"""Load injected into the simulated engines without HTTP (the large benchmarks' way): specifications,
arrivals, and the base load a service gets by default.

`--load NS/NAME=SPEC`: a constant rate (`8`), steps (`steps:0s@2,60s@8,120s@2`, times from when the
load was set), or a trace replay (`trace:PATH[:time-scale]`, Azure CSV or Mooncake JSONL, looped). A rate
written `4x` is a multiple of the service's base load: `--base-share` (60 %) of the rate one prefill
plus one decode replica serve within the SLO, by the sizing the autoscaler plans with. Real requests
(`disagg-lab load`) go through the service's endpoint instead; both reach the same engines.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import ModelShape, builtin_model, from_architecture
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.capacity.traces import Workload
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog
from disagg.scaling.policy import PolicySettings
from disagg.wellknown import ROLES as ROLES  # the lab's modules take them from here
from disagg.wellknown import Role

DEFAULT_PROMPT_TOKENS = 1024
DEFAULT_OUTPUT_TOKENS = 1024
DEFAULT_BASE_SHARE = 0.6
MAX_RPS = 10_000.0
"""Highest offered rate (requests/s) a load may ask for, so that one step's arrivals stay bounded."""


def default_traces_dir() -> Path:
    env = os.environ.get("DISAGG_TRACES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


class LoadError(ValueError):
    """A load specification that cannot be used."""


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `1.5m`, `2h`, `500ms` -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise LoadError(f"bad duration {text!r} (expected e.g. 30s, 2m, 1h)")
    value = float(match.group(1))
    unit = match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def parse_rate(text: str) -> tuple[float, bool]:
    """`8` (requests/s) or `4x` (times the base load) -> (value, is_multiple)."""
    raw = text.strip()
    multiple = raw.lower().endswith("x")
    number = raw[:-1] if multiple else raw
    try:
        value = float(number)
    except ValueError:
        raise LoadError(
            f"bad rate {text!r} (expected requests/s like 8 or a multiple of the base load like 4x)"
        ) from None
    if not math.isfinite(value) or value < 0 or value > MAX_RPS:
        raise LoadError(f"bad rate {text!r}: must be a number in [0, {MAX_RPS}]")
    return value, multiple


@dataclass(frozen=True)
class LoadSpec:
    """An offered load as written on the command line or sent to the control API."""

    steps: tuple[tuple[float, float, bool], ...] = ((0.0, 1.0, True),)
    """(seconds from the load's start, rate, rate is a multiple of the base load); rate 0 before the first."""
    trace: str | None = None
    time_scale: float = 1.0
    prompt_tokens: int | None = None
    output_tokens: int | None = None

    def text(self) -> str:
        if self.trace is not None:
            return f"trace:{self.trace}:{self.time_scale:g}"

        def rate(value: float, multiple: bool) -> str:
            return f"{value:g}x" if multiple else f"{value:g}"

        if len(self.steps) == 1 and self.steps[0][0] == 0.0:
            return rate(self.steps[0][1], self.steps[0][2])
        return "steps:" + ",".join(f"{at:g}s@{rate(v, m)}" for at, v, m in self.steps)


def parse_load_spec(text: str) -> LoadSpec:
    """`8`, `4x`, `steps:0s@2,60s@8,120s@2`, `trace:PATH[:time-scale]`."""
    text = text.strip()
    if text.startswith("steps:"):
        steps: list[tuple[float, float, bool]] = []
        for item in text.removeprefix("steps:").split(","):
            if "@" not in item:
                raise LoadError(f"bad step {item!r} in {text!r} (expected TIME@RATE, e.g. 60s@8)")
            at, rate = item.split("@", 1)
            value, multiple = parse_rate(rate)
            steps.append((parse_duration(at), value, multiple))
        if not steps or any(b[0] <= a[0] for a, b in itertools.pairwise(steps)):
            raise LoadError(f"steps in {text!r} must be given in increasing time order")
        return LoadSpec(steps=tuple(steps))
    if text.startswith("trace:"):
        rest = text.removeprefix("trace:")
        path, scale = rest, 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                path = head
            except ValueError:
                pass
        if not path:
            raise LoadError(f"bad trace load {text!r} (expected trace:PATH[:time-scale])")
        if not math.isfinite(scale) or scale <= 0:
            raise LoadError(f"bad time scale in {text!r}: must be > 0")
        return LoadSpec(steps=(), trace=path, time_scale=scale)
    value, multiple = parse_rate(text)
    return LoadSpec(steps=((0.0, value, multiple),))


_SERVICE_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)/([a-z0-9]([-.a-z0-9]*[a-z0-9])?)$")


def parse_service_key(text: str) -> tuple[str, str]:
    match = _SERVICE_KEY.match(text.strip())
    if not match:
        raise LoadError(f"bad service {text!r} (expected NAMESPACE/NAME)")
    return match.group(1), match.group(3)


def parse_load_arg(text: str) -> tuple[tuple[str, str], LoadSpec]:
    """`NAMESPACE/NAME=SPEC` -> ((namespace, name), spec)."""
    service, sep, spec = text.partition("=")
    if not sep:
        raise LoadError(f"bad --load {text!r} (expected NAMESPACE/NAME=SPEC)")
    return parse_service_key(service), parse_load_spec(spec)


def resolve_trace(path: str, traces_dir: Path) -> Path:
    """A trace path as given, or relative to the shared traces directory."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    if not candidate.is_absolute() and (traces_dir / candidate).is_file():
        return traces_dir / candidate
    raise LoadError(f"trace {path!r} not found (looked in the current directory and {traces_dir})")


@dataclass(frozen=True)
class BaseLoad:
    """A service's base load and the single-replica capacities it derives from."""

    rps: float
    prompt_tokens: int
    output_tokens: int
    prefill_capacity_rps: float
    """Requests/s one prefill replica serves within the TTFT target (as the autoscaler sizes it)."""
    decode_capacity_rps: float
    """Requests/s one decode replica serves within the ITL target and its KV cache."""


class OfferedLoad:
    """A LoadSpec made concrete for one service: arrivals per simulation step."""

    def __init__(
        self,
        spec: LoadSpec,
        base: BaseLoad,
        started: float,
        *,
        process: str = "poisson",
        workload: Workload | None = None,
    ) -> None:
        self.spec = spec
        self.base = base
        self.started = started
        self.process = process
        self.prompt_tokens = spec.prompt_tokens or base.prompt_tokens
        self.output_tokens = spec.output_tokens or base.output_tokens
        self.steps = [(at, min(MAX_RPS, value * base.rps if multiple else value)) for at, value, multiple in spec.steps]
        self.workload = workload
        self._step_times = [at for at, _ in self.steps]
        self._next_at: float | None = None

    def rps_at(self, t: float) -> float:
        """Offered requests/s at simulation time t (the trace's mean rate for a replay)."""
        if self.workload is not None:
            return self.workload.mean_rate()
        index = bisect.bisect_right(self._step_times, t - self.started) - 1
        return self.steps[index][1] if index >= 0 else 0.0

    def arrivals(self, t0: float, t1: float, rng: np.random.Generator) -> list[tuple[float, int, int]]:
        """(time, prompt tokens, output tokens) of the requests arriving in [t0, t1), in time order."""
        if self.workload is not None:
            return self._trace_arrivals(t0, t1)
        rate = self.rps_at(t0)
        dt = t1 - t0
        if rate <= 0 or dt <= 0:
            self._next_at = None
            return []
        if self.process == "uniform":
            gap = 1.0 / rate
            if self._next_at is None or self._next_at < t0 or self._next_at > t0 + gap:
                self._next_at = t0
            times = []
            while self._next_at < t1:  # at most MAX_RPS x dt + 1 iterations
                times.append(self._next_at)
                self._next_at += gap
        else:
            n = int(rng.poisson(rate * dt))
            times = sorted((t0 + dt * float(u)) for u in rng.random(n)) if n else []
        return [(x, self.prompt_tokens, self.output_tokens) for x in times]

    def _trace_arrivals(self, t0: float, t1: float) -> list[tuple[float, int, int]]:
        w = self.workload
        assert w is not None
        span = w.duration_s
        if span <= 0 or w.requests == 0:
            return []
        out: list[tuple[float, int, int]] = []
        rel = max(0.0, t0 - self.started)
        end = max(0.0, t1 - self.started)
        for _ in range(4):  # a step spans at most a few laps of even a tiny trace; bounded on purpose
            if rel >= end:
                break
            lap = math.floor(rel / span)
            offset = lap * span
            window_end = min(end, offset + span)
            low, high = np.searchsorted(w.arrivals, [rel - offset, window_end - offset])
            for i in range(int(low), int(high)):
                out.append((self.started + offset + float(w.arrivals[i]), int(w.prompt_tokens[i]),
                            int(w.output_tokens[i])))
            rel = window_end
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec.text(),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "arrivals": self.process,
            "started_at": round(self.started, 3),
            "base_rps": round(self.base.rps, 4),
        }
        if self.workload is not None:
            out["trace"] = {"requests": self.workload.requests, "duration_s": round(self.workload.duration_s, 1),
                            "mean_rps": round(self.workload.mean_rate(), 4)}
        else:
            out["steps"] = [{"at_s": at, "rps": round(rps, 4)} for at, rps in self.steps]
        return out


def model_of(spec: InferenceServiceSpec) -> ModelShape:
    if spec.model.architecture is not None:
        return from_architecture(spec.model.architecture, spec.model.name)
    return builtin_model(spec.model.name)


def accelerator_of(spec: InferenceServiceSpec, role: Role, catalog: AcceleratorCatalog) -> Accelerator:
    pool = getattr(spec, role)
    if pool.accelerator.type is None:
        raise LoadError(f"spec.{role}.accelerator has no catalogue type (resourceName only): no capacity model")
    accelerator = catalog.get(pool.accelerator.type)
    if accelerator is None:
        raise LoadError(f"spec.{role}.accelerator.type {pool.accelerator.type!r} is not in the catalogue")
    return accelerator


def _largest_rate(fits: Callable[[float], bool], start: float) -> float:
    """Largest rate for which `fits` holds (monotone), by doubling then bisection; bounded iterations."""
    low, high = 0.0, max(start, 1e-3)
    for _ in range(40):
        if not fits(high):
            break
        low, high = high, high * 2.0
    else:
        return low
    for _ in range(40):
        mid = (low + high) / 2.0
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def base_load(
    spec: InferenceServiceSpec,
    catalog: AcceleratorCatalog,
    *,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    share: float = DEFAULT_BASE_SHARE,
    kv_over_rdma: bool = True,
    settings: PolicySettings | None = None,
    efficiency: Efficiency = DEFAULT_EFFICIENCY,
) -> BaseLoad:
    """`share` of what one prefill and one decode replica serve within the SLO, by the autoscaler's sizing.

    Prefill: the highest rate `size_prefill` still sizes at one replica, with the TTFT budget the policy
    uses (target fraction of the TTFT minus the KV hand-off and one decode step) and its headroom.
    Decode: the same with `size_decode` at the policy's ITL target. The base is `share` of the smaller.
    """
    settings = settings or PolicySettings()
    model = model_of(spec)
    prefill_acc = accelerator_of(spec, "prefill", catalog)
    decode_acc = accelerator_of(spec, "decode", catalog)
    p_tp, d_tp = spec.prefill.parallelism.tensor, spec.decode.parallelism.tensor
    prompt, output = float(prompt_tokens), float(output_tokens)
    ttft = spec.slo.ttft_ms / 1000.0
    itl = spec.slo.itl_ms / 1000.0
    handoff = kv_transfer_seconds(model, prompt, kv_link_bytes_per_s(p_tp, d_tp, kv_over_rdma), efficiency)
    budget = max(ttft * settings.target_fraction - handoff - itl, ttft * 0.25)
    service = prefill_seconds(model, prefill_acc, p_tp, prompt, efficiency)

    def prefill_fits(rate: float) -> bool:
        sizing = size_prefill(
            model, prefill_acc, p_tp, prompt_tokens_per_s=rate * prompt, mean_prompt_tokens=prompt,
            ttft_budget_s=budget, percentile=spec.slo.percentile, headroom=settings.prefill_headroom,
            max_replicas=2, eff=efficiency,
        )
        return sizing.replicas <= 1 and sizing.predicted_ttft_s <= budget

    def decode_fits(rate: float) -> bool:
        sizing = size_decode(
            model, decode_acc, d_tp, generation_tokens_per_s=rate * output, concurrent_sequences=0.0,
            mean_prompt_tokens=prompt, mean_output_tokens=output, itl_target_s=itl * settings.target_fraction,
            headroom=settings.decode_headroom, eff=efficiency,
        )
        return sizing.replicas <= 1

    prefill_rps = _largest_rate(prefill_fits, 0.5 / service) if service > 0 else 0.0
    decode_rps = _largest_rate(decode_fits, 1.0)
    rps = share * min(prefill_rps, decode_rps)
    return BaseLoad(rps, prompt_tokens, output_tokens, prefill_rps, decode_rps)


