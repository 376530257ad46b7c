"""Autoscaling benchmark: every policy on every shared trace, one hour as recorded and one day-long workload.

    .venv/bin/python bench/autoscale.py [--only azure2023_conv] [--hours-only] [--jobs 2]

For each trace of ../shared/traces (Azure 2023 code and conversation, Mooncake conversation and synthetic):
- one hour: the trace with its rate scaled (time compressed, then laid end to end to fill the hour) so
  that the mean load needs at least 4 replicas per pool (see disagg.sim.runner.scale_for_replicas);
- one day: the same scale (times `--day-scale`), made day-long with `--diurnal` 5 (conversation traces)
  or 10 (code), whose peak hour runs at that scale;
both for Llama-3.1-70B (fp8 weights, bf16 KV) with prefill on nvidia-h100 (TP2) and decode on nvidia-h200
(TP1), and a second pair (prefill nvidia-b200 TP1, decode amd-mi300x TP1). The SLO is ITL 50 ms and a TTFT
that static provisioning can reach on that trace (disagg.sim.runner.reachable_ttft_s), at the 99th
percentile (the benchmark asks for 99 % attainment; attainment counts requests meeting both targets).

Every run is measured in steady state: the workload's last 40 minutes are replayed before it as a
warm-up that is neither billed nor measured (`SimSetup.warmup_s`; longer than the 20-minute scale-down
window), so that no policy is judged on its cold start from the planner's first guess while `static-best`
is born with its hindsight allocation.

`static-best` is a search of 10-25 simulations per workload; its answer depends only on the workload and
the setup, so `--static-cache FILE` keeps the allocation it found per workload (keyed by everything that
determines it) and later runs replay that one allocation instead of searching again.
Prints a table and writes bench/results/autoscale.json.

Traces: Azure Public Dataset (Microsoft, CC-BY-4.0) and Mooncake FAST'25 traces (Moonshot AI, Apache-2.0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from disagg.capacity.models import builtin_model
from disagg.capacity.traces import diurnal_curve
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.sim.baselines import find_static_best, run_static
from disagg.sim.engine import PoolSetup, SimSetup
from disagg.sim.runner import (
    POLICIES,
    initial_replicas,
    peak_replicas,
    reachable_ttft_s,
    run_policy,
    scale_for_replicas,
)
from disagg.sim.traces import build_workload, read_trace, with_warmup

ROOT = Path(__file__).resolve().parent.parent
TRACES = next((parent / "shared" / "traces" for parent in ROOT.parents if (parent / "shared" / "traces").is_dir()),
              ROOT.parent / "shared" / "traces")
"""../shared/traces from the main checkout, ../../shared/traces from a worktree under wt/."""
RESULTS = ROOT / "bench" / "results" / "autoscale.json"
PAIRS = {
    "h100-h200": (("nvidia-h100", 2), ("nvidia-h200", 1)),
    "b200-mi300x": (("nvidia-b200", 1), ("amd-mi300x", 1)),
}
WARMUP_S = 2400.0
PERCENTILE = 99.0
TRACE_FILES = ("azure2023_conv.csv", "azure2023_code.csv", "mooncake_conversation.jsonl", "mooncake_synthetic.jsonl")


def _static_key(trace_file: str, pair: str, kind: str, setup: SimSetup, scale: float) -> str:
    return (f"{trace_file}|{pair}|{kind}|x{scale}|dt{setup.dt}|ttft{setup.ttft_s}|itl{setup.itl_s}|"
            f"p{setup.percentile}|warmup{setup.warmup_s}|startup{setup.startup_s}")


def _run(job: tuple[str, str, str, float, str | None, str | None, str, float]) -> dict[str, Any]:
    trace_file, pair, kind, dt, plot_dir, static_cache, policies, day_scale = job
    (prefill_acc, prefill_tp), (decode_acc, decode_tp) = PAIRS[pair]
    trace = read_trace(TRACES / trace_file)
    setup = SimSetup(
        model=builtin_model("llama-3.1-70b"),
        prefill=PoolSetup(DEFAULT_CATALOG[prefill_acc], prefill_tp, 1, 1, 128),
        decode=PoolSetup(DEFAULT_CATALOG[decode_acc], decode_tp, 1, 1, 128),
        itl_s=0.05,
        percentile=PERCENTILE,
        dt=dt,
        warmup_s=WARMUP_S,
    )
    scale = scale_for_replicas(setup, trace)
    if kind == "day":
        scale = round(scale * day_scale, 1)
    setup = replace(setup, ttft_s=reachable_ttft_s(setup, trace))
    diurnal = (10.0 if "code" in trace_file else 5.0) if kind == "day" else None
    workload = build_workload(trace, time_scale=scale, diurnal=diurnal, duration_s=None if diurnal else 3600.0)
    measured = workload
    workload = with_warmup(workload, WARMUP_S)
    setup = initial_replicas(setup, workload)
    started = time.perf_counter()
    rows = []
    simulated_hours = workload.duration_s / 3600.0
    cache: dict[str, dict[str, int]] = {}
    key = _static_key(trace_file, pair, kind, setup, scale)
    if static_cache is not None and Path(static_cache).exists():
        cache = json.loads(Path(static_cache).read_text())
    static_found: dict[str, int] | None = None
    for policy in policies.split(","):
        if policy == "static-best" and key in cache:
            result = run_static(setup, workload, cache[key])
            result.policy = "static-best"
            static_found = cache[key]
        elif policy == "static-best":
            static_found, result = find_static_best(setup, workload, start=peak_replicas(setup, workload))
        else:
            result = run_policy(policy, setup, workload, DEFAULT_CATALOG)
        rows.append(result.summary())
        rows[-1]["sim_wall_s_per_hour"] = round(result.wall_s / simulated_hours, 2)
        if plot_dir is not None and policy == "disagg" and kind == "day":
            from disagg.sim.plot import plot_run

            name = f"autoscale-day-{trace_file.split('.')[0]}-{pair}.png"
            plot_run(result, Path(plot_dir) / name,
                     title=f"{workload.name} ({pair}, x{scale}), disagg policy")
        print(f"  {trace_file} {pair} {kind} {policy}: {rows[-1]['slo_attainment']} "
              f"{rows[-1]['accelerator_hours']}", file=sys.stderr, flush=True)
    return {
        "trace": trace_file,
        "pair": pair,
        "workload": kind,
        "diurnal": diurnal,
        "time_scale": scale,
        "requests": measured.requests,
        "hours": measured.duration_s / 3600.0,
        "warmup_s": WARMUP_S,
        "simulated_hours_per_run": round(simulated_hours, 3),
        "percentile": PERCENTILE,
        "ttft_ms": setup.ttft_s * 1000,
        "itl_ms": setup.itl_s * 1000,
        "initial": {"prefill": setup.prefill.initial_replicas, "decode": setup.decode.initial_replicas},
        "static_best": static_found,
        "static_key": key,
        "bench_wall_s": round(time.perf_counter() - started, 1),
        "policies": rows,
    }


PEERS = ("hpa", "dynamo-sla", "dynamo-load")
"""The peers' policies (static-best and oracle are references, not peers)."""


def peers_at_99(rows: dict[str, Any]) -> list[str]:
    """The peers run on this workload that reach 99 % attainment."""
    return [n for n in PEERS if n in rows and rows[n]["slo_attainment"] >= 0.99]


def tracking_bound(entry: dict[str, Any]) -> float | None:
    """A day-long workload's floor for any policy, as a share of static-best's accelerator-hours: every
    minute the smallest whole number of replicas (at least one) in proportion to the daily curve, sized
    from static-best's pools at the peak; no headroom, no start-up, no bursts. Rounding up on small pools
    is what keeps it above the curve's mean."""
    static, ratio = entry.get("static_best"), entry.get("diurnal")
    if not static or not ratio:
        return None
    per_replica = {role: tp for role, (_, tp) in zip(("prefill", "decode"), PAIRS[entry["pair"]], strict=True)}
    curve = diurnal_curve(np.arange(30.0, 86400.0, 60.0), ratio)
    tracked = sum(per_replica[role] * np.maximum(1.0, np.ceil(static[role] * curve - 1e-9)).mean()
                  for role in per_replica)
    held = sum(per_replica[role] * static[role] for role in per_replica)
    return float(tracked / held)


def verdict(entry: dict[str, Any]) -> str:
    """Issue 4's targets for one workload, checked."""
    rows = {row["policy"]: row for row in entry["policies"]}
    if "disagg" not in rows or "static-best" not in rows:
        return "not judged (needs disagg and static-best)"
    ours = rows["disagg"]
    ours_hours = ours["accelerator_hours"]["total"]
    notes = []
    dominated = [
        name for name, row in rows.items()
        if name not in ("disagg", "oracle")
        and row["slo_attainment"] >= ours["slo_attainment"] and row["accelerator_hours"]["total"] < ours_hours
    ]
    notes.append(f"dominated by {','.join(dominated)}" if dominated else "not dominated")
    static = rows["static-best"]
    ratio = ours_hours / static["accelerator_hours"]["total"]
    if entry["workload"] == "hour":
        ok = (static["slo_attainment"] < 0.99 or ours["slo_attainment"] >= 0.99) and ratio <= 1.10
        notes.append(f"{'PASS' if ok and not dominated else 'FAIL'} hour: {ours['slo_attainment']:.2%}, "
                     f"{ratio:.2f}x static-best hours (target >=99 %, <=1.10x)")
    else:
        peers = peers_at_99(rows)
        cheaper_than_peers = all(ours_hours < rows[n]["accelerator_hours"]["total"] for n in peers)
        ok = ours["slo_attainment"] >= 0.99 and ratio <= 0.7 and cheaper_than_peers
        bound = tracking_bound(entry)
        notes.append(f"{'PASS' if ok and not dominated else 'FAIL'} day: {ours['slo_attainment']:.2%}, "
                     f"{ratio:.2f}x static-best hours (target >=99 %, <=0.70x"
                     f"{f'; perfect tracking {bound:.2f}x' if bound is not None else ''})")
    return "; ".join(notes)


def print_table(entries: list[dict[str, Any]]) -> None:
    header = (f"{'workload':<34} {'policy':<12} {'attain':>7} {'ttft p50/p99 ms':>16} {'itl p90':>7} "
              f"{'acc-hours':>9} {'cost $':>8} {'max P/D':>8} {'events':>6} {'wall s':>7} {'s/sim-h':>7}")
    print(header)
    for entry in entries:
        label = f"{entry['trace'].split('.')[0]} {entry['workload']} {entry['pair']}"
        for row in entry["policies"]:
            print(
                f"{label:<34} {row['policy']:<12} {row['slo_attainment']:>7.2%} "
                f"{row['ttft_ms']['p50']:>7.0f}/{row['ttft_ms']['p99']:>8.0f} {row['itl_ms']['p90']:>7.1f} "
                f"{row['accelerator_hours']['total']:>9.1f} {row['cost_usd']:>8.0f} "
                f"{row['max_replicas']['prefill']:>3}/{row['max_replicas']['decode']:<4} {row['scale_events']:>6} "
                f"{row['sim_wall_s']:>7.1f} {row.get('sim_wall_s_per_hour', math.nan):>7.2f}"
            )
            label = ""
        print(f"{'':<34} -> {verdict(entry)}  (TTFT {entry['ttft_ms']:.0f} ms p{entry.get('percentile', 90):g}, "
              f"x{entry['time_scale']}, {entry['requests']} requests)")
    hour_speed = [row.get("sim_wall_s_per_hour", math.nan) for e in entries if e["workload"] == "hour"
                  for row in e["policies"]]
    day_walls = [row["sim_wall_s"] for e in entries if e["workload"] == "day" for row in e["policies"]]
    if hour_speed:
        print(f"speed: one-hour runs at most {max(hour_speed):.1f} s per simulated hour (target <= 10 s)")
    if day_walls:
        print(f"speed: day-long runs at most {max(day_walls):.0f} s each, {WARMUP_S / 60:.0f}-min warm-up included "
              f"(target <= 240 s)")


def markdown(entries: list[dict[str, Any]]) -> str:
    """One row per workload: ours, static-best and the best peer, against issue 4's targets."""
    lines = [
        "| workload | pair | TTFT target | ours: attainment / acc-h | static-best | best peer reaching 99 % "
        "| oracle | ours / static-best | perfect tracking | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        rows = {row["policy"]: row for row in entry["policies"]}

        def cell(name: str, rows: dict[str, Any] = rows) -> str:
            row = rows.get(name)
            return f"{row['slo_attainment']:.2%} / {row['accelerator_hours']['total']:.1f}" if row else "not run"

        peers = peers_at_99(rows)
        best_peer = min(peers, key=lambda n: rows[n]["accelerator_hours"]["total"]) if peers else None
        ratio = rows["disagg"]["accelerator_hours"]["total"] / rows["static-best"]["accelerator_hours"]["total"]
        kind = f"{entry['trace'].split('.')[0]} {entry['workload']}"
        if entry.get("diurnal"):
            kind += f" (diurnal {entry['diurnal']:g})"
        passed = "PASS" if "PASS" in verdict(entry) else "FAIL"
        bound = tracking_bound(entry)
        peers_run = "none" if any(n in rows for n in PEERS) else "not run"
        lines.append(
            f"| {kind} | {entry['pair']} | {entry['ttft_ms'] / 1000:g} s | {cell('disagg')} | {cell('static-best')} "
            f"| {f'{best_peer}: {cell(best_peer)}' if best_peer else peers_run} | {cell('oracle')} | {ratio:.3f}x "
            f"| {f'{bound:.2f}x' if bound is not None else '-'} | {passed} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated trace names (default: all four)")
    parser.add_argument("--pairs", default="h100-h200,b200-mi300x")
    parser.add_argument("--workloads", default="hour,day")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--dt-hour", type=float, default=0.2, help="time step of one-hour runs")
    parser.add_argument("--dt-day", type=float, default=0.5, help="time step of day-long runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--day-scale", type=float, default=1.0,
                        help="day-long workloads at this multiple of the hour's rate (default 1: the peak hour "
                             "runs at the hour's scale); larger pools round up less")
    parser.add_argument("--plot-dir", default=None, help="write a plot of our policy's day-long runs here")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    parser.add_argument("--report", type=Path, default=None,
                        help="print the table (and a markdown summary) of an earlier results file; run nothing")
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier results file: policies not run now keep their rows from it (same "
                             "workload and setup only)")
    parser.add_argument("--static-cache", default=None,
                        help="JSON file of static-best allocations found earlier (read, then updated)")
    args = parser.parse_args(argv)
    if args.report is not None:
        entries = json.loads(args.report.read_text())["entries"]
        print_table(entries)
        print()
        print(markdown(entries))
        return 0
    traces = [t for t in TRACE_FILES if args.only is None or any(o in t for o in args.only.split(","))]
    jobs = [
        (trace, pair, kind, args.dt_hour if kind == "hour" else args.dt_day, args.plot_dir, args.static_cache,
         args.policies, args.day_scale)
        for kind in args.workloads.split(",") for pair in args.pairs.split(",") for trace in traces
    ]
    # Longest (day-long) runs first, so that the workers finish together; the table keeps hours first.
    ordered = sorted(jobs, key=lambda job: job[2] != "day")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(ordered, pool.map(_run, ordered), strict=True))
    entries = [results[job] for job in jobs]
    if args.merge is not None:
        earlier = {e["static_key"]: e for e in json.loads(args.merge.read_text())["entries"]}
        for entry in entries:
            previous = earlier.get(entry["static_key"])
            if previous is None:
                continue
            ran = {row["policy"] for row in entry["policies"]}
            kept = {row["policy"]: row for row in previous["policies"] if row["policy"] not in ran}
            entry["policies"] = [
                next(row for row in entry["policies"] if row["policy"] == name) if name in ran else kept[name]
                for name in POLICIES if name in ran or name in kept
            ]
            if entry.get("static_best") is None:
                entry["static_best"] = previous.get("static_best")
    if args.static_cache is not None:
        path = Path(args.static_cache)
        cache = json.loads(path.read_text()) if path.exists() else {}
        cache.update({e["static_key"]: e["static_best"] for e in entries if e["static_best"] is not None})
        path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    print_table(entries)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"entries": entries, "verdicts": [verdict(e) for e in entries]}, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
