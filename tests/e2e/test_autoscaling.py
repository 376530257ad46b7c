"""e2e: the operator's autoscaler on the local cluster, driven by real traffic: a real OpenAI client sends
requests to the service's endpoint, the real router sends them to the simulated engines
(`disagg-lab fleet`), and the real Prometheus scrapes the engines' metrics.

A namespace of this module holds an examples/01-like InferenceService (vLLM, prefill on H100 TP2, decode
on H100 TP2 with a 25 ms ITL target, both pools autoscaled from one replica: see `traffic_service`), its
own operator process (the shipped RBAC under session-specific names, a TokenRequest kubeconfig,
namespaced, `--prometheus-url` and short autoscaling settings: see `operator_flags`), its own engines and
the real vllm-router of its router pod (`disagg-lab routers`), and a background client
(`disagg_lab.load.BackgroundLoad`: the openai package, Poisson arrivals, through the Service's ready
endpoints). The session's admission policy (operator_support.isolation_policy) keeps any other operator
on the cluster from writing there.

The traffic is chosen so that the step's need is unambiguous (see `Traffic`): a steady rate one replica per
pool serves comfortably, then 4x that, 1.3x what one replica of either pool holds within the SLO by the
capacity model, which two replicas of each hold. The step is the client's rate change (its own clock).
The tests run in order on the same service:

(a) from the settled steady load, the client's 4x step: both pools scale up (the first `Scaled` Event per
    pool names the step from one replica; `status.<pool>.lastScale` says why), and no request fails; the
    reaction time from the client's rate change to each Deployment's new `spec.replicas` (seen by a watch)
    is measured and printed;
(b) back to the steady load: no pool scales down before the stabilisation window has passed since its
    last recommendation of the higher count, which comes no sooner than its scale-up (the step was sized
    for the upper end of its first interval; during (a)'s 25-s hold the replay may ask for less) and no
    later than the step down; then decode does.
(c) Prometheus stopped, and a change of load offered meanwhile (the 4x step when decode is back at one
    replica, else no load at all): the replicas hold, `ScalingActive=False` with reason
    `MetricsUnavailable`; Prometheus started again: `ScalingActive=True` and the change is acted on.
    Prometheus is shared with other tests: it is restarted in a `finally`.

The rig (identity and isolation, the fleet process, the Deployment watch, settling) is also what
bench/reaction.py runs on (with load injected into the fleet: `Workload`, `autoscaled_service`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client as kclient

from disagg_lab.load import BackgroundLoad, ServiceEndpoints
from support.operators import (
    LabProcesses,
    OperatorProcess,
    condition,
    diagnose,
    dump,
    is_ready,
    isolate,
    remove_finalizers,
    routers_ready,
    wait_until,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster
from support.autoscaling_rig import (
    RATE_WINDOW,
    ROLES,
    SCALE_DOWN_WINDOW_S,
    SCRAPE_INTERVAL_S,
    SERVICE,
    STEP_FACTOR,
    TICK_S,
    ReplicaWatch,
    Rig,
    Traffic,
    deployment_replicas,
    first_changes,
    operator_flags,
    pool_status,
    rig,
    scaled_events,
    settle,
    traffic_service,
)

pytestmark = pytest.mark.e2e


@dataclass
class Scenario:
    """One autoscaled service with its own operator, engines, router and client, settled at the steady load."""

    cluster: LocalCluster
    rig: Rig
    namespace: str
    operator: OperatorProcess
    workload: Traffic
    lab: LabProcesses | None = None
    traffic: BackgroundLoad | None = None
    endpoints: ServiceEndpoints | None = None
    watch: ReplicaWatch | None = None
    settled: dict[str, int] = field(default_factory=dict)
    step_at: float = 0.0
    results: dict[str, Any] = field(default_factory=dict)
    """What one test leaves for the next (they run in order on the same service)."""

    def service(self) -> dict[str, Any] | None:
        return self.rig.cluster.service(self.namespace, SERVICE)

    def load(self, rps: float) -> float:
        """Sets the client's rate; returns when it changed (unix seconds)."""
        assert self.traffic is not None
        return self.traffic.set_rate(rps)

    def failed_since(self, at: float) -> list[dict[str, Any]]:
        assert self.traffic is not None
        return [r.record() for r in self.traffic.since(at) if not r.ok]

    def current(self) -> dict[str, int | None]:
        assert self.watch is not None
        return {role: self.watch.current(role) for role in ROLES}

    def diagnostics(self) -> str:
        parts = [diagnose(self.rig.kubectl, [self.namespace], [self.operator])]
        if self.lab is not None:
            parts.append(self.lab.log_tail())
        if self.watch is not None:
            parts.append(self.watch.describe(self.step_at))
        try:
            events = scaled_events(self.rig.cluster, self.namespace, SERVICE)
            parts.append("--- Scaled Events ---\n" + "\n".join(f"x{e['count']} {e['message'][:500]}" for e in events))
        except kclient.ApiException as error:
            parts.append(f"Scaled Events: {error}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def autoscale_rig(
    cluster: LocalCluster, kube_api: kclient.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    with rig(cluster.kubeconfig, cluster.engines_file, kube_api, tmp_path_factory.mktemp("autoscale-e2e")) as r:
        yield r


SETTLE_MIN_S = 45.0
"""The steady load runs at least this long before the step (decode sequences live ~13 s, the policy's
fits want a few dozen ticks)."""
SETTLE_QUIET_S = 20.0
QUIET_AFTER_STEP_S = 12.0
OUTAGE_S = 20.0


@pytest.fixture(scope="module")
def scenario(cluster: LocalCluster, autoscale_rig: Rig) -> Iterator[Scenario]:
    r = autoscale_rig
    namespace = f"e2e-autoscaling-{secrets.token_hex(3)}"
    r.kubectl("create", "namespace", namespace)
    r.kubectl("label", "namespace", namespace, "e2e=true")
    manifest = traffic_service(namespace)
    s = Scenario(cluster, r, namespace,
                 OperatorProcess("autoscaler", (namespace,), r.operator_kubeconfig, r.workdir / "operator.log", 30.0,
                                 extra_args=operator_flags()),
                 Traffic.for_service(manifest))
    load_on = time.time()
    try:
        isolate(r.kubectl, r.session, namespace)
        s.operator.start().wait_healthy(timeout=30)
        r.kubectl("apply", "-f", "-", input=dump([manifest]))

        def ready_at_one() -> dict[str, Any] | None:
            svc = s.service()
            counts = {role: deployment_replicas(r.cluster, namespace, role) for role in ROLES}
            assert is_ready(svc) and counts == {"prefill": (1, 1), "decode": (1, 1)}, (
                f"Ready {condition(svc, 'Ready')}; (spec, ready) replicas {counts}")
            return svc

        wait_until(ready_at_one, 90, f"{SERVICE} Ready with one replica per pool", s.diagnostics)
        s.watch = ReplicaWatch(r.cluster.api, namespace, SERVICE).start()
        s.lab = LabProcesses(namespace, r.workdir, r.admin_kubeconfig, targets_file=r.engines_file).start()

        def serving() -> bool:
            assert s.lab is not None
            served = sorted(p["role"] for p in s.lab.pods(SERVICE))
            assert served == ["decode", "prefill"], f"the fleet serves {served}"
            routers = r.cluster.pods(namespace, f"disagg.dev/service={SERVICE},disagg.dev/role=router")
            assert routers_ready(routers), "the router is not started and Ready yet"
            return True

        wait_until(serving, 120, "the engines served and the router started and probed", s.diagnostics)
        s.endpoints = ServiceEndpoints(lambda: r.cluster.api, namespace, SERVICE).start()
        s.traffic = BackgroundLoad(s.endpoints, prompt_tokens=s.workload.prompt_tokens,
                                   output_tokens=s.workload.output_tokens, rate=s.workload.steady_rps, seed=7).start()
        load_on = time.time()
        # One pool of each at the steady load. A burst of the starting load (the lab's client on two busy
        # cores) can be sized for as a step; the pool then stays up while the prefill replay (5 minutes)
        # still holds the burst, so the wait allows for that replay to pass.
        s.settled = settle(r.cluster, namespace, s.watch, load_on, SETTLE_MIN_S, SETTLE_QUIET_S,
                           SETTLE_MIN_S + 2 * SCALE_DOWN_WINDOW_S + 300 + 60,
                           s.diagnostics, want={"prefill": 1, "decode": 1})
        blips = {role: [n for t, n in s.watch.history(role) if t >= load_on] for role in ROLES}
        print(f"\nautoscaling e2e: settled at {s.settled} {time.time() - load_on:.0f}s after the steady load "
              f"({s.workload.steady_rps:g} requests/s of {s.workload.prompt_tokens}+{s.workload.output_tokens} "
              f"tokens) started; changes on the way: {blips}")
        yield s
    finally:
        if s.watch is not None:
            s.watch.stop()
        if s.traffic is not None:
            s.traffic.stop()
            done = s.traffic.results
            bad = [x.record() for x in done if not x.ok]
            print(f"autoscaling e2e: the client sent {len(done)} requests, {len(bad)} failed: "
                  + "; ".join(f"{b['error']} at {b['sent_at'] - load_on:.0f}s" for b in bad[:5]))
        if s.endpoints is not None:
            s.endpoints.stop()
        if s.lab is not None:
            s.lab.stop()
        s.operator.stop()
        remove_finalizers(r.cluster, namespace)
        r.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_4x_step_in_the_clients_rate_scales_both_pools(scenario: Scenario) -> None:
    s = scenario
    assert s.watch is not None
    before = dict(s.settled)
    assert before == {"prefill": 1, "decode": 1}, f"the steady load settled at {before}\n{s.diagnostics()}"
    s.step_at = s.load(s.workload.step_rps)

    def both_up() -> dict[str, tuple[float, int]] | None:
        assert s.watch is not None
        first = first_changes(s.watch, s.step_at)
        assert set(first) == set(ROLES), f"first changes after the step: {first}"
        return first

    first = wait_until(both_up, 60, f"both pools to scale up after the {STEP_FACTOR:g}x step", s.diagnostics)
    reaction = {role: at - s.step_at for role, (at, _) in first.items()}
    print(f"autoscaling e2e: {STEP_FACTOR:g}x step ({s.workload.steady_rps:g} -> {s.workload.step_rps:g} requests/s) "
          "reaction, the client's rate change -> new Deployment spec.replicas seen by a watch: " + ", ".join(
              f"{role} {before[role]} -> {first[role][1]} in {reaction[role]:.1f}s" for role in ROLES)
          + f" (tick {TICK_S:g}s, rate window {RATE_WINDOW}, scrape {SCRAPE_INTERVAL_S:g}s)")
    for role in ROLES:
        assert first[role][1] > before[role], f"{role} did not scale up: {first[role]}\n{s.diagnostics()}"
    failed = s.failed_since(s.step_at)
    assert not failed, f"{len(failed)} of the client's requests failed after the step: {failed[:3]}"
    s.results["scaled_to"] = {role: first[role][1] for role in ROLES}
    s.results["reaction_s"] = reaction
    # real traffic is bursty (Poisson at a few requests/s) and the decode pool is bound by its KV cache: a pool
    # may take a second step up on a burst (one decision per pool for a step is measured with injected load
    # by bench/reaction.py); what must hold is that each pool went up for the step and says why
    events = scaled_events(s.rig.cluster, s.namespace, SERVICE, since=s.step_at)
    for role in ROLES:
        mine = [e for e in events if e["role"] == role]
        assert mine and mine[0]["message"].startswith(f"{role} {before[role]} -> {first[role][1]}:"), (
            f"{role}: Scaled Events since the step {mine}\n{s.diagnostics()}")
    def quiet() -> dict[str, int] | None:
        assert s.watch is not None
        now = time.time()
        for role in ROLES:
            at, _ = s.watch.history(role)[-1]
            assert now - at >= QUIET_AFTER_STEP_S, f"{role} changed {now - at:.0f}s ago"
        return {role: s.watch.history(role)[-1][1] for role in ROLES}

    # the next test starts from pools that stopped moving under the step's load
    s.results["scaled_to"] = wait_until(quiet, 90, "the pools to stop moving under the step", s.diagnostics)
    svc = s.service()  # status is written after the Deployment: read once the pools are quiet
    for role in ROLES:
        last = pool_status(svc, role).get("lastScale") or {}
        assert last.get("reason") and last.get("time") and int(last.get("to", 0)) > before[role], last


def test_b_scale_down_only_after_the_stabilisation_window(scenario: Scenario) -> None:
    s = scenario
    assert s.watch is not None
    if "scaled_to" not in s.results:
        pytest.fail("test (a) did not leave the pools scaled up")
    scaled_to = s.results["scaled_to"]
    s.step_at = s.load(s.workload.steady_rps)
    # The window counts from a pool's last recommendation of its scaled-up count: at the latest the load
    # going down, at the earliest the scale-up itself (25 s before; while the step's load lasts the
    # replay may already ask for less than the step's sizing did). A pool that skipped the window would
    # come down within a rate window of the load going down, well inside both.
    up_at = {role: max((at for at, _ in s.watch.history(role) if at < s.step_at), default=s.step_at)
             for role in ROLES}

    def decode_down() -> dict[str, tuple[float, int]] | None:
        assert s.watch is not None
        changes = first_changes(s.watch, s.step_at)
        early = {role: c for role, c in changes.items() if c[0] - up_at[role] < SCALE_DOWN_WINDOW_S}
        if early:  # fails at once, not at the timeout
            raise RuntimeError(f"scaled within the {SCALE_DOWN_WINDOW_S:g}s window after its scale-up: {early}")
        assert "decode" in changes, f"first changes after the step down: {changes}"
        return changes

    try:
        down = wait_until(decode_down, SCALE_DOWN_WINDOW_S + 40, "decode to scale down after the window",
                          s.diagnostics, interval=0.5)
    except RuntimeError as error:
        pytest.fail(f"{error}\n{s.diagnostics()}")
    for role, (at, replicas) in down.items():
        assert replicas < scaled_to[role], f"{role}: {scaled_to[role]} -> {replicas} is not down"
        assert at - up_at[role] >= SCALE_DOWN_WINDOW_S, f"{role} scaled down {at - up_at[role]:.1f}s after going up"
    print("autoscaling e2e: after the step down: " + ", ".join(
        f"{role} {scaled_to[role]} -> {down[role][1]} after {down[role][0] - s.step_at:.1f}s" if role in down
        else f"{role} holds {s.watch.current(role)} (its replay of the last 5 min still has the step)"
        for role in ROLES) + f" (window {SCALE_DOWN_WINDOW_S:g}s)")
    s.results["low"] = settle(s.rig.cluster, s.namespace, s.watch, s.step_at, SCALE_DOWN_WINDOW_S, 3 * TICK_S, 60,
                              s.diagnostics)


def test_c_prometheus_down_holds_and_says_so_then_scaling_resumes(scenario: Scenario) -> None:
    s = scenario
    assert s.watch is not None
    if "low" not in s.results:
        pytest.fail("test (b) did not leave decode scaled down")
    low = s.results["low"]
    cluster = s.cluster
    stopped = False

    def scaling_active() -> dict[str, Any] | None:
        return condition(s.service(), "ScalingActive")

    try:
        stopped = True
        cluster.prometheus_stop()
        outage_at = time.time()
        # the change offered during the outage: the 4x step from one decode replica; from more (real traffic
        # can leave decode above one after (b)), no load at all, which takes decode down once metrics return
        down = low["decode"] > 1
        s.step_at = s.load(0.0 if down else s.workload.step_rps)

        def unavailable() -> dict[str, Any] | None:
            cond = scaling_active()
            assert cond is not None and (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable"), cond
            return cond

        cond = wait_until(unavailable, 3 * TICK_S + 10, "ScalingActive=False reason MetricsUnavailable",
                          s.diagnostics)
        assert "Prometheus" in cond["message"], cond
        time.sleep(max(0.0, outage_at + OUTAGE_S - time.time()))  # well past the step's reaction time
        assert not first_changes(s.watch, outage_at), f"replicas changed while Prometheus was down\n{s.diagnostics()}"
        svc = s.service()
        for role in ROLES:
            assert pool_status(svc, role).get("desiredReplicas") == low[role], (role, pool_status(svc, role))
        assert unavailable()
        warned = s.rig.cluster.core.list_namespaced_event(
            s.namespace, field_selector=f"involvedObject.name={SERVICE},reason=MetricsUnavailable").items
        assert any(e.type == "Warning" for e in warned), warned
        held_for = time.time() - outage_at
        cluster.prometheus_start()
        stopped = False
        restarted_at = time.time()
    finally:
        if stopped:
            cluster.prometheus_start()

    def active() -> dict[str, Any] | None:
        cond = scaling_active()
        assert cond is not None and (cond["status"], cond["reason"]) == ("True", "MetricsAvailable"), cond
        return cond

    wait_until(active, 45, "ScalingActive=True after Prometheus is back", s.diagnostics)

    def resumed() -> dict[str, tuple[float, int]] | None:
        assert s.watch is not None
        changes = first_changes(s.watch, restarted_at)
        assert "decode" in changes, f"changes since Prometheus is back: {changes}"
        return changes

    up = wait_until(resumed, SCALE_DOWN_WINDOW_S + 30 if down else 45,
                    "the load offered during the outage to be acted on", s.diagnostics)
    for role, (_, replicas) in up.items():
        assert (replicas < low[role]) if down else (replicas > low[role]), (
            f"{role}: {low[role]} -> {replicas} after the restart")
    print(f"autoscaling e2e: Prometheus down {held_for:.0f}s: replicas held at {low}, ScalingActive=False "
          "MetricsUnavailable; back: " + ", ".join(
              f"{role} {low[role]} -> {n} {at - restarted_at:.1f}s after the restart" for role, (at, n) in up.items()))
