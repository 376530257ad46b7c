"""`disagg simulate`: replay a real trace through simulated pools with an autoscaling policy in the loop."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from disagg.capacity.models import ModelConfigError, ModelShape, builtin_model, from_hf_config
from disagg.catalog.accelerators import AcceleratorCatalog, CatalogError, load_catalog
from disagg.sim.engine import NothingMeasured, PoolSetup, SimResult, SimSetup
from disagg.sim.runner import POLICIES, initial_replicas, run_policy
from disagg.sim.traces import TraceError, Workload, build_workload, read_trace, with_warmup


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg simulate",
        description="Replay a request trace (Azure CSV or Mooncake JSONL) through simulated prefill and "
        "decode pools, with an autoscaling policy in the loop, and report SLO attainment and cost.",
    )
    parser.add_argument("--trace", required=True, type=Path, help="trace file (format detected)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="F times the arrival rate (default 1)")
    parser.add_argument("--duration", type=float, default=None, help="seconds to simulate (default: the trace)")
    parser.add_argument("--diurnal", type=float, default=None, metavar="RATIO",
                        help="build a 24-hour workload whose trough is peak/RATIO (see disagg.sim.traces)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the diurnal thinning")
    parser.add_argument("--model", default="llama-3.1-70b", help="built-in model (default llama-3.1-70b)")
    parser.add_argument("--model-config", type=Path, default=None, help="a Hugging Face config.json instead")
    parser.add_argument("--prefill-accelerator", default="nvidia-h100")
    parser.add_argument("--decode-accelerator", default="nvidia-h200")
    parser.add_argument("--prefill-tp", type=int, default=2, help="tensor parallel size of a prefill replica")
    parser.add_argument("--decode-tp", type=int, default=1, help="tensor parallel size of a decode replica")
    parser.add_argument("--max-replicas", type=int, default=96, help="per pool")
    parser.add_argument("--ttft-ms", type=float, default=2000.0)
    parser.add_argument("--itl-ms", type=float, default=50.0)
    parser.add_argument("--percentile", type=float, default=90.0, help="SLO percentile the policies keep")
    parser.add_argument("--startup-s", type=float, default=60.0, help="replica start-up delay (default 60)")
    parser.add_argument("--warmup-s", type=float, default=0.0,
                        help="replay the workload's last S seconds first, unbilled and unmeasured (steady state)")
    parser.add_argument("--dt", type=float, default=0.1, help="simulation time step in seconds")
    parser.add_argument("--accelerator-catalog", type=Path, default=None, help="catalogue overrides (YAML)")
    parser.add_argument("--policy", default="disagg", help=f"one of {', '.join(POLICIES)}, or all")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                        help="plot load, replicas and latency over time (of the first policy)")
    return parser


def _model(args: argparse.Namespace) -> ModelShape:
    if args.model_config is not None:
        return from_hf_config(args.model_config)
    return builtin_model(args.model)


_FLAGS = {"warmup_s": "--warmup-s", "startup_s": "--startup-s", "duration_s": "--duration", "requests": "--duration"}
"""The flag behind each setting a refused simulation names."""


def _nothing_measured(args: argparse.Namespace, workload: Workload) -> str | None:
    """Why these flags would measure nothing, naming the flag; None when they measure something."""
    length = f"{workload.duration_s:.4g} s" + (
        "" if args.duration is not None else f", the trace at --time-scale {args.time_scale:g}"
    )
    if args.warmup_s > 0 and args.warmup_s >= workload.duration_s:
        return (f"--warmup-s {args.warmup_s:g} is at least as long as the workload ({length}): nothing would be "
                "measured; use a shorter warm-up")
    if workload.duration_s < args.startup_s:
        flag = "--duration" if args.duration is not None else "--time-scale"
        return (f"{flag}: the workload ({length}) is shorter than one replica start-up (--startup-s "
                f"{args.startup_s:g}): no scaling decision could take effect")
    if workload.requests == 0:
        return f"--duration: no request arrives in the first {workload.duration_s:g} s of the trace (empty window)"
    return None


def format_table(results: list[dict[str, object]]) -> str:
    """Policies as rows: attainment, latency percentiles, accelerator-hours, cost."""
    header = (
        f"{'policy':<12} {'requests':>8} {'attain':>7} {'ttft p50/p90/p99 ms':>22} {'itl p90 ms':>10} "
        f"{'acc-h P/D/total':>20} {'cost $':>8} {'max P/D':>8} {'events':>6} {'wall s':>6}"
    )
    lines = [header]
    for row in results:
        ttft = row["ttft_ms"]
        itl = row["itl_ms"]
        hours = row["accelerator_hours"]
        peak = row["max_replicas"]
        assert isinstance(ttft, dict) and isinstance(itl, dict) and isinstance(hours, dict)
        assert isinstance(peak, dict)
        lines.append(
            f"{row['policy']!s:<12} {row['requests']!s:>8} {row['slo_attainment']:>7.2%} "
            f"{ttft['p50']:>7.0f}/{ttft['p90']:>6.0f}/{ttft['p99']:>7.0f} {itl['p90']:>10.1f} "
            f"{hours['prefill']:>6.1f}/{hours['decode']:>6.1f}/{hours['total']:>6.1f} {row['cost_usd']:>8.0f} "
            f"{peak['prefill']:>3}/{peak['decode']:<4} {row['scale_events']!s:>6} {row['sim_wall_s']:>6.1f}"
        )
    return "\n".join(lines)


class _Refused(Exception):
    """What `disagg simulate` prints instead of running (exit code 2)."""


def _inputs(args: argparse.Namespace) -> tuple[AcceleratorCatalog, SimSetup, Workload, list[str]]:
    """The catalogue, the setup, the workload and the policies the flags ask for; _Refused says why not."""
    try:
        catalog: AcceleratorCatalog = load_catalog(args.accelerator_catalog)
        model = _model(args)
        prefill_acc = catalog[args.prefill_accelerator]
        decode_acc = catalog[args.decode_accelerator]
        trace = read_trace(args.trace)
        workload = build_workload(
            trace, time_scale=args.time_scale, duration_s=args.duration, diurnal=args.diurnal, seed=args.seed
        )
    except (ModelConfigError, CatalogError, TraceError, KeyError) as error:
        raise _Refused(error.args[0] if isinstance(error, KeyError) else str(error)) from None
    names = list(POLICIES) if args.policy == "all" else [p.strip() for p in args.policy.split(",")]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise _Refused(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}, all")
    problem = _nothing_measured(args, workload)
    if problem is not None:
        raise _Refused(problem)
    setup = SimSetup(
        model=model,
        prefill=PoolSetup(prefill_acc, args.prefill_tp, 1, 1, args.max_replicas),
        decode=PoolSetup(decode_acc, args.decode_tp, 1, 1, args.max_replicas),
        ttft_s=args.ttft_ms / 1000.0,
        itl_s=args.itl_ms / 1000.0,
        percentile=args.percentile,
        startup_s=args.startup_s,
        dt=args.dt,
        warmup_s=max(args.warmup_s, 0.0),
    )
    return catalog, setup, workload, names


def simulate_main(argv: list[str]) -> int:
    """Entry point of `disagg simulate`; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        catalog, setup, measured, names = _inputs(args)
        workload = with_warmup(measured, setup.warmup_s)
        setup = initial_replicas(setup, workload)
        runs: list[SimResult] = [run_policy(name, setup, workload, catalog) for name in names]
    except _Refused as refused:
        print(f"disagg simulate: {refused}", file=sys.stderr)
        return 2
    except NothingMeasured as error:
        print(f"disagg simulate: {_FLAGS.get(error.setting, '--duration')}: {error}", file=sys.stderr)
        return 2
    summaries = [run.summary() for run in runs]
    if args.output == "json":
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
    else:
        print(
            f"{measured.name}: {measured.requests} requests over {measured.duration_s / 3600:.2f} h "
            f"({measured.mean_rate():.1f} req/s), {setup.model.name}, prefill {setup.prefill.accelerator.name} "
            f"TP{args.prefill_tp}, decode {setup.decode.accelerator.name} TP{args.decode_tp}, SLO TTFT "
            f"{args.ttft_ms:.0f} ms / ITL {args.itl_ms:.0f} ms"
        )
        print(format_table(summaries))
    if args.plot is not None:
        from disagg.sim.plot import plot_run

        plot_run(runs[0], args.plot, title=f"{workload.name}, {runs[0].policy}")
    return 0
