"""Baseline autoscalers the simulator compares ours with, each after its public description (PEERS.md).

All of them see what ours sees: the same Prometheus-style signals (`LoadPicture`), delayed the same way,
and act through the same replica start-up delay. The simulator calls every controller every
`interval_s` (15 s, one scrape); controllers with a longer period of their own average what they saw in
between, as a PromQL `rate()` over their interval would.

Baselines that the peers configure from an offline profiling sweep (`dynamo-sla`) get the engines' true
performance curves (the simulator's own engine efficiency) rather than our roofline prior: profiling
measures the real engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from disagg.capacity.roofline import decode_step_seconds, decode_tokens_per_s, prefill_tokens_per_s
from disagg.capacity.sizing import size_decode, size_prefill
from disagg.scaling.policy import LoadPicture, PoolSignals
from disagg.sim.engine import Controller, PoolSetup, SimResult, SimSetup, simulate
from disagg.sim.traces import Workload

SCRAPE_S = 15.0


@dataclass
class StaticController:
    """A constant allocation: never scales."""

    counts: dict[str, int]
    name: str = "static"
    interval_s: float = 3600.0

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        return dict(self.counts)


@dataclass
class HPAController:
    """`hpa`: the Kubernetes HorizontalPodAutoscaler on one signal per pool (KServe's and KEDA's way).

    Reproduces the HPA algorithm: every 15 s, desired = ceil(current x metric / target) over ready pods,
    skipped within a 10 % tolerance; scale-up at most max(4 pods, 100 %) per sync (the default
    `behavior`); scale-down to the highest recommendation of the last 300 s (the default stabilisation
    window). The one signal per pool: decode on mean KV-cache usage (target 0.7, the llm-d KEDA guide's
    signal below its 0.8 threshold), prefill on queued prompt time per replica, as llm-d's guide does
    (in-flight prompt tokens / the per-replica prefill throughput), with a target of half the TTFT SLO.
    """

    setup: SimSetup
    name: str = "hpa"
    interval_s: float = SCRAPE_S
    tolerance: float = 0.1
    window_s: float = 300.0
    kv_target: float = 0.7
    history: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {"prefill": [], "decode": []})

    def _metric(self, role: str, signals: PoolSignals) -> tuple[float, float] | None:
        if role == "decode":
            if signals.kv_usage is None:
                return None
            return signals.kv_usage, self.kv_target
        if signals.mean_prompt_tokens is None or signals.ready_replicas <= 0:
            return None
        throughput = prefill_tokens_per_s(
            self.setup.model, self.setup.prefill.accelerator, self.setup.prefill.tensor_parallel,
            signals.mean_prompt_tokens, self.setup.engine,
        )
        in_flight = ((signals.waiting_requests or 0.0) + (signals.running_requests or 0.0)) * signals.mean_prompt_tokens
        return in_flight / signals.ready_replicas / throughput, self.setup.ttft_s / 2.0

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        desired = dict(current)
        if picture is None:
            return desired
        for role in ("prefill", "decode"):
            signals = picture.prefill if role == "prefill" else picture.decode
            if signals is None or signals.ready_replicas <= 0:
                continue
            measured = self._metric(role, signals)
            if measured is None:
                continue
            value, target = measured
            ratio = value / target
            pods = current[role]
            wanted = pods if abs(ratio - 1.0) <= self.tolerance else math.ceil(signals.ready_replicas * ratio)
            wanted = max(1, min(wanted, pods + max(4, pods)))
            history = [(t, n) for t, n in self.history[role] if now - t < self.window_s] + [(now, wanted)]
            self.history[role] = history
            desired[role] = wanted if wanted >= pods else min(pods, max(n for _, n in history))
        return desired


@dataclass
class _Averager:
    """Averages pictures over a controller's own period, like rate(metric[period])."""

    seen: list[LoadPicture] = field(default_factory=list)

    def add(self, picture: LoadPicture | None) -> None:
        if picture is not None:
            self.seen.append(picture)

    def mean(self, role: str, attribute: str) -> float | None:
        values: list[float] = []
        for picture in self.seen:
            signals = picture.prefill if role == "prefill" else picture.decode
            value = getattr(signals, attribute) if signals is not None else None
            if value is not None:
                values.append(float(value))
        return sum(values) / len(values) if values else None

    def clear(self) -> None:
        self.seen = []


@dataclass
class DynamoSLAController:
    """`dynamo-sla`: NVIDIA Dynamo's SLA planner (throughput-based), every 180 s.

    Reproduces its formulas: next load = the last interval's (the "constant" predictor); prefill replicas
    = ceil(prompt tokens/s x min(1, prefill correction) / per-replica prefill throughput at the mean ISL);
    decode replicas = ceil(output tokens/s / per-replica decode throughput at the ITL target divided by
    the decode correction, at context ISL + OSL/2). Corrections = observed / expected latency. The
    throughput curves are those an offline profiling sweep would measure (the simulated engine's own).
    """

    setup: SimSetup
    name: str = "dynamo-sla"
    interval_s: float = SCRAPE_S
    period_s: float = 180.0
    averager: _Averager = field(default_factory=_Averager)
    last_decision: float = 0.0
    last_desired: dict[str, int] = field(default_factory=dict)

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        self.averager.add(picture)
        if now - self.last_decision < self.period_s - 1e-9:
            return dict(self.last_desired or current)
        self.last_decision = now
        setup, avg = self.setup, self.averager
        rate = avg.mean("prefill", "request_rate")
        isl = avg.mean("prefill", "mean_prompt_tokens")
        osl = avg.mean("decode", "mean_output_tokens")
        self.averager.clear()
        if rate is None or isl is None or osl is None:
            self.last_desired = dict(current)
            return dict(current)
        prefill_tput = prefill_tokens_per_s(
            setup.model, setup.prefill.accelerator, setup.prefill.tensor_parallel, isl, setup.engine
        )
        expected_ttft = isl / prefill_tput
        observed_ttft = picture.prefill.ttft_s if picture is not None and picture.prefill is not None else None
        p_correction = (observed_ttft / expected_ttft) if observed_ttft else 1.0
        prefill = math.ceil(rate * isl * min(1.0, p_correction) / prefill_tput)
        context = isl + osl / 2.0
        d_correction = 1.0
        if picture is not None and picture.decode is not None and picture.decode.itl_s:
            decode_signals = picture.decode
            batch = (decode_signals.running_requests or 0.0) / max(decode_signals.ready_replicas, 1)
            expected_itl = decode_step_seconds(
                setup.model, setup.decode.accelerator, setup.decode.tensor_parallel, max(batch, 1.0), context,
                setup.engine,
            )
            d_correction = (decode_signals.itl_s or expected_itl) / expected_itl
        decode_tput = decode_tokens_per_s(
            setup.model, setup.decode.accelerator, setup.decode.tensor_parallel, context,
            setup.itl_s / max(d_correction, 1e-3), setup.engine, isl + osl,
        )
        decode = math.ceil(rate * osl / decode_tput) if decode_tput > 0 else setup.decode.max_replicas
        self.last_desired = {"prefill": max(1, prefill), "decode": max(1, decode)}
        return dict(self.last_desired)


@dataclass
class DynamoLoadController:
    """`dynamo-load`: Dynamo's load-based planner: +-1 replica per adjustment interval on thresholds.

    Reproduces: the interval's average decode KV-cache usage above 0.9 adds a decode replica, below 0.5
    removes one; the average prefill queue per replica above 5 adds a prefill replica, below 0.2 removes
    one; at most one replica per pool per interval, and no new decision while a change is still starting
    (the planner blocks during adjustments). The interval is a flag in Dynamo; 60 s here.
    """

    setup: SimSetup
    name: str = "dynamo-load"
    interval_s: float = SCRAPE_S
    period_s: float = 60.0
    averager: _Averager = field(default_factory=_Averager)
    last_decision: float = 0.0

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        self.averager.add(picture)
        if now - self.last_decision < self.period_s - 1e-9 or picture is None:
            return dict(current)
        pools = {"prefill": picture.prefill, "decode": picture.decode}
        if any(s is not None and s.ready_replicas < current[role] for role, s in pools.items()):
            return dict(current)  # still adjusting
        self.last_decision = now
        desired = dict(current)
        kv = self.averager.mean("decode", "kv_usage")
        queue = self.averager.mean("prefill", "waiting_requests")
        self.averager.clear()
        if kv is not None:
            desired["decode"] += 1 if kv > 0.9 else -1 if kv < 0.5 else 0
        if queue is not None:
            per_replica = queue / max(current["prefill"], 1)
            desired["prefill"] += 1 if per_replica > 5 else -1 if per_replica < 0.2 else 0
        return {role: max(1, n) for role, n in desired.items()}


@dataclass
class OracleController:
    """`oracle`: knows the future arrivals; still waits for start-up and decides every 15 s. A reference.

    Each tick it sizes both pools for the heaviest 30-s window of the coming start-up delay plus one tick
    (with the simulated engines' true performance and the same sizing as ours), so it has capacity in
    place when load arrives and drops it as soon as the coming load allows.
    """

    setup: SimSetup
    workload: Workload
    name: str = "oracle"
    interval_s: float = SCRAPE_S
    window_s: float = 30.0
    headroom: float = 0.1

    def _need(self, start: float, end: float) -> dict[str, int]:
        setup = self.setup
        need = {"prefill": 1, "decode": 1}
        t = start
        while t < end:
            part = self.workload.window(t, t + self.window_s)
            t += self.window_s / 2.0
            if part.requests == 0:
                continue
            rate = part.requests / self.window_s
            isl = float(part.prompt_tokens.mean())
            osl = float(part.output_tokens.mean())
            prefill = size_prefill(
                setup.model, setup.prefill.accelerator, setup.prefill.tensor_parallel,
                prompt_tokens_per_s=rate * isl, mean_prompt_tokens=isl,
                ttft_budget_s=setup.ttft_s * 0.85 - setup.itl_s, percentile=setup.percentile,
                headroom=self.headroom, max_replicas=setup.prefill.max_replicas, eff=setup.engine,
            )
            decode = size_decode(
                setup.model, setup.decode.accelerator, setup.decode.tensor_parallel,
                generation_tokens_per_s=rate * osl, concurrent_sequences=0.0, mean_prompt_tokens=isl,
                mean_output_tokens=osl, itl_target_s=setup.itl_s * 0.85, headroom=self.headroom,
                eff=setup.engine,
            )
            need["prefill"] = max(need["prefill"], prefill.replicas)
            need["decode"] = max(need["decode"], decode.replicas)
        return need

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        return self._need(now, now + self.setup.startup_s + self.interval_s + self.window_s)


def run_static(setup: SimSetup, workload: Workload, counts: dict[str, int]) -> SimResult:
    """The workload on a constant allocation of `counts` replicas (ready from the start)."""
    trial = replace(
        setup,
        prefill=_with_initial(setup.prefill, counts["prefill"]),
        decode=_with_initial(setup.decode, counts["decode"]),
    )
    return simulate(trial, workload, StaticController(dict(counts)))


def _smallest(first: int, test: Callable[[int], bool], high: int) -> int:
    """The smallest count passing `test` (monotone) up to `high`: exponential, then binary search."""
    low = 1
    probe = max(1, min(first, high))
    while not test(probe):
        low = probe + 1
        if probe >= high:
            return high
        probe = min(high, probe * 2)
    high_ok = probe
    while low < high_ok:
        mid = (low + high_ok) // 2
        if test(mid):
            high_ok = mid
        else:
            low = mid + 1
    return high_ok


def _trade(best: tuple[int, int], ok: Callable[[int, int], bool], setup: SimSetup) -> tuple[int, int]:
    """Trades between the pools while one is cheaper in accelerators and still reaches the target: one
    prefill replica fewer for one or two decode replicas more, and back (their misses share one
    allowance)."""
    per_p, per_d = setup.prefill.accelerators_per_replica, setup.decode.accelerators_per_replica
    max_p, max_d = setup.prefill.max_replicas, setup.decode.max_replicas

    def cost(pair: tuple[int, int]) -> int:
        return pair[0] * per_p + pair[1] * per_d

    improved = True
    while improved:
        improved = False
        p, d = best
        moves = [(p - 1, d), (p, d - 1), (p - 1, d + 1), (p - 1, d + 2), (p + 1, d - 1), (p + 1, d - 2)]
        for move in sorted(moves, key=cost):
            if cost(move) >= cost(best) or not (1 <= move[0] <= max_p and 1 <= move[1] <= max_d):
                continue
            if ok(*move):
                best, improved = move, True
                break
    return best


def find_static_best(
    setup: SimSetup,
    workload: Workload,
    *,
    target: float = 0.99,
    start: dict[str, int] | None = None,
    on_trial: Callable[[dict[str, int], SimResult], None] | None = None,
) -> tuple[dict[str, int], SimResult]:
    """`static-best`: the cheapest constant allocation reaching `target` attainment on this very workload.

    Found in hindsight by search: the fewest decode replicas that reach the target with prefill
    generously sized, then the fewest prefill replicas with that decode pool, then one more pass of each
    (the pools interact through the decode queue); then trades between the pools while that is cheaper
    in accelerators (`_trade`). When no allocation within the pools' maxima reaches the target, the
    maxima are returned.
    """
    cache: dict[tuple[int, int], SimResult] = {}

    def run(prefill: int, decode: int) -> SimResult:
        key = (prefill, decode)
        if key not in cache:
            cache[key] = run_static(setup, workload, {"prefill": prefill, "decode": decode})
            if on_trial is not None:
                on_trial({"prefill": prefill, "decode": decode}, cache[key])
        return cache[key]

    def ok(prefill: int, decode: int) -> bool:
        return run(prefill, decode).attainment() >= target

    guess = start or {"prefill": 4, "decode": 4}
    max_p, max_d = setup.prefill.max_replicas, setup.decode.max_replicas
    generous_p = min(max_p, max(3 * guess["prefill"], guess["prefill"] + 6))
    decode = _smallest(guess["decode"], lambda d: ok(generous_p, d), max_d)
    prefill = _smallest(guess["prefill"], lambda p: ok(p, decode), max_p)
    decode = _smallest(max(1, decode - 2), lambda d: ok(prefill, d), max_d)
    if not ok(prefill, decode):
        prefill = _smallest(prefill, lambda p: ok(p, decode), max_p)
    best = _trade((prefill, decode), ok, setup) if ok(prefill, decode) else (max_p, max_d)
    result = run(*best)
    result.policy = "static-best"
    return {"prefill": best[0], "decode": best[1]}, result


def _with_initial(pool: PoolSetup, replicas: int) -> PoolSetup:
    return replace(pool, initial_replicas=replicas)


def controller_for(name: str, setup: SimSetup, workload: Workload) -> Controller:
    """A baseline controller by name (not `static-best`, which is a search, nor `disagg`)."""
    factories: dict[str, Callable[[], Controller]] = {
        "hpa": lambda: HPAController(setup),
        "dynamo-sla": lambda: DynamoSLAController(setup),
        "dynamo-load": lambda: DynamoLoadController(setup),
        "oracle": lambda: OracleController(setup, workload),
    }
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; known: disagg, static-best, {', '.join(factories)}")
    return factories[name]()
