#!/usr/bin/env python3
"""Reaction-time benchmark: how long from a load step to the Deployment's new replicas.

On the local cluster (hack/cluster.py, its real Prometheus scraping every 2 s) with the simulated engine
fleet and the real operator (its own process, under the shipped RBAC with a ServiceAccount token,
namespaced, isolated from other operators by the e2e session's admission policy: the rig of
tests/e2e/test_autoscaling.py). Services are examples/01-like (vLLM, prefill H100 TP2, decode H200 TP2,
both pools autoscaled from 1 replica) under the e2e test's workload: a steady load one replica per pool
serves at ~25 %, then a 4x step, which needs two replicas in each pool.

Steps are taken from a settled state only. Services come in waves: a wave's services are created
together and settle at the steady load (ScalingActive=True, no change for a while), then each is stepped
in turn, one at a time, and its pools' reactions are measured; the wave is then deleted and the next one
created (a fresh service has fresh policy memory, so every step starts from the same state).

For each step and pool:
- reaction: the step (the fleet's `applied_at_unix`) to the new `spec.replicas` seen by a Deployment watch
  of this process (the same clock);
- where it went: scrape (the step to the pool's first sample scraped after it, from Prometheus' raw
  samples), rate window (the first scrape to the decision, at most the rate window: the windowed rates
  are still filling with post-step samples, or the policy waits for a scrape interval the step filled
  enough to be told from noise), policy (the rest of the wait for the decision: the tick's
  phase, and any ticks whose signals already held the whole step but whose decision did not scale yet),
  write + watch (the decision, seen on the operator's `disagg_scaling_decisions_total` polled every
  0.1 s, to the watch event).
Target: p99 <= scrape interval + tick + 2 s. Prints a table and writes JSON (bench/results/reaction.json).

    .venv/bin/python bench/reaction.py                       # 12 steps, tick 2 s, rate window 8 s
    .venv/bin/python bench/reaction.py --tick 1 --rate-window 4s --out /tmp/reaction-fast.json
    .venv/bin/python bench/reaction.py --scrape-interval 1 --out bench/results/reaction-scrape1s.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import config as kconfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import support.autoscaling_rig as rig_lib  # noqa: E402  (the e2e rig, reused)
from disagg.scaling.signals import QuerySet  # noqa: E402
from support.operators import OperatorProcess, dump, isolate, remove_finalizers, wait_until  # noqa: E402

SCRAPE_INTERVAL_S = rig_lib.SCRAPE_INTERVAL_S
ROLES = rig_lib.ROLES
PROMETHEUS = "http://127.0.0.1:9090"


def log(message: str) -> None:
    print(f"==> [bench/reaction] {message}", file=sys.stderr, flush=True)


def cluster_cmd(*args: str) -> str:
    return subprocess.run([sys.executable, str(REPO / "hack" / "cluster.py"), *args], check=True,
                          capture_output=True, text=True, timeout=600).stdout


def prometheus(query: str, at: float) -> list[dict[str, Any]]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": query, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def first_scrape_after(namespace: str, service: str, role: str, since: float) -> float | None:
    """Timestamp of the first sample of the pool's pods that Prometheus scraped after `since`."""
    selector = f'{{namespace="{namespace}", disagg_service="{service}", disagg_role="{role}"}}'
    rows = prometheus(f"vllm:num_requests_running{selector}[30s]", since + 25.0)
    stamps = [float(ts) for row in rows for ts, _ in row.get("values", []) if float(ts) > since]
    return min(stamps) if stamps else None


# ----------------------------------------------------------------------------------------------------
# the operator's own counters, polled while a step is under way


def parse_metrics(text: str) -> dict[str, float]:
    """`name{k="v",...}` (labels sorted) -> value, for the few series the benchmark reads."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(("disagg_scaling_decisions_total", "disagg_autoscaler_ticks_total",
                                "disagg_prometheus_query_duration_seconds_sum",
                                "disagg_prometheus_query_duration_seconds_count")):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        pairs = sorted(re.findall(r'(\w+)="([^"]*)"', labels))
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
        out[key] = float(value)
    return out


@dataclass
class CounterPoller:
    """Polls the operator's /metrics every `interval` s; remembers when each series changed."""

    port: int
    interval: float = 0.1
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> CounterPoller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
                    values = parse_metrics(resp.read().decode())
                self.samples.append((time.time(), values))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def first_increase(self, key: str, since: float) -> float | None:
        """When `key` was first seen above its value at `since` (midpoint of the polling interval)."""
        base: float | None = None
        previous_at = since
        for at, values in self.samples:
            if at <= since:
                base = values.get(key, 0.0)
                previous_at = at
                continue
            if base is None:
                base = values.get(key, 0.0)
                previous_at = at
                continue
            if values.get(key, 0.0) > base:
                return (previous_at + at) / 2.0
            previous_at = at
        return None

    def increases_between(self, key: str, start: float, end: float) -> int:
        values = [v.get(key, 0.0) for at, v in self.samples if start <= at <= end]
        return int(values[-1] - values[0]) if len(values) >= 2 else 0

    def total(self, key: str) -> float:
        return self.samples[-1][1].get(key, 0.0) if self.samples else 0.0


def decision_key(role: str) -> str:
    return f'disagg_scaling_decisions_total{{direction="up",role="{role}"}}'


TICKS_KEY = 'disagg_autoscaler_ticks_total{queried="true"}'


# ----------------------------------------------------------------------------------------------------
# one step


@dataclass
class PoolReaction:
    role: str
    before: int
    first_to: int | None = None
    final: int | None = None
    decisions: int = 0
    reaction_s: float | None = None
    scrape_s: float | None = None
    rate_window_s: float | None = None
    policy_s: float | None = None
    write_watch_s: float | None = None
    ticks_waited: int | None = None
    """Ticks that ran after the signals held the whole step and before the one that scaled."""


@dataclass
class StepResult:
    index: int
    wave: int
    service: str
    from_rps: float
    to_rps: float
    applied_at_unix: float
    steady_for_s: float
    """How long the service had run at the steady load before the step (the policy's history)."""
    pools: dict[str, PoolReaction]
    note: str = ""


def scaled_up_since(watch: rig_lib.ReplicaWatch, since: float) -> bool:
    """Whether any pool of the watched service scaled up at or after `since`."""
    for role in ROLES:
        previous: int | None = None
        for at, replicas in watch.history(role):
            if at >= since and previous is not None and replicas > previous:
                return True
            previous = replicas
    return False


def measure_step(
    index: int, wave: int, namespace: str, service: str, fleet: rig_lib.FleetProcess, watch: rig_lib.ReplicaWatch,
    operator: OperatorProcess, workload: rig_lib.Workload, window_s: float, settle_after_s: float,
    others: list[rig_lib.ReplicaWatch], load_on: float, react_timeout_s: float,
) -> StepResult:
    before = {role: watch.current(role) or 0 for role in ROLES}
    poller = CounterPoller(operator.metrics_port).start()
    time.sleep(0.5)
    applied = fleet.put_load(namespace, service, {"rps": workload.step_rps})
    step_at = float(applied["applied_at_unix"])
    result = StepResult(index, wave, service, workload.steady_rps, workload.step_rps, step_at,
                        round(step_at - load_on, 1), {role: PoolReaction(role, before[role]) for role in ROLES})
    deadline = time.time() + react_timeout_s
    while time.time() < deadline:
        if all(watch.first_change_after(role, step_at) for role in ROLES):
            break
        time.sleep(0.2)
    last_change = max((c[0] for role in ROLES if (c := watch.first_change_after(role, step_at))), default=step_at)
    time.sleep(max(0.0, last_change + settle_after_s - time.time()))
    poller.stop()
    fleet.put_load(namespace, service, {"rps": workload.steady_rps})  # keep the fleet's work small
    noisy = [w.service for w in others if scaled_up_since(w, step_at - 1.0)]
    if noisy:
        result.note = f"other services scaled up meanwhile: {sorted(set(noisy))} (decision times may be theirs)"
    for role in ROLES:
        pool = result.pools[role]
        after = [(at, n) for at, n in watch.history(role) if at >= step_at]
        pool.decisions = len(after)
        pool.final = after[-1][1] if after else before[role]
        if not after:
            continue
        seen_at, pool.first_to = after[0]
        pool.reaction_s = seen_at - step_at
        scrape = first_scrape_after(namespace, service, role, step_at)
        decided = poller.first_increase(decision_key(role), step_at)
        if scrape is not None:
            pool.scrape_s = scrape - step_at
        if decided is not None and decided <= seen_at + 0.2:
            pool.write_watch_s = max(0.0, seen_at - decided)
            if scrape is not None:
                waited = max(0.0, decided - scrape)
                pool.rate_window_s = min(waited, window_s)
                pool.policy_s = max(0.0, waited - window_s)
                pool.ticks_waited = poller.increases_between(TICKS_KEY, scrape + window_s, decided) \
                    if waited > window_s else 0
    return result


# ----------------------------------------------------------------------------------------------------
# statistics and the report


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50_s": round(percentile(values, 50), 2),
        "p99_s": round(percentile(values, 99), 2),
        "max_s": round(max(values), 2) if values else math.nan,
        "mean_s": round(sum(values) / len(values), 2) if values else math.nan,
    }


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:5.1f}"


def report(steps: list[StepResult], config: dict[str, Any], target_s: float) -> dict[str, Any]:
    # a pool that did not scale within the step's wait counts as that wait (a lower bound: censored)
    censor = float(config["react_timeout_s"])

    def reaction(s: StepResult, role: str) -> float:
        value = s.pools[role].reaction_s
        return censor if value is None else value

    by_role = {role: [reaction(s, role) for s in steps] for role in ROLES}
    stats: dict[str, Any] = {role: summary(values) for role, values in by_role.items()}
    stats["all_scale_ups"] = summary([v for values in by_role.values() for v in values])
    stats["both_pools"] = summary([max(reaction(s, role) for role in ROLES) for s in steps])
    components: dict[str, Any] = {}
    for role in ROLES:
        pools = [s.pools[role] for s in steps]
        components[role] = {
            name: summary([getattr(p, name) for p in pools if getattr(p, name) is not None])
            for name in ("scrape_s", "rate_window_s", "policy_s", "write_watch_s")
        }
        components[role]["ticks_waited_mean"] = round(
            sum(p.ticks_waited or 0 for p in pools) / max(1, len(pools)), 2)
        components[role]["one_decision_steps"] = sum(1 for p in pools if p.decisions == 1)
    missed = [f"{s.service} {role}" for s in steps for role in ROLES if s.pools[role].reaction_s is None]

    print()
    print(f"Reaction time, load step ({config['workload']['steady_rps']} -> {config['workload']['step_rps']} "
          f"requests/s, 4x) to the Deployment's new spec.replicas; tick {config['tick_s']:g} s, rate window "
          f"{config['rate_window']}, scrape {config['scrape_interval_s']:g} s")
    print()
    header = (f"{'step':>4} {'service':<11} {'steady':>6} {'pool':<8} {'from':>4} {'to':>3} {'final':>5} {'react':>6} "
              f"{'scrape':>6} {'window':>6} {'policy':>6} {'write':>6} {'ticks':>5}")
    print(header)
    print("-" * len(header))
    print("(steady: seconds the service ran at the steady load before its step; the other columns in seconds: "
          "react = scrape + window + policy + write)")
    for s in steps:
        for role in ROLES:
            p = s.pools[role]
            print(f"{s.index:>4} {s.service:<11} {s.steady_for_s:>6.0f} {role:<8} {p.before:>4} "
                  f"{p.first_to or '-':>3} {p.final or '-':>5} {fmt(p.reaction_s):>6} {fmt(p.scrape_s):>6} "
                  f"{fmt(p.rate_window_s):>6} {fmt(p.policy_s):>6} "
                  f"{fmt(p.write_watch_s):>6} {p.ticks_waited if p.ticks_waited is not None else '-':>5}")
        if s.note:
            print(f"     note: {s.note}")
    print()
    print(f"{'':<16} {'n':>3} {'p50':>6} {'p99':>6} {'max':>6}   target p99 <= {target_s:g} s "
          f"(scrape {config['scrape_interval_s']:g} + tick {config['tick_s']:g} + 2)")
    for name in (*ROLES, "all_scale_ups", "both_pools"):
        st = stats[name]
        verdict = "meets" if st["n"] and st["p99_s"] <= target_s else "MISSES"
        print(f"{name:<16} {st['n']:>3} {st['p50_s']:>6.1f} {st['p99_s']:>6.1f} {st['max_s']:>6.1f}   {verdict}")
    print()
    print("Where the time goes (mean s per scale-up): scrape | rate window | policy (tick phase + ticks that held"
          " the whole step) | write + watch")
    for role in ROLES:
        c = components[role]
        print(f"  {role:<8} {c['scrape_s']['mean_s']:5.1f} | {c['rate_window_s']['mean_s']:5.1f} | "
              f"{c['policy_s']['mean_s']:5.1f} ({c['ticks_waited_mean']:.1f} ticks) | "
              f"{c['write_watch_s']['mean_s']:5.2f}   one decision in {c['one_decision_steps']}/{len(steps)} steps")
    if missed:
        print(f"no scale-up within {censor:g} s (counted as {censor:g} s): {missed}")
    return {
        "target_p99_s": target_s,
        "stats": stats,
        "components": components,
        "missed": missed,
        "meets_target": {name: bool(stats[name]["n"]) and stats[name]["p99_s"] <= target_s
                         for name in (*ROLES, "all_scale_ups", "both_pools")},
    }


# ----------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="scale-up steps in all (default 12)")
    parser.add_argument("--per-wave", type=int, default=4, help="services created, settled and stepped together")
    parser.add_argument("--tick", type=float, default=rig_lib.TICK_S, help="--autoscale-tick (default 2)")
    parser.add_argument("--scrape-interval", type=float, default=SCRAPE_INTERVAL_S,
                        help="seconds between scrapes of the engines (default: the cluster Prometheus' 2; others "
                             "through the fleet's per-target __scrape_interval__)")
    parser.add_argument("--rate-window", default=rig_lib.RATE_WINDOW,
                        help=f"--prometheus-rate-window (default {rig_lib.RATE_WINDOW})")
    parser.add_argument("--settle-min", type=float, default=45.0, help="seconds of steady load before any step")
    parser.add_argument("--settle-quiet", type=float, default=20.0, help="seconds without a change = settled")
    parser.add_argument("--hold", type=float, default=15.0,
                        help="seconds watched after a step's last first change (counts further decisions)")
    parser.add_argument("--react-timeout", type=float, default=120.0,
                        help="seconds a step waits for both pools; a pool that has not scaled by then counts as "
                             "this long (censored) in the statistics")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reaction.json"))
    args = parser.parse_args(argv)

    try:
        window_s = QuerySet(window=args.rate_window).window_seconds
    except ValueError as error:
        parser.error(f"--rate-window: {error}")
    target_s = args.scrape_interval + args.tick + 2.0
    status = subprocess.run([sys.executable, str(REPO / "hack" / "cluster.py"), "status"], capture_output=True,
                            text=True, timeout=120, check=False)
    if status.returncode != 0:
        print(f"the local cluster is not up (hack/cluster.py up):\n{status.stdout}{status.stderr}", file=sys.stderr)
        return 1
    kubeconfig = Path(re.findall(r"^export KUBECONFIG=(.+)$", cluster_cmd("env"), re.M)[-1])
    engines_file = kubeconfig.parent / "prometheus" / "engines.json"
    loader: Any = kconfig.new_client_from_config
    api: Any = loader(config_file=str(kubeconfig))
    workdir = Path(f"/tmp/disagg-bench-reaction-{secrets.token_hex(3)}")
    workdir.mkdir(parents=True)
    waves = math.ceil(args.steps / args.per_wave)
    flags = rig_lib.operator_flags(tick_s=args.tick, rate_window=args.rate_window,
                                   scale_down_window_s=120.0, staleness_s=15.0,
                                   scrape_interval_s=args.scrape_interval)
    config: dict[str, Any] = {
        "tick_s": args.tick, "rate_window": args.rate_window, "scrape_interval_s": args.scrape_interval,
        "operator_flags": list(flags), "steps": args.steps, "services_per_wave": args.per_wave,
        "settle_min_s": args.settle_min, "settle_quiet_s": args.settle_quiet, "react_timeout_s": args.react_timeout,
    }
    steps: list[StepResult] = []
    started = time.time()
    with rig_lib.rig(kubeconfig, engines_file, api, workdir, label="bench-reaction") as r:
        namespace = f"bench-reaction-{r.session}"
        r.kubectl("create", "namespace", namespace)
        operator = OperatorProcess("bench-reaction", (namespace,), r.operator_kubeconfig, workdir / "operator.log",
                                   300.0, extra_args=flags)
        fleet: rig_lib.FleetProcess | None = None
        watches: list[rig_lib.ReplicaWatch] = []
        try:
            isolate(r.kubectl, r.session, namespace)
            operator.start().wait_healthy(timeout=30)
            probe = rig_lib.autoscaled_service(namespace)
            workload = rig_lib.Workload.for_service(probe)
            config["workload"] = asdict(workload)
            fleet = rig_lib.FleetProcess.start(r, namespace, f"{workload.steady_rps:g}",
                                               prompt_tokens=workload.prompt_tokens,
                                               output_tokens=workload.output_tokens,
                                               scrape_interval=None if args.scrape_interval == SCRAPE_INTERVAL_S
                                               else f"{args.scrape_interval * 1000:.0f}ms")
            log(f"operator {' '.join(flags)}; workload {workload}; {waves} waves of {args.per_wave}")
            index = 0
            for wave in range(waves):
                count = min(args.per_wave, args.steps - index)
                names = [f"svc-w{wave}-{i}" for i in range(count)]
                manifests = []
                for name in names:
                    manifest = rig_lib.autoscaled_service(namespace)
                    manifest["metadata"]["name"] = name
                    manifests.append(manifest)
                r.kubectl("apply", "-f", "-", input=dump(manifests))
                watches = [rig_lib.ReplicaWatch(r.cluster.api, namespace, name).start() for name in names]

                def served(names: list[str] = names) -> bool:
                    assert fleet is not None
                    counts = {name: fleet.served(namespace, name) for name in names}
                    assert all(c == {"prefill": 1, "decode": 1} for c in counts.values()), counts
                    return True

                def diagnostics(watches: list[rig_lib.ReplicaWatch] = watches) -> str:
                    parts = [operator.log_tail(), fleet.log_tail() if fleet else ""]
                    parts += [w.describe() for w in watches]
                    parts.append(r.kubectl.text("-n", namespace, "get", "inferenceservices,deploy,pods", "-o", "wide"))
                    return "\n".join(parts)

                wait_until(served, 120, f"wave {wave}: the fleet to serve one pod per pool of each service",
                           diagnostics, interval=1.0)
                load_on = time.time()
                for watch in watches:
                    settled = rig_lib.settle(r.cluster, namespace, watch, load_on, args.settle_min, args.settle_quiet,
                                             args.settle_min + 120, diagnostics, service=watch.service,
                                             window_s=0.0)  # above 1/1 is logged below, not waited out
                    if settled != {"prefill": 1, "decode": 1}:
                        log(f"wave {wave}: {watch.service} settled at {settled}")
                log(f"wave {wave}: {count} services settled {time.time() - load_on:.0f}s after the steady load")
                for i, (name, watch) in enumerate(zip(names, watches, strict=True)):
                    others = [w for j, w in enumerate(watches) if j != i]
                    step = measure_step(index + 1, wave, namespace, name, fleet, watch, operator, workload, window_s,
                                        args.hold, others, load_on, args.react_timeout)
                    steps.append(step)
                    index += 1
                    log(f"step {index}/{args.steps} {name}: " + ", ".join(
                        f"{role} {p.before} -> {p.first_to} in {fmt(p.reaction_s).strip()}s"
                        for role, p in step.pools.items()))
                for watch in watches:
                    watch.stop()
                r.kubectl("-n", namespace, "delete", "inferenceservices", *names, "--wait=true", "--timeout=60s",
                          check=False, timeout=90)
                wait_until(lambda: not r.cluster.pods(namespace, "app.kubernetes.io/managed-by=disagg"), 60,
                           f"wave {wave}: its pods to go", diagnostics, interval=1.0)
        finally:
            for watch in watches:
                watch.stop()
            if fleet is not None:
                fleet.stop()
            query_sum = query_count = None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=3) as resp:
                    values = parse_metrics(resp.read().decode())
                query_sum = values.get("disagg_prometheus_query_duration_seconds_sum")
                query_count = values.get("disagg_prometheus_query_duration_seconds_count")
            except OSError:
                pass
            operator.stop()
            remove_finalizers(r.cluster, namespace)
            r.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    queries_per_tick = len(QuerySet().queries())
    if query_sum is not None and query_count:
        config["prometheus_query_mean_s"] = round(query_sum / query_count, 4)
        config["prometheus_queries_per_tick"] = queries_per_tick
    result = report(steps, config, target_s)
    if "prometheus_query_mean_s" in config:
        print(f"Prometheus: {queries_per_tick} queries per tick, {config['prometheus_query_mean_s'] * 1000:.0f} ms "
              f"each on average ({queries_per_tick * config['prometheus_query_mean_s']:.2f} s per tick)")
    out = {
        "benchmark": "reaction",
        "when_unix": round(started, 1),
        "duration_s": round(time.time() - started, 1),
        "host": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                 "python": platform.python_version()},
        "config": config,
        **result,
        "steps": [asdict(s) for s in steps],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.out} ({time.time() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
