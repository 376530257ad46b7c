"""The operations rig: services under steady streaming load from the real client while something happens to
them (a scale-down, a rollout, a node drain, a killed engine), and what each event cost: requests failed,
requests served by engines of two revisions, and how long the event took. Used by tests/e2e/test_operations.py
(a few events, lean) and bench/operations.py (the whole table).

The services run with their own operator (this checkout, with Prometheus), `disagg-lab fleet` (the engines
and their kubelet: drain on deletion, restarts) and `disagg-lab routers` (the real routers). The client is
`disagg_lab.load.BackgroundLoad`: Poisson arrivals of streamed completions through the Service's ready
endpoints. A request is mixed when its decode engine refused the hand-off of a prefill engine of another
revision (the engines refuse and count every such hand-off; the decode answers `x-disagg-kv: refused`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as kclient
from operator_support import (
    EXAMPLES,
    Cluster,
    E2ESession,
    Kubectl,
    LabProcesses,
    OperatorProcess,
    condition,
    diagnose,
    dump,
    in_namespace,
    is_ready,
    isolate,
    load_docs,
    operator_session,
    remove_finalizers,
    routers_ready,
    wait_until,
)

from disagg_lab.kubelet import FINALIZER
from disagg_lab.load import BackgroundLoad, Result, ServiceEndpoints

GROUP, VERSION, PLURAL = "disagg.dev", "v1alpha1", "inferenceservices"
PROMETHEUS = "http://127.0.0.1:9090"
OPERATOR_FLAGS = ("--prometheus-url", PROMETHEUS, "--autoscale-tick", "2", "--prometheus-rate-window", "8s",
                  "--scrape-interval", "2", "--metrics-staleness", "15", "--prometheus-timeout", "2")
PROMPT_TOKENS, OUTPUT_TOKENS = 256, 48


def service_manifest(namespace: str, name: str, engine: str, prefill: int, decode: int) -> dict[str, Any]:
    """examples/01 (vLLM, NIXL) or 02 (SGLang, Mooncake) with one accelerator per worker, `prefill` and `decode`
    replicas held by the autoscaler between equal bounds (a scale-down is a change of the bounds, and the
    autoscaler chooses its victims), two routers."""
    prefix = "01-" if engine == "vllm" else "02-"
    (example,) = [p for p in EXAMPLES if p.name.startswith(prefix)]
    (service,) = [in_namespace(d, namespace) for d in load_docs(example) if d.get("kind") == "InferenceService"]
    service["metadata"]["name"] = name
    spec = service["spec"]
    spec["router"] = {**(spec.get("router") or {}), "replicas": 2}
    for role, count in (("prefill", prefill), ("decode", decode)):
        spec[role]["replicas"] = count
        spec[role]["accelerator"] = {**spec[role]["accelerator"], "count": 1}
        spec[role]["parallelism"] = {"tensor": 1}
        spec[role]["autoscaling"] = {"minReplicas": count, "maxReplicas": count}
    spec.pop("acceleratorBudget", None)
    return service


@dataclass
class OpsRig:
    session: E2ESession
    namespace: str
    operator: OperatorProcess
    lab: LabProcesses
    api: kclient.ApiClient
    names: list[str] = field(default_factory=list)

    @property
    def kubectl(self) -> Kubectl:
        return self.session.kubectl

    @property
    def cluster(self) -> Cluster:
        return self.session.cluster

    def diagnostics(self) -> str:
        return "\n".join([diagnose(self.kubectl, [self.namespace], [self.operator]), self.lab.log_tail()])

    def service(self, name: str) -> dict[str, Any]:
        found = self.cluster.service(self.namespace, name)
        assert found is not None, f"no InferenceService {name}"
        return found

    def patch_spec(self, name: str, patch: dict[str, Any]) -> None:
        self.cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                           {"spec": patch})

    def pods(self, name: str, role: str, deleting: bool = False) -> list[Any]:
        pods = self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"disagg.dev/service={name},disagg.dev/role={role}").items
        return [p for p in pods if deleting or p.metadata.deletion_timestamp is None]

    def ready_pods(self, name: str, role: str) -> list[Any]:
        return [p for p in self.pods(name, role)
                if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]

    def engines(self, name: str) -> list[dict[str, Any]]:
        return self.lab.pods(name)

    def settled(self, name: str, prefill: int, decode: int) -> bool:
        """Ready, each pool at its count with every pod served by the lab, no pod terminating, routers Ready."""
        svc = self.service(name)
        assert is_ready(svc), f"{name}: Ready {condition(svc, 'Ready')}"
        for role, count in (("prefill", prefill), ("decode", decode)):
            every = self.pods(name, role, deleting=True)
            assert len(every) == count, f"{name} {role}: {len(every)} pods (incl. terminating), want {count}"
        routers = self.pods(name, "router", deleting=True)
        assert len(routers) == 2 and routers_ready(routers), f"{name}: routers {len(routers)}"
        served = {(p["role"]) for p in self.engines(name)}
        assert served == {"prefill", "decode"}, f"{name}: the fleet serves {served}"
        return True

    def wait_settled(self, name: str, prefill: int, decode: int, timeout: float = 240) -> float:
        started = time.monotonic()
        wait_until(lambda: self.settled(name, prefill, decode), timeout, f"{name} settled at {prefill}/{decode}",
                   self.diagnostics, interval=0.5)
        return time.monotonic() - started

    def load(self, name: str, rate: float, seed: int) -> BackgroundLoad:
        endpoints = ServiceEndpoints(lambda: self.api, self.namespace, name).start()
        return BackgroundLoad(endpoints, prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS, rate=rate,
                              max_s=900.0, max_requests=20_000, seed=seed).start()

    def fault(self, pod: str, fault: str | None) -> None:
        self.lab.put(f"/fault/{self.namespace}/{pod}", {"fault": fault})


@contextlib.contextmanager
def ops_rig(kubectl: Kubectl, kube_api: kclient.ApiClient, kubeconfig: Path, workdir: Path, label: str,
            services: list[tuple[str, str, int, int]]) -> Iterator[OpsRig]:
    """A namespace with the services (name, engine, prefill, decode) Ready under this checkout's operator and
    the lab; everything removed afterwards."""
    with operator_session(kubectl, Cluster(kube_api), workdir, label) as session:
        namespace = f"e2e-{label}-{session.session}"
        kubectl("create", "namespace", namespace)
        kubectl("label", "namespace", namespace, "e2e=true")
        operator = OperatorProcess("operator", (namespace,), session.operator_kubeconfig, workdir / "operator.log",
                                   30.0, extra_args=OPERATOR_FLAGS)
        lab = LabProcesses(namespace, workdir, kubeconfig, targets_file=prometheus_targets())
        rig = OpsRig(session, namespace, operator, lab, kube_api, [s[0] for s in services])
        try:
            isolate(kubectl, session.session, namespace)
            operator.start().wait_healthy(timeout=30)
            lab.start()
            kubectl("apply", "-f", "-", input=dump([service_manifest(namespace, *s) for s in services]))
            for name, _, prefill, decode in services:
                rig.wait_settled(name, prefill, decode, timeout=240)
            yield rig
        finally:
            lab.stop()
            operator.stop()
            remove_finalizers(session.cluster, namespace)
            release_pods(session.cluster, namespace)
            kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def prometheus_targets() -> Path:
    out = subprocess.run(["python3", str(Path(__file__).resolve().parents[2] / "hack" / "cluster.py"), "env"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    kubeconfig = Path(out.strip().splitlines()[-1].split("=", 1)[1])
    return kubeconfig.parent / "prometheus" / "engines.json"


def release_pods(cluster: Cluster, namespace: str) -> None:
    """Takes the lab's finalizer off every pod left (a lab that died cannot)."""
    with contextlib.suppress(kclient.ApiException):
        for pod in cluster.core.list_namespaced_pod(namespace).items:
            if FINALIZER in (pod.metadata.finalizers or []):
                with contextlib.suppress(kclient.ApiException):
                    cluster.core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {
                        "$deleteFromPrimitiveList/finalizers": [FINALIZER]}})


# ----------------------------------------------------------------------------------------------------
# one event under load


@dataclass
class EventResult:
    """What one event cost."""

    event: str
    service: str
    engine: str
    requests: int
    failed: int
    mixed: int
    """Requests whose decode engine refused the hand-off of a prefill engine of another revision."""
    duration_s: float
    """From the event's start to the service settled again."""
    failed_after: int = 0
    """Failed requests sent after the event started (for a kill: those not in flight on the killed pod)."""
    failure_kinds: dict[str, int] = field(default_factory=dict)
    notes: str = ""

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def run_event(rig: OpsRig, name: str, engine: str, event: str, act: Callable[[], Callable[[], bool]],
              rate: float = 4.0, warmup_s: float = 4.0, tail_s: float = 4.0, timeout: float = 300,
              seed: int | None = None) -> EventResult:
    """Steady load, then `act()` (which starts the event and returns when it is over: a check that is True
    once the service has settled again), then a tail of load; the load's requests counted."""
    load = rig.load(name, rate, seed if seed is not None else secrets.randbelow(10_000))
    try:
        time.sleep(warmup_s)
        started = time.time()
        done = act()
        wait_until(done, timeout, f"{event} on {name} to finish", rig.diagnostics, interval=0.5)
        duration = time.time() - started
        time.sleep(tail_s)
    finally:
        load.stop()
        load.endpoints.stop()
    results: list[Result] = list(load.results)
    failed = [r for r in results if not r.ok]
    kinds: dict[str, int] = {}
    for r in failed:
        kind = (r.error or f"HTTP {r.status}")[:60]
        kinds[kind] = kinds.get(kind, 0) + 1
    return EventResult(event, name, engine, len(results), len(failed), sum(1 for r in results if r.kv == "refused"),
                       round(duration, 1), sum(1 for r in failed if r.sent_at >= started), kinds)


def report(result: EventResult) -> str:
    return (f"{result.engine} {result.event}: {result.failed} of {result.requests} failed "
            f"({result.failed_after} sent after the start), {result.mixed} mixed, {result.duration_s} s"
            + (f"; failures {json.dumps(result.failure_kinds)}" if result.failure_kinds else ""))


def spec_copy(rig: OpsRig, name: str) -> dict[str, Any]:
    return copy.deepcopy(rig.service(name)["spec"])
