"""The autoscaling rig: an operator with fast autoscaler flags, the lab fleet, a client's load, and a
watch of the pools' replicas."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client as kclient

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import from_architecture
from disagg.capacity.roofline import DEFAULT_EFFICIENCY, prefill_seconds
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.kube.client import DEPLOYMENT, Kind, Kube
from disagg.kube.watch import KindWatch
from disagg.wellknown import SERVICE_LABEL
from disagg_lab.offered import base_load
from support.operators import (
    EXAMPLES,
    Cluster,
    E2ESession,
    Kubectl,
    bin_dir,
    condition,
    in_namespace,
    load_docs,
    operator_session,
    wait_until,
)
from support.paths import REPO, free_port

if TYPE_CHECKING:
    pass



SERVICE = "llama-70b"
ROLES = ("prefill", "decode")

TICK_S = 2.0
RATE_WINDOW = "8s"
"""Four scrape intervals: every window holds four samples of each pod, whose rates span 6 s."""
SCALE_DOWN_WINDOW_S = 45.0
STALENESS_S = 15.0
SCRAPE_INTERVAL_S = 2.0
"""The local Prometheus' scrape interval (hack/cluster.py)."""
STEP_FACTOR = 4.0


def operator_flags(tick_s: float = TICK_S, rate_window: str = RATE_WINDOW,
                   scale_down_window_s: float = SCALE_DOWN_WINDOW_S, staleness_s: float = STALENESS_S,
                   prometheus_url: str = "http://127.0.0.1:9090",
                   scrape_interval_s: float = SCRAPE_INTERVAL_S) -> tuple[str, ...]:
    return (
        "--prometheus-url", prometheus_url,
        "--autoscale-tick", f"{tick_s:g}",
        "--prometheus-rate-window", rate_window,
        "--scrape-interval", f"{scrape_interval_s:g}",
        "--scale-down-window", f"{scale_down_window_s:g}",
        "--metrics-staleness", f"{staleness_s:g}",
        "--prometheus-timeout", "2",
    )


@dataclass(frozen=True)
class Workload:
    """The offered load of the tests and of bench/reaction.py, in requests/s.

    512-token prompts and 640-token outputs, Poisson arrivals. The step is 1.02x what one prefill replica
    of examples/01 (H100 TP2, 44 ms per prompt) processes: one prefill replica cannot keep up, two run at
    half load, and the policy sizes two for any effective-load factor it may have fitted (1-2.5). Decode
    then generates ~15k tokens/s: two H200 TP2 replicas at the ITL target whatever the policy's
    correction (0.9-1.3), also during a +15 % catch-up. The steady load is a quarter of the step: one
    replica of each pool at ~25 %. With these sizes the prefill TTFT (~50-70 ms) stays inside vLLM's
    fine TTFT buckets; with 1024-token prompts it sits at the 0.1 s bucket bound and the interpolated
    p90 reads about twice the real one (0.19-0.22 s for ~0.1 s), which the policy's TTFT fit takes for
    queueing (before the fit's `min_gain` it drifted the effective load to x1.2-2.25 and prefill went to
    two replicas at a quarter of one's capacity).
    """

    prompt_tokens: int = 512
    output_tokens: int = 640
    step_rps: float = 0.0
    steady_rps: float = 0.0

    @classmethod
    def for_service(cls, manifest: dict[str, Any], factor: float = STEP_FACTOR, overload: float = 1.02) -> Workload:
        spec = InferenceServiceSpec.model_validate(manifest["spec"])
        assert spec.model.architecture is not None and spec.prefill.accelerator.type is not None
        model = from_architecture(spec.model.architecture, spec.model.name)
        accelerator = DEFAULT_CATALOG[spec.prefill.accelerator.type]
        base = cls()
        service = prefill_seconds(model, accelerator, spec.prefill.parallelism.tensor, base.prompt_tokens,
                                  DEFAULT_EFFICIENCY)
        step = overload / service
        return cls(base.prompt_tokens, base.output_tokens, round(step, 2), round(step / factor, 2))


@dataclass(frozen=True)
class Traffic:
    """The real client's load: 1024-token prompts, 64-token answers. On `traffic_service` one prefill replica
    holds ~3.8 requests/s within the 1-s TTFT target and one decode replica ~4.0 (its KV cache holds ~8
    sequences: the capacity model, as `disagg_lab.offered.base_load` sizes both); the step is 1.5x the
    smaller (~6 requests/s, ~370 streamed tokens/s: light for the client, the router and the engines on 2
    cores), the steady rate a quarter of the step."""

    prompt_tokens: int = 1024
    output_tokens: int = 64
    step_rps: float = 0.0
    steady_rps: float = 0.0

    @classmethod
    def for_service(cls, manifest: dict[str, Any], factor: float = STEP_FACTOR, overload: float = 1.5) -> Traffic:
        spec = InferenceServiceSpec.model_validate(manifest["spec"])
        base = cls()
        capacity = base_load(spec, DEFAULT_CATALOG, prompt_tokens=base.prompt_tokens,
                             output_tokens=base.output_tokens, share=1.0)
        step = overload * min(capacity.prefill_capacity_rps, capacity.decode_capacity_rps)
        return cls(base.prompt_tokens, base.output_tokens, round(step, 2), round(step / factor, 2))


def traffic_service(namespace: str, max_prefill: int = 8, max_decode: int = 16) -> dict[str, Any]:
    """examples/01 serving a 32.8B-parameter model in BF16 (Qwen3-32B's shape) on one H100 per worker with SLO
    1000 ms / 50 ms: its decode is bound by its KV cache (~9k tokens), so a few requests/s of real traffic
    load one replica of each pool. Both pools autoscaled from one replica; one router."""
    service = autoscaled_service(namespace, max_prefill, max_decode)
    spec = service["spec"]
    spec["model"] = {"name": "Qwen/Qwen3-32B", "uri": "hf://Qwen/Qwen3-32B",
                     "architecture": {"parameters": 32.8e9, "layers": 64, "kvHeads": 8, "headDim": 128}}
    # 50 ms: a bucket bound of vLLM's ITL histogram (with 40 ms the p90 of ~33-ms steps interpolates to ~47 ms)
    spec["slo"] = {"ttftMs": 1000, "itlMs": 50, "percentile": 90}
    for role in ROLES:
        spec[role]["accelerator"] = {"type": "nvidia-h100", "count": 1}
        spec[role]["parallelism"] = {"tensor": 1}
    return service


# ----------------------------------------------------------------------------------------------------
# the rig: an operator identity and isolation for this session, the fleet, a Deployment watch


@dataclass(frozen=True)
class Rig(E2ESession):
    admin_kubeconfig: Path
    engines_file: Path


@contextlib.contextmanager
def rig(admin_kubeconfig: Path, engines_file: Path, api: kclient.ApiClient, workdir: Path,
        label: str = "autoscale-e2e") -> Iterator[Rig]:
    """CRD, an operator identity with the shipped rules (session-specific names) and the isolation policy;
    all removed afterwards."""
    kubectl = Kubectl(bin_dir() / "kubectl", admin_kubeconfig)
    with operator_session(kubectl, Cluster(api), workdir, label) as session:
        yield session.extended(Rig, admin_kubeconfig=admin_kubeconfig, engines_file=engines_file)


def autoscaled_service(namespace: str, max_prefill: int = 8, max_decode: int = 16) -> dict[str, Any]:
    """examples/01 (vLLM, prefill on H100, decode on H200, both pools autoscaled) starting at one replica
    per pool, one router replica."""
    (example,) = [p for p in EXAMPLES if p.name.startswith("01-")]
    (service,) = [in_namespace(d, namespace) for d in load_docs(example) if d.get("kind") == "InferenceService"]
    spec = service["spec"]
    spec["router"]["replicas"] = 1
    spec["prefill"]["replicas"] = 1
    spec["decode"]["replicas"] = 1
    spec["prefill"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": max_prefill}
    spec["decode"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": max_decode}
    assert service["metadata"]["name"] == SERVICE
    return service


@dataclass
class FleetProcess:
    """One `disagg-lab fleet -n NS` process with its own control port (injected load: bench/reaction.py)."""

    proc: subprocess.Popen[bytes]
    control: str
    log_path: Path

    @classmethod
    def start(cls, rig: Rig, namespace: str, default_load: str, seed: int = 7,
              prompt_tokens: int | None = None, output_tokens: int | None = None,
              scrape_interval: str | None = None) -> FleetProcess:
        extra = ["--default-load", default_load]
        if prompt_tokens is not None:
            extra += ["--prompt-tokens", str(prompt_tokens)]
        if output_tokens is not None:
            extra += ["--output-tokens", str(output_tokens)]
        if scrape_interval is not None:
            extra += ["--scrape-interval", scrape_interval]
        return cls.launch(rig.admin_kubeconfig, rig.engines_file, rig.workdir / f"fleet-{namespace}.log", namespace,
                          extra, seed)

    @classmethod
    def launch(cls, kubeconfig: Path, engines_file: Path, log_path: Path, namespace: str, extra: list[str],
               seed: int = 7) -> FleetProcess:
        """The fleet of `namespace` with more flags (`extra`), once its control API answers."""
        port = free_port()
        cmd = [
            sys.executable, "-m", "disagg_lab.cli", "fleet", "--namespace", namespace,
            "--kubeconfig", str(kubeconfig), "--control-port", str(port),
            "--targets-file", str(engines_file), "--seed", str(seed), *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")}
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
        fleet = cls(proc, f"http://127.0.0.1:{port}", log_path)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"fleet exited with {proc.returncode}\n{fleet.log_tail()}")
            try:
                return bool(fleet.get("/healthz")["ok"])
            except (OSError, urllib.error.URLError):
                return False

        try:
            wait_until(healthy, 30, "the fleet's control API", fleet.log_tail)
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.control}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def put_load(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.control}/load/{namespace}/{name}", data=json.dumps(body).encode(),
                                         method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        assert result.get("known"), f"the fleet does not know {namespace}/{name} yet: {result}"
        return result

    def served(self, namespace: str, name: str) -> dict[str, int]:
        """Pods the fleet serves per role for one service."""
        counts = dict.fromkeys(ROLES, 0)
        for pod in self.get("/state").get("pods", []):
            if pod.get("namespace") == namespace and pod.get("service") == name and pod.get("role") in counts:
                counts[pod["role"]] += 1
        return counts

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- fleet log ({self.log_path}), last {len(text)} lines ---\n" + "\n".join(text)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@dataclass
class ReplicaWatch:
    """Watches a service's pool Deployments (the operator's own list-and-watch) and records every change of
    `spec.replicas` with the wall-clock time this process saw it (the same clock as the fleet's
    `applied_at_unix`)."""

    api: kclient.ApiClient
    namespace: str
    service: str
    changes: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {r: [] for r in ROLES})
    _watch: KindWatch | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _synced: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ReplicaWatch:
        self._watch = KindWatch(Kube(self.api), DEPLOYMENT, self.namespace, f"{SERVICE_LABEL}={self.service}",
                                self._listed, self._changed)
        self._watch.start()
        if not self._synced.wait(30):
            raise AssertionError(f"the Deployment watch of {self.namespace} did not sync (its errors are logged)")
        return self

    def _listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        now = time.time()
        for item in items:
            self._record(item, now)
        if last:
            self._synced.set()

    def _changed(self, kind: Kind, change: str, deployment: dict[str, Any]) -> None:
        if change in ("ADDED", "MODIFIED"):
            self._record(deployment, time.time())

    def _record(self, deployment: dict[str, Any], seen_at: float) -> None:
        role = deployment["metadata"]["name"].removeprefix(f"{self.service}-")
        if role not in self.changes:
            return
        replicas = int((deployment.get("spec") or {}).get("replicas") or 0)
        with self._lock:
            history = self.changes[role]
            if not history or history[-1][1] != replicas:
                history.append((seen_at, replicas))

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch.thread.join(timeout=15)

    def current(self, role: str) -> int | None:
        with self._lock:
            history = self.changes[role]
            return history[-1][1] if history else None

    def history(self, role: str) -> list[tuple[float, int]]:
        with self._lock:
            return list(self.changes[role])

    def first_change_after(self, role: str, since: float) -> tuple[float, int] | None:
        for at, replicas in self.history(role):
            if at >= since:
                return at, replicas
        return None

    def describe(self, since: float = 0.0) -> str:
        lines = []
        for role in ROLES:
            steps = ", ".join(f"{replicas}@{at - since:+.1f}s" for at, replicas in self.history(role))
            lines.append(f"{role}: {steps}")
        return "--- spec.replicas seen by the watch (time relative to the last step) ---\n" + "\n".join(lines)


def scaled_events(cluster: Cluster, namespace: str, name: str, since: float = 0.0) -> list[dict[str, Any]]:
    """`Scaled` Events of the service (last seen at or after `since`, whole seconds), oldest first, each with
    its pool, message, repeat count and time (unix seconds)."""
    events = cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},reason=Scaled").items
    out = []
    for event in events:
        stamp = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
        at = stamp.timestamp() if stamp is not None else 0.0
        if at < math.floor(since):
            continue
        message = event.message or ""
        out.append({"role": message.split(" ", 1)[0], "message": message, "count": int(event.count or 1), "at": at})
    out.sort(key=lambda e: float(e["at"]))
    return out


def pool_status(service: dict[str, Any] | None, role: str) -> dict[str, Any]:
    return dict(((service or {}).get("status") or {}).get(role) or {})


def deployment_replicas(cluster: Cluster, namespace: str, role: str) -> tuple[int, int] | None:
    """(spec.replicas, status.readyReplicas) of a pool's Deployment; None while there is none."""
    try:
        deployment = cluster.apps.read_namespaced_deployment(f"{SERVICE}-{role}", namespace)
    except kclient.ApiException as error:
        if error.status == 404:
            return None
        raise
    return int(deployment.spec.replicas or 0), int(deployment.status.ready_replicas or 0)


def settle(
    cluster: Cluster, namespace: str, watch: ReplicaWatch, since: float, min_age_s: float, quiet_s: float,
    timeout: float, diagnostics: Callable[[], str], service: str = SERVICE,
    window_s: float = SCALE_DOWN_WINDOW_S, want: dict[str, int] | None = None,
) -> dict[str, int]:
    """Waits until the autoscaler has had `min_age_s` of the load (counted from `since`), ScalingActive is
    True, neither pool's replicas changed for `quiet_s` with desiredReplicas equal to them, and neither
    pool's last scale-up is still inside the scale-down window `window_s` (a pool it raised is not
    settled before the window has let it come back down), and, with `want`, the pools are at those counts.
    Returns the settled replicas per pool.

    (Seen once in three local runs: 12 s after the steady load started, one 2-s scrape interval held
    about 32 requests where 12 were expected, and the policy sized decode for it as a step. Most likely the
    simulated fleet, starved on two cores, ran up to 2 s of its arrivals at once; not proven. The window
    takes such a step back.)"""

    def settled() -> dict[str, int] | None:
        now = time.time()
        assert now - since >= min_age_s, f"load on for {now - since:.0f}s of {min_age_s:.0f}s"
        svc = cluster.service(namespace, service)
        cond = condition(svc, "ScalingActive")
        assert cond is not None and cond["status"] == "True", f"{service}: ScalingActive {cond}"
        counts: dict[str, int] = {}
        for role in ROLES:
            history = watch.history(role)
            assert history, f"{service}: no {role} Deployment seen"
            at, replicas = history[-1]
            assert now - at >= quiet_s, (
                f"{service}: {role} changed to {replicas} {now - at:.0f}s ago (want {quiet_s:.0f}s quiet)")
            ups = [t for (t, n), (_, before) in zip(history[1:], history, strict=False) if n > before]
            assert not ups or now - ups[-1] >= window_s + 2 * TICK_S, (
                f"{service}: {role} went up {now - ups[-1]:.0f}s ago, inside the {window_s:g}s scale-down window")
            desired = pool_status(svc, role).get("desiredReplicas")
            assert desired == replicas, f"{service}: {role} desiredReplicas {desired}, spec.replicas {replicas}"
            counts[role] = replicas
        assert want is None or counts == want, f"{service}: settled at {counts} so far, waiting for {want}"
        return counts

    return wait_until(settled, timeout, "the pools to settle", diagnostics, interval=1.0)


def first_changes(watch: ReplicaWatch, since: float) -> dict[str, tuple[float, int]]:
    """Each pool's first spec.replicas change at or after `since` (pools without one are left out)."""
    out: dict[str, tuple[float, int]] = {}
    for role in ROLES:
        change = watch.first_change_after(role, since)
        if change is not None:
            out[role] = change
    return out


