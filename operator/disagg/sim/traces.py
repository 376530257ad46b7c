"""Trace readers and workload construction (they live in disagg.capacity so that `disagg plan --trace` can
use them too); see disagg.capacity.traces for the formats and the day-long construction."""

from disagg.capacity.traces import (
    DAY_S,
    TraceError,
    Workload,
    build_workload,
    diurnal_curve,
    read_trace,
    scale_time,
    with_warmup,
)

__all__ = [
    "DAY_S", "TraceError", "Workload", "build_workload", "diurnal_curve", "read_trace", "scale_time", "with_warmup",
]
