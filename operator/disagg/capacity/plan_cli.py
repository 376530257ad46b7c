"""`disagg plan`: size a disaggregated deployment before buying hardware, and emit its InferenceService."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import ModelConfigError, ModelShape, builtin_model, from_hf_config, to_architecture
from disagg.capacity.multinode import UnknownEfficiency
from disagg.capacity.plan import SLO, PhasePlan, Plan, PlanError, Workload, plan
from disagg.capacity.reach import Phase, out_of_reach, reach
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog, CatalogError, load_catalog
from disagg.yamlio import dump_yaml

if TYPE_CHECKING:  # traces need numpy, which only `--trace` does
    from disagg.capacity.traces import Workload as Trace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg plan",
        description="Pick per phase the accelerator, tensor-parallel size and replicas that meet the SLO at the "
        "lowest cost (roofline capacity model), and compare with an aggregated deployment.",
    )
    parser.add_argument("--model", default="llama-3.1-70b", help="built-in model or Hugging Face id")
    parser.add_argument("--model-config", type=Path, default=None, help="a Hugging Face config.json instead")
    parser.add_argument("--weight-dtype", default=None, help="override the served weight dtype (bf16, fp8, ...)")
    parser.add_argument("--kv-dtype", default=None, help="override the KV-cache dtype")
    parser.add_argument("--rate", type=float, default=None, help="requests per second")
    parser.add_argument("--isl", type=float, default=None, help="mean input (prompt) tokens")
    parser.add_argument("--osl", type=float, default=None, help="mean output tokens")
    parser.add_argument("--trace", type=Path, default=None, help="derive rate, ISL and OSL from a trace")
    parser.add_argument("--ttft-ms", type=float, default=500.0)
    parser.add_argument("--itl-ms", type=float, default=50.0)
    parser.add_argument("--percentile", type=float, default=90.0)
    parser.add_argument("--prefill-accelerators", default="nvidia-h100,nvidia-b200,amd-mi300x")
    parser.add_argument("--decode-accelerators", default="nvidia-h200,nvidia-b300,amd-mi300x")
    parser.add_argument("--accelerator-catalog", type=Path, default=None, help="catalogue overrides (YAML)")
    parser.add_argument("--max-nodes", type=int, default=8, help="most nodes one worker may span (default 8)")
    parser.add_argument(
        "--compare", default=None, metavar="PREFILL/DECODE,...",
        help="plan each prefill/decode accelerator pair on its own and show them side by side, e.g. "
        "aws-trainium3/cerebras-wse3,nvidia-h100/nvidia-h200",
    )
    parser.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    parser.add_argument("--emit-manifest", action="store_true", help="print the InferenceService instead")
    parser.add_argument("--name", default=None, help="metadata.name of the emitted InferenceService")
    parser.add_argument("--namespace", default="default")
    return parser


def _model(args: argparse.Namespace) -> ModelShape:
    shape = from_hf_config(args.model_config) if args.model_config is not None else builtin_model(args.model)
    return shape.with_dtypes(args.weight_dtype, args.kv_dtype)


def _trace(path: Path | None) -> Trace | None:
    if path is None:
        return None
    from disagg.capacity.traces import read_trace

    return read_trace(path)


def _load(args: argparse.Namespace, trace: Trace | None) -> Workload:
    if trace is not None:
        rate = trace.mean_rate() if args.rate is None else args.rate
        isl = float(trace.prompt_tokens.mean()) if args.isl is None else args.isl
        osl = float(trace.output_tokens.mean()) if args.osl is None else args.osl
        return Workload(rate, isl, osl)
    missing = [flag for flag, value in (("--rate", args.rate), ("--isl", args.isl), ("--osl", args.osl))
               if value is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --trace FILE)")
    for flag, value in (("--rate", args.rate), ("--isl", args.isl), ("--osl", args.osl)):
        if value <= 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    return Workload(args.rate, args.isl, args.osl)


def trace_out_of_reach(result: Plan, trace: Trace) -> dict[str, Any]:
    """The trace's requests the planned replicas cannot serve within the SLO at any count, and why."""
    limits = reach(result.model, Phase(result.prefill.accelerator, result.prefill.tensor_parallel),
                   Phase(result.decode.accelerator, result.decode.tensor_parallel), ttft_s=result.slo.ttft_s,
                   itl_s=result.slo.itl_s)
    shares = out_of_reach(limits, trace.prompt_tokens, trace.output_tokens).shares()
    return {
        "percent": round(shares["any"] * 100, 2),
        "longPrompts": {"percent": round(shares["ttft"] * 100, 2), "overTokens": round(limits.longest_prompt)},
        "tooLongForKvCache": {"percent": round(shares["fit"] * 100, 2),
                              "overTokens": round(min(limits.kv_tokens, limits.max_context))},
        "contextsTooLongForItl": {"percent": round(shares["itl"] * 100, 2), "overTokens": round(limits.itl_context)},
        "sloReachable": shares["any"] <= 1.0 - result.slo.percentile / 100.0,
    }


def format_out_of_reach(result: Plan, out: dict[str, Any]) -> str:
    """What `trace_out_of_reach` found, in words."""
    if out["percent"] <= 0:
        return "out of reach: none of the trace's requests (every prompt and context fits the targets)"
    parts = []
    if out["longPrompts"]["percent"] > 0:
        parts.append(f"{out['longPrompts']['percent']:g} % prompts over {out['longPrompts']['overTokens']:,} tokens, "
                     f"whose prefill alone on {result.prefill.tensor_parallel} x {result.prefill.accelerator.name} "
                     f"exceeds the {result.slo.ttft_s * 1000:.0f} ms TTFT target")
    if out["tooLongForKvCache"]["percent"] > 0:
        parts.append(f"{out['tooLongForKvCache']['percent']:g} % longer than a decode replica holds "
                     f"({out['tooLongForKvCache']['overTokens']:,} tokens)")
    if out["contextsTooLongForItl"]["percent"] > 0:
        parts.append(f"{out['contextsTooLongForItl']['percent']:g} % contexts over "
                     f"{out['contextsTooLongForItl']['overTokens']:,} tokens, whose single-sequence step exceeds "
                     f"the {result.slo.itl_s * 1000:.0f} ms ITL target")
    verdict = ("" if out["sloReachable"] else
               f"; more than the {100 - result.slo.percentile:g} % the p{result.slo.percentile:g} SLO allows: "
               "no replica count meets it (a larger TP or a looser target would)")
    return (f"out of reach: {out['percent']:g} % of the trace's requests at any replica count "
            f"({'; '.join(parts)}); the autoscaler does not size for them{verdict}")


def plan_to_dict(result: Plan, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan as plain data (the json and yaml outputs)."""

    def phase(p: PhasePlan) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accelerator": p.accelerator.name,
            "tensorParallel": p.tensor_parallel,
            "layout": p.describe(),
            "nodesPerWorker": p.nodes,
            "acceleratorsPerWorker": p.per_worker,
            "replicas": p.replicas,
            "accelerators": p.accelerators,
            "usdPerHour": round(p.usd_per_hour, 2) if p.priced else None,
        }
        if p.why:
            out["why"] = p.why
        return out

    body: dict[str, Any] = {
        "model": result.model.name,
        "workload": {"rate": result.workload.rate, "isl": result.workload.isl, "osl": result.workload.osl},
        "slo": {"ttftMs": result.slo.ttft_s * 1000, "itlMs": result.slo.itl_s * 1000,
                "percentile": result.slo.percentile},
        "prefill": {**phase(result.prefill), "predictedTtftMs": round(result.prefill.predicted_latency_s * 1000, 1)},
        "decode": {**phase(result.decode), "predictedItlMs": round(result.decode.predicted_latency_s * 1000, 1)},
        "pdRatio": result.pd_ratio,
        "usdPerHour": round(result.usd_per_hour, 2) if result.priced else None,
        "tokensPerDollar": round(result.tokens_per_dollar) if result.priced else None,
    }
    if out is not None:
        body["outOfReach"] = out
    agg = result.aggregated
    if agg is not None:
        tokens_per_hour = result.workload.rate * (result.workload.isl + result.workload.osl) * 3600.0
        body["aggregated"] = {
            "accelerator": agg.accelerator.name,
            "tensorParallel": agg.tensor_parallel,
            "replicas": agg.replicas,
            "predictedTtftMs": round(agg.predicted_ttft_s * 1000, 1),
            "predictedItlMs": round(agg.predicted_itl_s * 1000, 1),
            "usdPerHour": round(agg.usd_per_hour, 2),
            "tokensPerDollar": round(tokens_per_hour / agg.usd_per_hour),
        }
    return body


def _pool(option: PhasePlan) -> dict[str, Any]:
    """One pool of the emitted InferenceService; a multi-node worker's parallelism spans its nodes."""
    layout = option.layout
    if layout is None:
        count, parallelism = option.tensor_parallel, {"tensor": option.tensor_parallel}
    else:
        count = layout.per_node
        parallelism = {"tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data,
                       "expert": layout.expert}
    return {
        "replicas": option.replicas,
        "accelerator": {"type": option.accelerator.name, "count": count},
        "parallelism": parallelism,
        "autoscaling": {"minReplicas": 1, "maxReplicas": max(2, option.replicas * 4)},
    }


def manifest(result: Plan, name: str, namespace: str) -> dict[str, Any]:
    """A ready InferenceService for the plan, validated by the API model."""
    model = result.model
    hf_name = model.hf_name or model.name
    for option in (result.prefill, result.decode):
        if option.accelerator.plan_only:
            raise PlanError(f"{option.accelerator.name} is planner-only (no Kubernetes device plugin exposes it): "
                            "no InferenceService can request it")
    spec = {
        "model": {
            "name": hf_name,
            "uri": f"hf://{hf_name}",
            "architecture": to_architecture(model).model_dump(by_alias=True, exclude_none=True),
        },
        "slo": {"ttftMs": round(result.slo.ttft_s * 1000), "itlMs": round(result.slo.itl_s * 1000),
                "percentile": result.slo.percentile},
        "prefill": _pool(result.prefill),
        "decode": _pool(result.decode),
    }
    validated = InferenceServiceSpec.model_validate(spec)
    return {
        "apiVersion": "disagg.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": validated.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }


def _cost(option: PhasePlan) -> str:
    return f"{option.usd_per_hour:>9.2f}" if option.priced else f"{'unpriced':>9}"


def format_plan(result: Plan) -> str:
    """A human-readable plan."""
    p, d = result.prefill, result.decode
    lines = [
        f"model {result.model.name}: {result.workload.rate:g} req/s, ISL {result.workload.isl:.0f}, "
        f"OSL {result.workload.osl:.0f}; SLO TTFT {result.slo.ttft_s * 1000:.0f} ms, "
        f"ITL {result.slo.itl_s * 1000:.1f} ms"
        f" (p{result.slo.percentile:g})",
        f"{'pool':<8} {'accelerator':<17} {'worker layout':<26} {'replicas':>8} {'accel':>6} {'predicted':>16} "
        f"{'$/hour':>9}",
        f"{'prefill':<8} {p.accelerator.name:<17} {p.describe():<26} {p.replicas:>8} {p.accelerators:>6} "
        f"{'TTFT ' + format(p.predicted_latency_s * 1000, '.0f') + ' ms':>16} {_cost(p)}",
        f"{'decode':<8} {d.accelerator.name:<17} {d.describe():<26} {d.replicas:>8} {d.accelerators:>6} "
        f"{'ITL ' + format(d.predicted_latency_s * 1000, '.1f') + ' ms':>16} {_cost(d)}",
    ]
    for option in (p, d):
        if option.why:
            lines.append(f"  {option.role} {option.describe()}: {option.why}")
    if result.priced:
        lines.append(f"P:D ratio {result.pd_ratio}, ${result.usd_per_hour:.2f}/hour, "
                     f"{result.tokens_per_dollar:,.0f} tokens per dollar")
    else:
        unpriced = ", ".join(sorted({o.accelerator.name for o in (p, d) if not o.priced}))
        lines.append(f"P:D ratio {result.pd_ratio}; no hourly price for {unpriced} in the catalogue "
                     "(set price.usdPerHour with --accelerator-catalog to compare costs)")
    agg = result.aggregated
    if agg is not None:
        tokens = result.workload.rate * (result.workload.isl + result.workload.osl) * 3600.0
        relative = f" ({agg.usd_per_hour / result.usd_per_hour:.2f}x the disaggregated cost)" if result.priced else ""
        lines.append(
            f"aggregated: {agg.replicas} x {agg.accelerator.name} TP{agg.tensor_parallel}, "
            f"TTFT ~{agg.predicted_ttft_s * 1000:.0f} ms, ITL ~{agg.predicted_itl_s * 1000:.1f} ms, "
            f"${agg.usd_per_hour:.2f}/hour, {tokens / agg.usd_per_hour:,.0f} tokens per dollar{relative}"
        )
    else:
        lines.append("aggregated: no candidate meets both targets in one pool")
    return "\n".join(lines)


def compare(
    model: ModelShape, load: Workload, slo: SLO, pairs: list[tuple[Accelerator, Accelerator]], max_nodes: int
) -> list[tuple[str, Plan | None, str]]:
    """Each prefill/decode pair planned on its own: (pair, plan or None, why it failed)."""
    rows: list[tuple[str, Plan | None, str]] = []
    for prefill, decode in pairs:
        name = f"{prefill.name}/{decode.name}"
        try:
            rows.append((name, plan(model, load, slo, [prefill], [decode], max_nodes=max_nodes), ""))
        except PlanError as error:
            rows.append((name, None, str(error)))
    return rows


def format_comparison(model: ModelShape, load: Workload, slo: SLO, rows: list[tuple[str, Plan | None, str]]) -> str:
    """The pairs side by side, then each one's reasons."""
    lines = [
        f"model {model.name} ({model.weight_bytes / 1e9:.0f} GB of {model.weight_dtype} weights, "
        f"{model.kv_bytes_per_token / 1024:.0f} KiB of KV per token): {load.rate:g} req/s, ISL {load.isl:.0f}, "
        f"OSL {load.osl:.0f}; SLO TTFT {slo.ttft_s * 1000:.0f} ms, ITL {slo.itl_s * 1000:.1f} ms (p{slo.percentile:g})",
        f"{'prefill/decode':<34} {'prefill':<22} {'decode':<30} {'TTFT':>8} {'ITL':>8} {'accel':>6} {'$/hour':>9}",
    ]
    for name, result, _ in rows:
        if result is None:
            lines.append(f"{name:<34} does not meet the SLO")
            continue
        p, d = result.prefill, result.decode
        cost = f"{result.usd_per_hour:>9.2f}" if result.priced else f"{'unpriced':>9}"
        lines.append(
            f"{name:<34} {str(p.replicas) + ' x ' + p.describe():<22} {str(d.replicas) + ' x ' + d.describe():<30} "
            f"{p.predicted_latency_s * 1000:>6.0f}ms {d.predicted_latency_s * 1000:>6.1f}ms "
            f"{p.accelerators + d.accelerators:>6} {cost}"
        )
    lines.append("why:")
    for name, result, error in rows:
        if result is None:
            lines.append(f"  {name}: {error}")
        else:
            for option in (result.prefill, result.decode):
                if option.why:
                    lines.append(f"  {name} {option.role}: {option.why}")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    """Entry point of `disagg plan`; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        catalog: AcceleratorCatalog = load_catalog(args.accelerator_catalog)
        model = _model(args)
        trace = _trace(args.trace)
        load = _load(args, trace)
        slo = SLO(args.ttft_ms / 1000.0, args.itl_ms / 1000.0, args.percentile)
        if args.max_nodes < 1:
            raise ValueError(f"--max-nodes must be >= 1, got {args.max_nodes}")
        if args.compare is not None:
            pairs = []
            for pair in args.compare.split(","):
                prefill_name, slash, decode_name = pair.strip().partition("/")
                if not slash or not prefill_name or not decode_name:
                    raise ValueError(f"--compare takes PREFILL/DECODE pairs, got {pair.strip()!r}")
                pairs.append((catalog[prefill_name], catalog[decode_name]))
            print(format_comparison(model, load, slo, compare(model, load, slo, pairs, args.max_nodes)))
            return 0
        prefill = [catalog[name.strip()] for name in args.prefill_accelerators.split(",") if name.strip()]
        decode = [catalog[name.strip()] for name in args.decode_accelerators.split(",") if name.strip()]
        result = plan(model, load, slo, prefill, decode, max_nodes=args.max_nodes)
    except KeyError as error:
        print(f"disagg plan: {error.args[0]}", file=sys.stderr)
        return 2
    except (ModelConfigError, CatalogError, PlanError, UnknownEfficiency, ValueError) as error:  # TraceError too
        print(f"disagg plan: {error}", file=sys.stderr)
        return 2
    if args.emit_manifest:
        name = args.name or model.name.split("/")[-1].lower().replace(".", "-").replace("_", "-")
        try:
            print(dump_yaml(manifest(result, name, args.namespace)), end="")
        except PlanError as error:
            print(f"disagg plan: {error}", file=sys.stderr)
            return 2
        return 0
    out = trace_out_of_reach(result, trace) if trace is not None else None
    if args.output == "json":
        print(json.dumps(plan_to_dict(result, out), indent=2))
    elif args.output == "yaml":
        print(dump_yaml(plan_to_dict(result, out)), end="")
    else:
        print(format_plan(result))
        if out is not None:
            print(format_out_of_reach(result, out))
    return 0
