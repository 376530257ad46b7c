"""e2e: the simulated engine fleet (`disagg-lab fleet`, with load injected through its control API)
on the local cluster, scraped by the real Prometheus through the file_sd targets file.

An operator of this test (the shipped RBAC rules under session-specific names, a TokenRequest kubeconfig,
and the session's admission policy from operator_support, so that another operator on the cluster cannot
write in the test namespace) creates the pools of an examples/01-like InferenceService; the fleet serves
each Ready pod on its own loopback IP. The test checks that Prometheus returns the engine's metrics for
every Ready pod with the right labels within 15 s, then steps the offered load through the fleet's
control API and checks that `rate(vllm:prompt_tokens_total[30s])` per pool matches it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client as kclient

from support.autoscaling_rig import FleetProcess
from support.operators import (
    EXAMPLES,
    Cluster,
    E2ESession,
    Kubectl,
    OperatorProcess,
    bin_dir,
    diagnose,
    dump,
    in_namespace,
    isolate,
    load_docs,
    operator_session,
    remove_finalizers,
    wait_until,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster

pytestmark = pytest.mark.e2e

SERVICE = "llama-70b"
RPS_BEFORE, RPS_AFTER = 4.0, 20.0
PROMPT_TOKENS, OUTPUT_TOKENS = 512, 128
RATE_TOLERANCE = 0.2
"""Relative tolerance of the measured prompt-token rate: Poisson arrivals over a 30 s window at 20
requests/s vary by ~4 % (one sigma); the mean of three overlapping windows is about as noisy."""
VISIBLE_WITHIN_S = 15.0


FleetEnv = E2ESession


@pytest.fixture(scope="module")
def fleet_env(
    cluster: LocalCluster, kube_api: kclient.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetEnv]:
    """CRD, an operator identity with the shipped rules (own names), and the isolation policy."""
    kubectl = Kubectl(bin_dir() / "kubectl", cluster.kubeconfig)
    with operator_session(kubectl, Cluster(kube_api), tmp_path_factory.mktemp("fleet-e2e"), "fleet-e2e") as session:
        yield session


def start_fleet(cluster: LocalCluster, namespace: str, workdir: Path) -> FleetProcess:
    return FleetProcess.launch(cluster.kubeconfig, cluster.engines_file, workdir / "fleet.log", namespace, [
        "--load", f"{namespace}/{SERVICE}={RPS_BEFORE:g}",
        "--prompt-tokens", str(PROMPT_TOKENS), "--output-tokens", str(OUTPUT_TOKENS),
    ])


def prometheus(cluster: LocalCluster, query: str) -> list[dict[str, Any]]:
    url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def ready_pods(env: FleetEnv, namespace: str) -> dict[str, str]:
    """name -> role of the service's Ready prefill/decode pods."""
    out: dict[str, str] = {}
    for pod in env.cluster.pods(namespace, f"disagg.dev/service={SERVICE}"):
        role = (pod.metadata.labels or {}).get("disagg.dev/role")
        conditions = {c.type: c.status for c in (pod.status.conditions or [])}
        if role in ("prefill", "decode") and conditions.get("Ready") == "True" and pod.status.pod_ip:
            out[pod.metadata.name] = role
    return out


def test_fleet_metrics_reach_prometheus_and_follow_the_offered_load(
    cluster: LocalCluster, fleet_env: FleetEnv, e2e_namespace: str
) -> None:
    env, ns = fleet_env, e2e_namespace
    # an earlier test may have stopped and restarted Prometheus: make sure every component is up
    cluster.up()
    isolate(env.kubectl, env.session, ns)
    operator = OperatorProcess("operator", (ns,), env.operator_kubeconfig, env.workdir / "operator.log", 5.0).start()
    fleet: FleetProcess | None = None

    def diagnostics() -> str:
        parts = [diagnose(env.kubectl, [ns], [operator])]
        if fleet is not None:
            parts.append(fleet.log_tail())
            try:
                parts.append("--- fleet /state ---\n" + json.dumps(fleet.get("/state"), indent=1)[:6000])
            except (OSError, urllib.error.URLError) as error:
                parts.append(f"fleet /state: {error}")
        return "\n".join(parts)

    try:
        operator.wait_healthy(timeout=30)
        (example,) = [p for p in EXAMPLES if p.name.startswith("01-")]
        (service,) = [in_namespace(d, ns) for d in load_docs(example) if d.get("kind") == "InferenceService"]
        service["spec"]["router"]["replicas"] = 1
        env.kubectl("apply", "-f", "-", input=dump([service]))
        expected = {role: int(service["spec"][role]["replicas"]) for role in ("prefill", "decode")}

        def pools_ready() -> dict[str, str] | None:
            pods = ready_pods(env, ns)
            counts = {role: sum(1 for r in pods.values() if r == role) for role in expected}
            assert counts == expected, f"ready pods {counts}, want {expected}"
            return pods

        wait_until(pools_ready, 90, "both pools' pods Ready", diagnostics)

        fleet = start_fleet(cluster, ns, env.workdir)

        def served() -> set[str] | None:
            pods = ready_pods(env, ns)
            state = fleet.get("/state") if fleet is not None else {}
            names = {p["pod"] for p in state.get("pods", [])}
            assert not state.get("not_served"), f"pods not served: {state.get('not_served')}"
            assert set(pods) <= names, f"Ready {sorted(pods)}, served {sorted(names)}"
            return names

        wait_until(served, 30, "the fleet to serve every Ready pod", diagnostics)
        served_at = time.monotonic()

        # every Ready pod's engine metrics, with its labels, through the real Prometheus
        def visible() -> dict[str, str] | None:
            pods = ready_pods(env, ns)
            series = prometheus(cluster, f'vllm:num_requests_running{{namespace="{ns}"}}')
            seen = {s["metric"]["pod"]: s["metric"] for s in series}
            assert set(pods) <= set(seen), f"Ready {sorted(pods)}, in Prometheus {sorted(seen)}"
            for name, role in pods.items():
                labels = seen[name]
                assert labels["disagg_service"] == SERVICE and labels["disagg_role"] == role, labels
                assert labels["namespace"] == ns and labels["model_name"] == service["spec"]["model"]["name"]
            return pods

        pods = wait_until(visible, 30, "vllm:num_requests_running of every Ready pod in Prometheus", diagnostics)
        visible_after = time.monotonic() - served_at
        assert visible_after <= VISIBLE_WITHIN_S, f"metrics took {visible_after:.1f}s to reach Prometheus"

        def families() -> set[tuple[str, str]] | None:
            rows = prometheus(cluster, f'count by (pod, __name__) ({{namespace="{ns}", __name__=~"vllm:.+"}})')
            have = {(r["metric"]["pod"], r["metric"]["__name__"]) for r in rows}
            for name in pods:
                for metric in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                               "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                               "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
                               "vllm:request_prefill_time_seconds_count"):
                    assert (name, metric) in have, (name, metric)
            return have

        wait_until(families, 20, "the other engine metrics of every pod", diagnostics)

        # a load step at a known time through the control API, then the measured rate per pool
        stepped = fleet.put_load(ns, SERVICE, {"rps": RPS_AFTER, "prompt_tokens": PROMPT_TOKENS,
                                               "output_tokens": OUTPUT_TOKENS})
        assert stepped["known"] and stepped["steps"] == [{"at_s": 0.0, "rps": RPS_AFTER}]
        assert abs(stepped["applied_at_unix"] - time.time()) < 5
        assert fleet.get("/load")[f"{ns}/{SERVICE}"]["rps_now"] == RPS_AFTER
        time.sleep(36)  # a full 30 s window after the step, plus scrape and file_sd latency
        query = (f'sum by (namespace, disagg_service, disagg_role) '
                 f'(rate(vllm:prompt_tokens_total{{namespace="{ns}"}}[30s]))')
        generation = (f'sum by (namespace, disagg_service, disagg_role) '
                      f'(rate(vllm:generation_tokens_total{{namespace="{ns}"}}[30s]))')
        samples: dict[str, list[float]] = {"prefill": [], "decode": []}
        decode_generation: list[float] = []
        for _ in range(3):
            for row in prometheus(cluster, query):
                assert row["metric"]["disagg_service"] == SERVICE and row["metric"]["namespace"] == ns
                samples[row["metric"]["disagg_role"]].append(float(row["value"][1]))
            for row in prometheus(cluster, generation):
                if row["metric"]["disagg_role"] == "decode":
                    decode_generation.append(float(row["value"][1]))
            time.sleep(5)
        offered = RPS_AFTER * PROMPT_TOKENS
        for role, values in samples.items():
            assert len(values) == 3, (role, samples, diagnostics())
            mean = sum(values) / len(values)
            assert abs(mean - offered) <= RATE_TOLERANCE * offered, (
                f"{role}: measured {mean:.0f} prompt tok/s (samples {values}), offered {offered:.0f} "
                f"(tolerance {RATE_TOLERANCE:.0%})"
            )
        mean_generation = sum(decode_generation) / max(len(decode_generation), 1)
        assert abs(mean_generation - RPS_AFTER * OUTPUT_TOKENS) <= 0.25 * RPS_AFTER * OUTPUT_TOKENS, decode_generation
        print(f"\nfleet e2e: {len(pods)} pods visible in Prometheus {visible_after:.1f}s after being served; "
              f"prompt tok/s offered {offered:.0f}, measured prefill {samples['prefill']}, decode {samples['decode']}; "
              f"decode generation tok/s {decode_generation} (offered {RPS_AFTER * OUTPUT_TOKENS:.0f})")

        # stopping the fleet takes its targets out of the file_sd file
        assert fleet.stop() == 0, fleet.log_tail()
        groups = json.loads(cluster.engines_file.read_text())
        assert not [g for g in groups if g.get("labels", {}).get("namespace") == ns], groups
    finally:
        if fleet is not None:
            fleet.stop()
        operator.stop()
        remove_finalizers(env.cluster, ns)
