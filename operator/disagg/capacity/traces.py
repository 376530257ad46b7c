"""Request traces (for the planner and the simulator): the Azure LLM inference CSVs and the Mooncake
JSONL files, and workloads built from them.

Formats (detected from the content, not the file name):
- Azure 2023 CSV: `TIMESTAMP,ContextTokens,GeneratedTokens`, wall-clock timestamps with 7 fractional digits.
- Mooncake JSONL: one object per line with `timestamp` (ms from the start), `input_length`,
  `output_length` (and `hash_ids`, unused here).

Rate scaling (`time_scale`): F times the arrival rate by compressing time (every gap divided by F).

Day-long workloads (`diurnal`): the trace's requests, with their sizes and their second-scale burst
structure, are laid end to end (after compressing time by F) until they fill 24 hours, then thinned: a
request at time t is kept with probability c(t) / max c, where the daily curve
c(t) = 1/RATIO + (1 - 1/RATIO) (1 - cos(2 pi (t - 4 h) / 24 h)) / 2 has its trough (peak / RATIO) at
04:00 and its peak at 16:00. The peak hour therefore runs at F times the trace's own rate, the trough at
F / RATIO of it, and the day keeps its 24 hours whatever F is. Thinning uses a seeded generator, so the
same arguments always give the same workload.

Warm-up (`with_warmup`): the workload's last S seconds are replayed before it (a day wraps round from
midnight to midnight, a tiled trace from its end to its start), so that a simulation measured from S on
starts with every autoscaler in its steady state (see `SimSetup.warmup_s`).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

DAY_S = 86400.0
TROUGH_HOUR = 4.0


class TraceError(ValueError):
    """A trace file that cannot be read, with the line at fault."""


@dataclass(frozen=True)
class Workload:
    """Requests sorted by arrival: times in seconds from the start, prompt and output token counts."""

    name: str
    arrivals: npt.NDArray[np.float64]
    prompt_tokens: npt.NDArray[np.int64]
    output_tokens: npt.NDArray[np.int64]
    duration_s: float

    @property
    def requests(self) -> int:
        return int(self.arrivals.size)

    def mean_rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def window(self, start: float, end: float) -> Workload:
        """The requests arriving in [start, end), times kept as they are."""
        low, high = np.searchsorted(self.arrivals, [start, end])
        return Workload(
            self.name, self.arrivals[low:high], self.prompt_tokens[low:high], self.output_tokens[low:high],
            end - start,
        )


def _detect(path: Path) -> str:
    with path.open() as handle:
        first = handle.readline().strip()
    if first.startswith("{"):
        return "mooncake"
    if "ContextTokens" in first and "GeneratedTokens" in first:
        return "azure"
    raise TraceError(
        f"{path}: not a known trace format (expected an Azure CSV header "
        "'TIMESTAMP,ContextTokens,GeneratedTokens' or Mooncake JSON lines)"
    )


def _parse_azure_time(text: str) -> float:
    # Seven fractional digits are more than datetime accepts: keep microseconds.
    if "." in text:
        head, fraction = text.split(".", 1)
        text = f"{head}.{fraction[:6]}"
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()


def _read_azure(path: Path) -> tuple[list[float], list[int], list[int]]:
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            try:
                times.append(_parse_azure_time(row["TIMESTAMP"].strip()))
                prompts.append(int(row["ContextTokens"]))
                outputs.append(int(row["GeneratedTokens"]))
            except (KeyError, ValueError, AttributeError) as error:
                raise TraceError(f"{path}:{number}: {error}") from None
    return times, prompts, outputs


def _read_mooncake(path: Path) -> tuple[list[float], list[int], list[int]]:
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                times.append(float(record["timestamp"]) / 1000.0)
                prompts.append(int(record["input_length"]))
                outputs.append(int(record["output_length"]))
            except (KeyError, ValueError, TypeError) as error:
                raise TraceError(f"{path}:{number}: {error}") from None
    return times, prompts, outputs


def read_trace(path: Path | str) -> Workload:
    """A trace file as a workload starting at 0 s, in arrival order, format detected from its content."""
    path = Path(path)
    try:
        kind = _detect(path)
        times, prompts, outputs = _read_azure(path) if kind == "azure" else _read_mooncake(path)
    except OSError as error:
        raise TraceError(f"{path}: {error}") from None
    if not times:
        raise TraceError(f"{path}: no requests")
    arrivals = np.asarray(times, dtype=np.float64)
    order = np.argsort(arrivals, kind="stable")
    arrivals = arrivals[order] - arrivals[order][0]
    prompt = np.maximum(np.asarray(prompts, dtype=np.int64)[order], 1)
    output = np.maximum(np.asarray(outputs, dtype=np.int64)[order], 1)
    # The span runs to the last arrival plus one mean gap, so tiling keeps the mean rate.
    span = float(arrivals[-1]) * len(arrivals) / max(len(arrivals) - 1, 1) if len(arrivals) > 1 else 1.0
    return Workload(path.stem, arrivals, prompt, output, span)


def _tile(workload: Workload, until: float) -> Workload:
    """The workload laid end to end until `until` seconds."""
    copies = max(1, math.ceil(until / workload.duration_s))
    offsets = np.repeat(np.arange(copies, dtype=np.float64) * workload.duration_s, workload.requests)
    arrivals = np.tile(workload.arrivals, copies) + offsets
    keep = arrivals < until
    return Workload(
        workload.name,
        arrivals[keep],
        np.tile(workload.prompt_tokens, copies)[keep],
        np.tile(workload.output_tokens, copies)[keep],
        until,
    )


def scale_time(workload: Workload, time_scale: float) -> Workload:
    """F times the arrival rate, by dividing every arrival time by F."""
    if time_scale <= 0:
        raise TraceError(f"time scale must be > 0, got {time_scale}")
    return Workload(
        workload.name, workload.arrivals / time_scale, workload.prompt_tokens, workload.output_tokens,
        workload.duration_s / time_scale,
    )


def with_warmup(workload: Workload, seconds: float) -> Workload:
    """The workload with its own last `seconds` replayed before it: measured from `seconds` on, it is the
    original workload entered in steady state."""
    if seconds <= 0:
        return workload
    if seconds >= workload.duration_s:
        raise TraceError(
            f"a warm-up of {seconds:g} s is at least as long as the workload ({workload.duration_s:g} s): "
            "it replays the workload's own last seconds, so nothing new would be measured"
        )
    tail = workload.window(workload.duration_s - seconds, workload.duration_s)
    return Workload(
        workload.name,
        np.concatenate([tail.arrivals - (workload.duration_s - seconds), workload.arrivals + seconds]),
        np.concatenate([tail.prompt_tokens, workload.prompt_tokens]),
        np.concatenate([tail.output_tokens, workload.output_tokens]),
        workload.duration_s + seconds,
    )


def diurnal_curve(times: npt.NDArray[np.float64], ratio: float) -> npt.NDArray[np.float64]:
    """The daily rate multiplier (peak 1 at 16:00, trough 1/ratio at 04:00) at `times` seconds."""
    trough = 1.0 / ratio
    phase = 2.0 * np.pi * (times - TROUGH_HOUR * 3600.0) / DAY_S
    result: npt.NDArray[np.float64] = trough + (1.0 - trough) * (1.0 - np.cos(phase)) / 2.0
    return result


def build_workload(
    trace: Workload,
    *,
    time_scale: float = 1.0,
    duration_s: float | None = None,
    diurnal: float | None = None,
    seed: int = 0,
) -> Workload:
    """The workload `disagg simulate` replays: scaled, optionally made day-long, cut to `duration_s`."""
    scaled = scale_time(trace, time_scale)
    if diurnal is not None:
        if diurnal < 1:
            raise TraceError(f"diurnal ratio must be >= 1 (peak / trough), got {diurnal}")
        day = _tile(scaled, duration_s or DAY_S)
        keep_probability = diurnal_curve(day.arrivals, diurnal)
        keep = np.random.default_rng(seed).random(day.requests) < keep_probability
        return Workload(
            f"{trace.name}-diurnal{diurnal:g}", day.arrivals[keep], day.prompt_tokens[keep],
            day.output_tokens[keep], day.duration_s,
        )
    if duration_s is not None:
        return _tile(scaled, duration_s) if duration_s > scaled.duration_s else scaled.window(0.0, duration_s)
    return scaled
