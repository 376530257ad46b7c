"""Generalisation benchmark: the autoscaling policy on workloads drawn at random, not the ones it was tuned on.

    .venv/bin/python bench/generalise.py [--count 64] [--jobs 2] [--only g03,g17] [--report]

Every workload is drawn with a fixed seed (`--seed`, default 22; workload i uses its own generator, so
adding workloads never changes earlier ones) over:
- a trace of ../shared/traces (workload i takes trace i mod 4: every trace in turn);
- its length: one hour, or every eighth workload a day (diurnal 10 for Azure code, 5 for the others:
  a 24-hour day whose peak hour runs at the drawn rate); both replay their last 40 minutes first as a
  warm-up, neither billed nor measured (steady state, as bench/autoscale.py);
- a rate multiplier 0.5-4: time compressed by it (`--time-scale`; bursts become denser and shorter);
- a mean pool size 1-30 replicas (log-uniform) of the busier pool at 75 % utilisation, reached by the
  volume of traffic: the trace superposed on time-shifted copies of itself (or thinned below one copy);
- a model: Llama-3.1-8B (bf16), Llama-3.1-70B (fp8) or Qwen3-235B-A22B (mixture of experts, fp8);
- an accelerator pair (prefill / decode): H100/H200, B200/MI300X, MI300X/MI300X, Trainium2/Trainium3,
  Trainium2/H100; per pool the smallest tensor-parallel size whose KV cache holds 32k tokens, doubled for
  three draws in ten;
- an SLO: TTFT 0.3-5 s (log-uniform), ITL 20-100 ms, percentile 90 or 99 (the target attainment is that
  share of the requests in reach);
- a replica start-up time 30-300 s (log-uniform).
A draw is taken again (same generator, next numbers) when more than 20 % of its requests are out of reach
(disagg.capacity.reach: a prompt whose prefill alone exceeds the TTFT target, a context no decode replica
holds or whose single-sequence step exceeds the ITL target), or when its mean rate is more than this
machine simulates in minutes (60 req/s for an hour, 15 for a day: an 8B model's pools stay small).

For each workload: ours (`disagg`), static-best (the cheapest constant allocation reaching the target
attainment over the requests in reach, found in hindsight by search) and the peers' policies (hpa,
dynamo-sla, dynamo-load); on one-hour workloads ours again with a looser SLO (TTFT x2, ITL x1.5 or
percentile 99 -> 90, in turn), which must not cost more accelerator-hours beyond 3 % (monotonic in the
SLO); where requests are out of reach, ours again with each pool's maximum at twice its mean need, which
the run at 128 must not beat in hours without beating it in attainment; on day-long workloads the
perfect-follower bound (static-best's pools scaled by the daily curve, whole replicas, no delay, no
headroom; as bench/autoscale.py).

Resumable and parallel-safe: each result (a workload and a policy) is a file in `--cache`
(bench/results/.generalise-cache/, not committed) keyed by the workload and a fingerprint of the code it
depends on (the policy's files for ours; the simulator's and baselines' for the others); a result being
computed holds a lock file with its process id, so two runs share the work. Prints progress; writes
bench/results/generalise.json (every workload, its parameters, its rows and verdicts, the summary).

Traces: Azure Public Dataset (Microsoft, CC-BY-4.0) and Mooncake FAST'25 traces (Moonshot AI, Apache-2.0).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from disagg.capacity.models import builtin_model
from disagg.capacity.reach import Phase, out_of_reach, reach
from disagg.capacity.roofline import decode_tokens_per_s, kv_capacity_tokens, prefill_tokens_per_s
from disagg.capacity.traces import diurnal_curve
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.sim.baselines import find_static_best, run_static
from disagg.sim.engine import PoolSetup, SimResult, SimSetup
from disagg.sim.runner import initial_replicas, peak_replicas, run_policy
from disagg.sim.traces import Workload, build_workload, read_trace, with_warmup

ROOT = Path(__file__).resolve().parent.parent
TRACES = next((parent / "shared" / "traces" for parent in ROOT.parents if (parent / "shared" / "traces").is_dir()),
              ROOT.parent / "shared" / "traces")
RESULTS = ROOT / "bench" / "results" / "generalise.json"
CACHE = ROOT / "bench" / "results" / ".generalise-cache"
TRACE_FILES = ("azure2023_conv.csv", "azure2023_code.csv", "mooncake_conversation.jsonl", "mooncake_synthetic.jsonl")
MODELS = ("llama-3.1-8b", "llama-3.1-70b", "qwen3-235b-a22b")
PAIRS = {
    "h100-h200": ("nvidia-h100", "nvidia-h200"),
    "b200-mi300x": ("nvidia-b200", "amd-mi300x"),
    "mi300x-mi300x": ("amd-mi300x", "amd-mi300x"),
    "trn2-trn3": ("aws-trainium2", "aws-trainium3"),
    "trn2-h100": ("aws-trainium2", "nvidia-h100"),
}
PEERS = ("hpa", "dynamo-sla", "dynamo-load")
WARMUP_S = 2400.0
POOL_MAX = 128
MIN_KV_TOKENS = 32768
MAX_RATE = {"hour": 60.0, "day": 15.0}
MAX_OUT_OF_REACH = 0.2
UTILISATION = 0.75
LOOSER_TOLERANCE = 0.03
"""A looser SLO may cost this share more accelerator-hours (noise: another run's burst timing)."""
WORKLOAD_VERSION = 1
"""Bumped when the workload construction changes (it is part of every result's key)."""


@dataclass(frozen=True)
class Case:
    """One drawn workload and its setup."""

    id: str
    trace: str
    kind: str
    time_scale: float
    volume: float
    pool_size: float
    """The busier pool's mean replicas at 75 % utilisation (what `volume` was set for)."""
    model: str
    pair: str
    prefill_tp: int
    decode_tp: int
    ttft_ms: float
    itl_ms: float
    percentile: float
    startup_s: float
    diurnal: float | None
    seed: int

    @property
    def duration_s(self) -> float:
        return 86400.0 if self.kind == "day" else 3600.0

    @property
    def dt(self) -> float:
        return 0.5 if self.kind == "day" else 0.2

    def label(self) -> str:
        return (f"{self.id} {self.trace.split('.')[0]} {self.kind} x{self.time_scale:g} v{self.volume:.2f} "
                f"{self.model} {self.pair} TP{self.prefill_tp}/{self.decode_tp} TTFT {self.ttft_ms:g}ms "
                f"ITL {self.itl_ms:g}ms p{self.percentile:g} start {self.startup_s:g}s")


def _traces() -> dict[str, Workload]:
    return {name: read_trace(TRACES / name) for name in TRACE_FILES}


def _smallest_tp(model_name: str, accelerator: str) -> int | None:
    model = builtin_model(model_name)
    for tp in (1, 2, 4, 8):
        if kv_capacity_tokens(model, DEFAULT_CATALOG[accelerator], tp) >= MIN_KV_TOKENS:
            return tp
    return None


def pool_needs(case: Case, trace: Workload, rate: float) -> dict[str, float] | None:
    """Mean replicas each pool needs at `rate` requests/s of this trace's sizes (75 % utilisation)."""
    model = builtin_model(case.model)
    prefill_acc, decode_acc = (DEFAULT_CATALOG[name] for name in PAIRS[case.pair])
    isl = float(trace.prompt_tokens.mean())
    osl = float(trace.output_tokens.mean())
    prefill_tps = prefill_tokens_per_s(model, prefill_acc, case.prefill_tp, isl)
    decode_tps = decode_tokens_per_s(model, decode_acc, case.decode_tp, isl + osl / 2, case.itl_ms / 1000 * 0.85,
                                     reserved_tokens=isl + osl)
    if decode_tps <= 0:
        return None
    return {"prefill": rate * isl / (prefill_tps * UTILISATION), "decode": rate * osl / (decode_tps * UTILISATION)}


def _limits(case: Case) -> Any:
    model = builtin_model(case.model)
    prefill_acc, decode_acc = (DEFAULT_CATALOG[name] for name in PAIRS[case.pair])
    return reach(model, Phase(prefill_acc, case.prefill_tp), Phase(decode_acc, case.decode_tp),
                 ttft_s=case.ttft_ms / 1000, itl_s=case.itl_ms / 1000, batch_overhead_s=0.01)


def _draw_one(index: int, seed: int, traces: dict[str, Workload]) -> Case:
    rng = np.random.default_rng([seed, index])
    trace_name = TRACE_FILES[index % len(TRACE_FILES)]
    trace = traces[trace_name]
    kind = "day" if index % 8 == 7 else "hour"
    for _ in range(1000):
        model = str(rng.choice(MODELS))
        pair = str(rng.choice(list(PAIRS)))
        tps = [_smallest_tp(model, accelerator) for accelerator in PAIRS[pair]]
        doubled = [rng.random() < 0.3 for _ in tps]
        percentile = float(rng.choice([90.0, 99.0]))
        ttft_ms = float(round(math.exp(rng.uniform(math.log(300), math.log(5000))) / 10) * 10)
        itl_ms = float(round(rng.uniform(20, 100)))
        startup_s = float(round(math.exp(rng.uniform(math.log(30), math.log(300))) / 10) * 10)
        pool_size = float(math.exp(rng.uniform(0.0, math.log(30))))
        time_scale = float(round(rng.uniform(0.5, 4.0), 2))
        fitting = [tp for tp in tps if tp is not None]
        if len(fitting) < 2:
            continue
        prefill_tp, decode_tp = (min(8, tp * 2) if twice else tp for tp, twice in zip(fitting, doubled, strict=True))
        case = Case(
            f"g{index:02d}", trace_name, kind, time_scale, 1.0, pool_size, model, pair, prefill_tp, decode_tp,
            ttft_ms, itl_ms, percentile, startup_s, (10.0 if "code" in trace_name else 5.0) if kind == "day" else None,
            seed,
        )
        needs = pool_needs(case, trace, trace.mean_rate() * time_scale)
        if needs is None:
            continue
        volume = pool_size / max(needs.values())
        rate = trace.mean_rate() * time_scale * volume * (0.6 if kind == "day" else 1.0)
        if rate > MAX_RATE[kind] or volume < 0.05:
            continue
        limits = out_of_reach(_limits(case), trace.prompt_tokens, trace.output_tokens)
        if float(limits.any.mean()) > MAX_OUT_OF_REACH:
            continue
        return replace(case, volume=round(volume, 3))
    raise RuntimeError(f"workload {index}: no feasible draw in 1000 attempts")


def draw_cases(count: int, seed: int) -> list[Case]:
    """The benchmark's workloads: the same for the same count and seed."""
    traces = _traces()
    return [_draw_one(index, seed, traces) for index in range(count)]


def superpose(trace: Workload, volume: float, rng: np.random.Generator) -> Workload:
    """`volume` times the trace's traffic: whole copies shifted in time (circularly), plus a thinned one."""
    span = trace.duration_s
    parts: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    copies = math.floor(volume)
    for copy in range(copies + 1):
        keep = np.ones(trace.requests, dtype=bool) if copy < copies else rng.random(trace.requests) < volume - copies
        offset = rng.uniform(0.0, span) if copy > 0 or copies == 0 else 0.0
        parts.append(((trace.arrivals[keep] + offset) % span, trace.prompt_tokens[keep], trace.output_tokens[keep]))
    arrivals = np.concatenate([p[0] for p in parts])
    order = np.argsort(arrivals, kind="stable")
    return Workload(trace.name, arrivals[order], np.concatenate([p[1] for p in parts])[order],
                    np.concatenate([p[2] for p in parts])[order], span)


def build_case(case: Case, trace: Workload) -> tuple[SimSetup, Workload, Workload]:
    """The setup, the workload with its warm-up, and the measured workload."""
    rng = np.random.default_rng([case.seed, int(case.id[1:]), WORKLOAD_VERSION])
    traffic = superpose(trace, case.volume, rng)
    measured = build_workload(traffic, time_scale=case.time_scale, diurnal=case.diurnal,
                              duration_s=None if case.diurnal else case.duration_s, seed=case.seed)
    prefill_acc, decode_acc = (DEFAULT_CATALOG[name] for name in PAIRS[case.pair])
    setup = SimSetup(
        model=builtin_model(case.model),
        prefill=PoolSetup(prefill_acc, case.prefill_tp, 1, 1, POOL_MAX),
        decode=PoolSetup(decode_acc, case.decode_tp, 1, 1, POOL_MAX),
        ttft_s=case.ttft_ms / 1000, itl_s=case.itl_ms / 1000, percentile=case.percentile,
        startup_s=case.startup_s, dt=case.dt, warmup_s=WARMUP_S,
    )
    workload = with_warmup(measured, WARMUP_S)
    return initial_replicas(setup, workload), workload, measured


def looser(case: Case) -> Case:
    """The same workload with a looser SLO: TTFT x2, ITL x1.5 or percentile 99 -> 90, in turn."""
    turn = int(case.id[1:]) % 3
    if turn == 2 and case.percentile == 99.0:
        return replace(case, percentile=90.0)
    if turn == 1:
        return replace(case, itl_ms=min(case.itl_ms * 1.5, 150.0))
    return replace(case, ttft_ms=case.ttft_ms * 2)


# --- the units of work --------------------------------------------------------------------------------

_POLICY_FILES = ("operator/disagg/scaling", "operator/disagg/sim/controllers.py", "operator/disagg/api/v1alpha1.py")
_SIM_FILES = (
    "operator/disagg/sim/engine.py", "operator/disagg/sim/baselines.py", "operator/disagg/sim/runner.py",
    "operator/disagg/capacity/roofline.py", "operator/disagg/capacity/sizing.py", "operator/disagg/capacity/models.py",
    "operator/disagg/capacity/traces.py", "operator/disagg/catalog/accelerators.yaml",
)


@functools.cache
def _fingerprint(paths: tuple[str, ...]) -> str:
    """A hash of these files as they were when first asked (a run keeps its keys while files change)."""
    digest = hashlib.sha256()
    for name in paths:
        path = ROOT / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Unit:
    """One simulation (or search) of one workload."""

    case: Case
    role: str
    """`disagg`, `static-best`, a peer, `looser` (ours on the looser SLO) or `maxcheck` (ours, lower maxima)."""
    maxima: tuple[int, int] | None = None

    def key(self) -> str:
        files = _SIM_FILES + (_POLICY_FILES if self.role in ("disagg", "looser", "maxcheck") else ())
        text = json.dumps([asdict(self.case), self.role, self.maxima, WORKLOAD_VERSION, WARMUP_S, POOL_MAX,
                           _fingerprint(files)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, cache: Path) -> Path:
        return cache / f"{self.case.id}-{self.role}-{self.key()}.json"

    def cost(self) -> float:
        """Relative expected wall time (longest first, so that workers finish together)."""
        runs = 15.0 if self.role == "static-best" else 1.0
        return runs * (24.0 if self.case.kind == "day" else 1.0) * self.case.pool_size


def _row(result: SimResult, reachable: float) -> dict[str, Any]:
    row = result.summary()
    row["attainment_in_reach"] = round(result.attainment() / reachable, 5) if reachable > 0 else math.nan
    return row


def _replay_static(setup: SimSetup, workload: Workload, hint: dict[str, Any], target: float,
                   requests: int) -> tuple[dict[str, int], SimResult] | None:
    """static-best's allocation found by an earlier search of the same workload (the simulator has
    changed since: its key differs), run again; None when it no longer reaches the target."""
    if hint.get("case") is None and hint["row"]["requests"] != requests:
        return None
    counts = hint["counts"]
    result = run_static(setup, workload, counts)
    if result.attainment() < target:
        return None
    result.policy = "static-best"
    return counts, result


def run_unit(unit: Unit, hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """One unit's result (a row of `SimResult.summary()` and what the verdicts need); `hint`: an
    earlier static-best result of the same workload, whose allocation is tried before a new search."""
    started = time.perf_counter()
    case = looser(unit.case) if unit.role == "looser" else unit.case
    trace = read_trace(TRACES / case.trace)
    setup, workload, measured = build_case(case, trace)
    reachable = 1.0 - float(out_of_reach(_limits(case), measured.prompt_tokens, measured.output_tokens).any.mean())
    target = case.percentile / 100.0
    out: dict[str, Any] = {"role": unit.role, "case": asdict(unit.case)}
    if unit.role == "static-best":
        found = _replay_static(setup, workload, hint, target * reachable, measured.requests) if hint else None
        counts, result = found or find_static_best(setup, workload, target=target * reachable,
                                                   start=peak_replicas(setup, workload))
        out["counts"] = counts
        out["searched"] = found is None
    else:
        if unit.maxima is not None:
            setup = replace(setup, prefill=replace(setup.prefill, max_replicas=unit.maxima[0]),
                            decode=replace(setup.decode, max_replicas=unit.maxima[1]))
            setup = replace(setup, prefill=replace(setup.prefill, initial_replicas=min(
                setup.prefill.initial_replicas, unit.maxima[0])), decode=replace(setup.decode, initial_replicas=min(
                    setup.decode.initial_replicas, unit.maxima[1])))
        result = run_policy("disagg" if unit.role in ("looser", "maxcheck") else unit.role, setup, workload,
                            DEFAULT_CATALOG)
    out["row"] = _row(result, reachable)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def _maxima(case: Case, trace: Workload) -> tuple[int, int]:
    needs = pool_needs(case, trace, trace.mean_rate() * case.time_scale * case.volume)
    assert needs is not None
    return max(4, math.ceil(2 * needs["prefill"])), max(4, math.ceil(2 * needs["decode"]))


def units_of(case: Case, trace: Workload) -> list[Unit]:
    """What one workload needs run."""
    units = [Unit(case, "static-best"), Unit(case, "disagg"), *(Unit(case, peer) for peer in PEERS)]
    if case.kind == "hour":
        units.append(Unit(case, "looser"))
    limits = out_of_reach(_limits(case), trace.prompt_tokens, trace.output_tokens)
    if float(limits.any.mean()) > 0.001:
        units.append(Unit(case, "maxcheck", _maxima(case, trace)))
    return units


def _claim(path: Path) -> bool:
    """Take the lock of a result (False when a live process holds it)."""
    lock = path.with_suffix(".lock")
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            holder = int(lock.read_text() or "0")
            os.kill(holder, 0)
            return False
        except (ValueError, ProcessLookupError, FileNotFoundError):
            lock.unlink(missing_ok=True)  # its process is gone
            return _claim(path)
        except PermissionError:
            return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def _hint(unit: Unit, cache: Path) -> dict[str, Any] | None:
    """The newest earlier static-best result of this workload (under another code fingerprint)."""
    if unit.role != "static-best":
        return None
    for path in sorted(cache.glob(f"{unit.case.id}-static-best-*.json"), key=lambda p: -p.stat().st_mtime):
        earlier: dict[str, Any] = json.loads(path.read_text())
        if earlier.get("case", asdict(unit.case)) == asdict(unit.case) and "counts" in earlier:
            return earlier
    return None


def _work(unit: Unit, path: Path, hint: dict[str, Any] | None) -> tuple[Unit, dict[str, Any] | None]:
    if path.exists():
        return unit, json.loads(path.read_text())
    if not _claim(path):
        return unit, None
    try:
        result = run_unit(unit, hint)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(result))
        os.replace(temporary, path)
        return unit, result
    finally:
        path.with_suffix(".lock").unlink(missing_ok=True)


def run_all(units: list[Unit], cache: Path, jobs: int) -> Iterator[tuple[Unit, dict[str, Any] | None]]:
    """Every unit's result, computing what the cache lacks (longest first), with progress on stderr."""
    cache.mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if not u.path(cache).exists()]
    for unit in units:
        if unit.path(cache).exists():
            yield unit, json.loads(unit.path(cache).read_text())
    todo.sort(key=lambda u: -u.cost())
    total_cost = sum(u.cost() for u in todo) or 1.0
    done_cost = 0.0
    started = time.perf_counter()
    print(f"{len(units) - len(todo)} results cached, {len(todo)} to compute with {jobs} jobs", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending: set[Future[tuple[Unit, dict[str, Any] | None]]] = {
            pool.submit(_work, u, u.path(cache), _hint(u, cache)) for u in todo
        }
        finished = 0
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                unit, result = future.result()
                finished += 1
                done_cost += unit.cost()
                elapsed = time.perf_counter() - started
                left = elapsed * (total_cost - done_cost) / done_cost if done_cost else math.nan
                state = "held by another run" if result is None else f"{result['wall_s']:.0f} s"
                print(f"[{finished}/{len(todo)}] {unit.case.id} {unit.role}: {state} "
                      f"(elapsed {elapsed / 60:.1f} min, about {left / 60:.0f} min left)", file=sys.stderr, flush=True)
                yield unit, result


# --- verdicts -----------------------------------------------------------------------------------------

def follower_bound(case: Case, static_counts: dict[str, int]) -> float:
    """A day's perfect follower as a share of static-best's accelerator-hours: every minute the smallest
    whole number of replicas (at least one) in proportion to the daily curve, from static-best's pools at
    the peak; no delay, no headroom."""
    assert case.diurnal is not None
    per_replica = {"prefill": case.prefill_tp, "decode": case.decode_tp}
    curve = diurnal_curve(np.arange(30.0, 86400.0, 60.0), case.diurnal)
    followed = sum(per_replica[r] * np.maximum(1.0, np.ceil(static_counts[r] * curve - 1e-9)).mean()
                   for r in per_replica)
    held = sum(per_replica[r] * static_counts[r] for r in per_replica)
    return float(followed / held)


def judge(case: Case, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The targets of issue 22 for one workload."""
    verdict: dict[str, Any] = {}
    ours, static = results.get("disagg"), results.get("static-best")
    if ours is None or static is None:
        return {"complete": False}
    target = case.percentile / 100.0
    ours_row, static_row = ours["row"], static["row"]
    verdict["target"] = target
    verdict["static_reaches"] = static_row["attainment_in_reach"] >= target - 1e-9
    verdict["ours_reaches"] = ours_row["attainment_in_reach"] >= target - 1e-9
    verdict["points_below"] = round(max(0.0, target - ours_row["attainment_in_reach"]) * 100, 3)
    ratio = ours_row["accelerator_hours"]["total"] / static_row["accelerator_hours"]["total"]
    verdict["hours_ratio"] = round(ratio, 4)
    if case.kind == "day":
        bound = follower_bound(case, static["counts"])
        verdict["follower_bound"] = round(bound, 4)
        verdict["over_bound"] = round(ratio / bound, 4)
    if "looser" in results:
        loose = results["looser"]["row"]["accelerator_hours"]["total"]
        tight = ours_row["accelerator_hours"]["total"]
        verdict["looser_ratio"] = round(loose / tight, 4)
        verdict["monotonic"] = loose <= tight * (1 + LOOSER_TOLERANCE)
    if "maxcheck" in results:
        low = results["maxcheck"]["row"]
        gained = ours_row["attainment_in_reach"] - low["attainment_in_reach"]
        more = ours_row["accelerator_hours"]["total"] / low["accelerator_hours"]["total"]
        verdict["max_raised"] = {"hours_ratio": round(more, 4), "attainment_gain_points": round(gained * 100, 3)}
        verdict["max_ok"] = more <= 1 + LOOSER_TOLERANCE or gained > 0.001
    peers = [p for p in PEERS if p in results and results[p]["row"]["attainment_in_reach"] >= target - 1e-9]
    verdict["peers_reaching"] = peers
    verdict["complete"] = True
    return verdict


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q)) if values else math.nan


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's figures over every judged workload."""
    judged = [e for e in entries if e["verdict"].get("complete")]
    comparable = [e for e in judged if e["verdict"]["static_reaches"]]
    reached = [e for e in comparable if e["verdict"]["ours_reaches"]]
    hours = [e["verdict"]["hours_ratio"] for e in judged if e["case"]["kind"] == "hour"]
    days = [e["verdict"]["over_bound"] for e in judged if e["case"]["kind"] == "day"]
    looser_ratios = [e["verdict"]["looser_ratio"] for e in judged if "looser_ratio" in e["verdict"]]
    return {
        "workloads": len(entries),
        "judged": len(judged),
        "static_reaches": len(comparable),
        "ours_reaches_where_static_does": len(reached),
        "share_reached": round(len(reached) / len(comparable), 4) if comparable else math.nan,
        "worst_points_below": max((e["verdict"]["points_below"] for e in comparable), default=0.0),
        "hour_hours_ratio": {"p50": round(_quantile(hours, 0.5), 3), "p90": round(_quantile(hours, 0.9), 3),
                             "max": round(max(hours, default=math.nan), 3), "count": len(hours)},
        "day_over_follower_bound": {"max": round(max(days, default=math.nan), 3), "count": len(days),
                                    "values": sorted(days)},
        "looser_costs_more": [e["case"]["id"] for e in judged if e["verdict"].get("monotonic") is False],
        "looser_ratio_max": round(max(looser_ratios, default=math.nan), 3),
        "max_raised_costs_more": [e["case"]["id"] for e in judged if e["verdict"].get("max_ok") is False],
    }


def failures(entries: list[dict[str, Any]]) -> list[str]:
    """Every workload that misses a target, with its parameters."""
    lines = []
    for entry in entries:
        verdict, case = entry["verdict"], Case(**entry["case"])
        if not verdict.get("complete"):
            continue
        misses = []
        if verdict["static_reaches"] and not verdict["ours_reaches"]:
            misses.append(f"attainment {verdict['points_below']:.2f} points below the target")
        if case.kind == "hour" and verdict["hours_ratio"] > 1.3:
            misses.append(f"{verdict['hours_ratio']:.2f}x static-best's hours (max 1.3x)")
        if case.kind == "day" and verdict["over_bound"] > 1.10:
            misses.append(f"{verdict['over_bound']:.2f}x the perfect follower (max 1.10x)")
        if verdict.get("monotonic") is False:
            misses.append(f"looser SLO costs {verdict['looser_ratio']:.2f}x")
        if verdict.get("max_ok") is False:
            misses.append(f"raising the maxima: {verdict['max_raised']}")
        if misses:
            lines.append(f"{case.label()}: {'; '.join(misses)}")
    return lines


def markdown(entries: list[dict[str, Any]]) -> str:
    """One row per workload."""
    lines = [
        "| id | trace | kind | rate x | pool | model | pair (TP) | TTFT / ITL / p | start-up | out of reach "
        "| ours: attain. / acc-h | static-best | ours / static | best peer reaching the target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        case, verdict, rows = Case(**entry["case"]), entry["verdict"], entry["rows"]
        if not verdict.get("complete"):
            continue

        def cell(role: str, rows: dict[str, Any] = rows) -> str:
            row = rows[role]
            return f"{row['attainment_in_reach']:.2%} / {row['accelerator_hours']['total']:.1f}"

        peers = verdict["peers_reaching"]
        best = min(peers, key=lambda p: rows[p]["accelerator_hours"]["total"]) if peers else None
        ratio = f"{verdict['hours_ratio']:.2f}x"
        if case.kind == "day":
            ratio += f" ({verdict['over_bound']:.2f}x bound)"
        ok = "FAIL" if any(line.startswith(case.id + " ") for line in failures([entry])) else "pass"
        if not verdict["static_reaches"]:
            ok += " (static-best misses the target)"
        lines.append(
            f"| {case.id} | {case.trace.split('.')[0]} | {case.kind} | {case.time_scale:g} | {case.pool_size:.1f} "
            f"| {case.model} | {case.pair} ({case.prefill_tp}/{case.decode_tp}) "
            f"| {case.ttft_ms / 1000:g} s / {case.itl_ms:g} ms / p{case.percentile:g} | {case.startup_s:g} s "
            f"| {entry['out_of_reach']['any']:.1%} | {cell('disagg')} | {cell('static-best')} | {ratio} "
            f"| {f'{best}: {cell(best)}' if best else 'none'} | {ok} |"
        )
    return "\n".join(lines)


def collect(cases: list[Case], results: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    traces = _traces()
    entries = []
    for case in cases:
        rows = {role: results[(case.id, role)] for role in
                ("disagg", "static-best", "looser", "maxcheck", *PEERS) if (case.id, role) in results}
        trace = traces[case.trace]
        _, _, measured = build_case(case, trace)
        shares = out_of_reach(_limits(case), measured.prompt_tokens, measured.output_tokens).shares()
        entries.append({
            "case": asdict(case),
            "requests": measured.requests,
            "mean_rate": round(measured.mean_rate(), 2),
            "out_of_reach": {k: round(v, 5) for k, v in shares.items()},
            "static_best": rows["static-best"]["counts"] if "static-best" in rows else None,
            "maxima_checked": list(_maxima(case, trace)) if "maxcheck" in rows else None,
            "rows": {role: result["row"] for role, result in rows.items()},
            "wall_s": {role: result["wall_s"] for role, result in rows.items()},
            "verdict": judge(case, rows),
        })
    return entries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated workload ids (g00, g01, ...)")
    parser.add_argument("--roles", default=None, help="comma-separated roles to compute (default: all)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--list", action="store_true", help="print the drawn workloads and exit")
    parser.add_argument("--report", action="store_true", help="compute nothing: report what the cache holds")
    args = parser.parse_args(argv)
    cases = draw_cases(args.count, args.seed)
    if args.only:
        cases = [c for c in cases if c.id in args.only.split(",")]
    if args.list:
        for case in cases:
            print(case.label(), f"pool {case.pool_size:.1f}")
        return 0
    traces = _traces()
    units = [u for case in cases for u in units_of(case, traces[case.trace])]
    if args.roles:
        units = [u for u in units if u.role in args.roles.split(",")]
    started = time.perf_counter()
    results: dict[tuple[str, str], dict[str, Any]] = {}
    if args.report:
        for unit in units:
            if unit.path(args.cache).exists():
                results[(unit.case.id, unit.role)] = json.loads(unit.path(args.cache).read_text())
    else:
        for unit, result in run_all(units, args.cache, args.jobs):
            if result is not None:
                results[(unit.case.id, unit.role)] = result
    entries = collect(cases, results)
    summary = summarise(entries)
    print(markdown(entries))
    print()
    print(json.dumps(summary, indent=1))
    print("\nfailures:")
    for line in failures(entries):
        print(f"- {line}")
    wall = time.perf_counter() - started
    print(f"\nwall time {wall / 60:.1f} min", file=sys.stderr)
    if not args.report or args.output != RESULTS:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"seed": args.seed, "summary": summary, "failures": failures(entries),
                                           "entries": entries}, indent=1))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
