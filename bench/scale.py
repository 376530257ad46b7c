#!/usr/bin/env python3
"""Scale benchmark: N InferenceServices on the local cluster, the operator's work and its cost.

Measures, against the real control plane (hack/cluster.py) with the operator running under its
ServiceAccount:
- the operator's own work for N services from a cold start (every child applied, every status
  written with the current observedGeneration), and separately the time until every service is Ready
  (bounded by kube-controller-manager, the scheduler and kwok, not by the operator);
- event-to-apply latency: spec changes at a steady rate, each stamped with its time in an engine env
  var, until the pool's Deployment carries the stamp (p50/p99);
- API write requests in total and during an idle period (the operator's own counter);
- operator CPU seconds and peak RSS; Prometheus queries per autoscaling tick;
- a restart (SIGTERM, a new process) over the N settled services: time until the new process has
  reconciled each of them, its writes meanwhile (an unchanged fleet: none) and its peak RSS.
Prints a table next to the targets and writes JSON (bench/results/scale.json).

    .venv/bin/python bench/scale.py                 # N=1000 (about 10 minutes)
    .venv/bin/python bench/scale.py -n 50 --idle-seconds 30 --changes-seconds 10
For the pod side, start the cluster with higher client rate limits, e.g.
    DISAGG_KUBE_SCHEDULER_ARGS="--kube-api-qps=300 --kube-api-burst=600" hack/cluster.py up
(kube-controller-manager already runs with --kube-api-qps=100 --kube-api-burst=200).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client.parser import text_string_to_metric_families

from disagg.kube.client import DEPLOYMENT, INFERENCE_SERVICE, Kind, Kube
from disagg.kube.watch import KindWatch

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python")
TARGETS = {
    "operator_work_s": 120.0,
    "idle_writes": 0,
    "event_to_apply_p99_s": 1.0,
    "peak_rss_mib": 300.0,
}
CHILDREN_PER_SERVICE = 13


def log(message: str) -> None:
    print(f"==> [bench/scale] {message}", file=sys.stderr, flush=True)


def cluster(*args: str) -> str:
    return subprocess.run([PY, str(REPO / "hack" / "cluster.py"), *args], check=True, capture_output=True,
                          text=True).stdout


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["kubectl", *args], check=True, capture_output=True, text=True, input=stdin).stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "disagg.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "uri": "hf://meta-llama/Llama-3.1-8B-Instruct",
                      "architecture": {"parameters": 8.03e9, "layers": 32, "kvHeads": 8, "headDim": 128}},
            "engine": {"kind": "vllm", "env": [{"name": "STAMP", "value": "0"}]},
            "router": {"replicas": 1},
            "prefill": {"replicas": 1, "accelerator": {"type": "nvidia-h100", "count": 1},
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                        "autoscaling": {"minReplicas": 1, "maxReplicas": 2}},
            "decode": {"replicas": 1, "accelerator": {"type": "nvidia-h200", "count": 1},
                       "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                       "autoscaling": {"minReplicas": 1, "maxReplicas": 2}},
        },
    }


def bench_nodes(n: int) -> list[dict[str, Any]]:
    """Enough fake GPU and CPU nodes for n services (one GPU pod per pool, one router each), with a
    quarter to spare: a rolling update surges a new pod before the old one goes."""
    nodes = []
    kinds = [("nvidia-h100", "nvidia.com/gpu", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "p5.48xlarge"),
             ("nvidia-h200", "nvidia.com/gpu", {"nvidia.com/gpu.product": "NVIDIA-H200"}, "p5en.48xlarge")]
    for acc, resource, labels, instance in kinds:
        for i in range((n + n // 4 + 7) // 8):
            nodes.append(_node(f"bench-{acc}-{i}", {**labels, "node.kubernetes.io/instance-type": instance},
                               {resource: "8"}, taint=resource))
    for i in range((n + 99) // 100):
        nodes.append(_node(f"bench-cpu-{i}", {"node.kubernetes.io/instance-type": "m7i.8xlarge"}, {}, taint=None))
    return nodes


def _node(name: str, labels: dict[str, str], extended: dict[str, str], taint: str | None) -> dict[str, Any]:
    capacity = {"cpu": "192", "memory": "2Ti", "pods": "110", **extended}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                              "disagg.dev/bench": "scale", **labels},
                     "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"}},
        "spec": {"taints": [{"key": taint, "value": "present", "effect": "NoSchedule"}] if taint else []},
        "status": {"capacity": capacity, "allocatable": capacity, "phase": "Running",
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake",
                                "kubeProxyVersion": "fake", "bootID": "", "containerRuntimeVersion": "",
                                "kernelVersion": "", "machineID": "", "osImage": "", "systemUUID": ""}},
    }


class Operator:
    """The operator process under its ServiceAccount, with its metrics endpoint."""

    def __init__(self, cluster_dir: Path, namespaces: list[str], prometheus: str, name: str = "operator") -> None:
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log_path = cluster_dir / f"bench-{name}.log"
        kubeconfig = cluster_dir / "bench-operator.kubeconfig"
        cluster("sa-kubeconfig", "--namespace", "disagg-system", "--service-account", "disagg-operator",
                "--out", str(kubeconfig))
        args = [str(REPO / ".venv" / "bin" / "disagg"), "run", "--listen-host", "127.0.0.1",
                "--liveness-port", str(self.liveness_port), "--metrics-port", str(self.metrics_port),
                "--prometheus-url", prometheus, "--resync-seconds", "600",
                # the local Prometheus scrapes every 2 s (hack/cluster.py); rates over 30 s as by default
                "--scrape-interval", "2", "--prometheus-rate-window", "32s"]
        for ns in namespaces:
            args += ["-n", ns]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        profile = os.environ.get("DISAGG_BENCH_PROFILE")  # e.g. /tmp/operator.txt: py-spy's collapsed stacks
        if profile:
            args = [str(REPO / ".venv" / "bin" / "py-spy"), "record", "--format", "raw", "-o", profile,
                    "--rate", "50", "--", *args]
        self.process = subprocess.Popen(args, env=env, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"operator did not become live; log: {self.log_path}")

    def _samples(self, name: str, labels: dict[str, str]) -> list[Any]:
        """The operator's /metrics samples named `name` whose labels include `labels`."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return [sample for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]

    def metric(self, name: str, **labels: str) -> float:
        return float(sum(sample.value for sample in self._samples(name, labels)))

    def histogram(self, name: str, **labels: str) -> dict[float, float]:
        """Cumulative bucket counts of one histogram series, by upper bound."""
        return {float(sample.labels["le"]): sample.value for sample in self._samples(f"{name}_bucket", labels)}

    def writes(self) -> float:
        return sum(self.metric("disagg_api_requests_total", method=m) for m in ("PATCH", "POST", "PUT", "DELETE"))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        # py-spy writes its profile on SIGINT
        self.process.send_signal(signal.SIGINT if os.environ.get("DISAGG_BENCH_PROFILE") else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class ServiceWatch:
    """Which services are done (status written for their generation) and Ready, from one cluster-wide
    watch: polling LISTs of 1,000 services and 3,000 Deployments every second was itself a large share
    of the API server's work during the benchmark."""

    def __init__(self, namespaces: list[str]) -> None:
        self.namespaces = set(namespaces)
        self.done: set[tuple[str, str]] = set()
        self.ready: set[tuple[str, str]] = set()
        self._watch = KindWatch(Kube(k8s.ApiClient()), INFERENCE_SERVICE, None, "", self._listed, self._changed)
        self._watch.start()

    def _listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        for item in items:
            self._record(item)

    def _changed(self, kind: Kind, change: str, item: dict[str, Any]) -> None:
        self._record(item)

    def _record(self, item: dict[str, Any]) -> None:
        meta = item["metadata"]
        if meta["namespace"] not in self.namespaces:
            return
        key = (meta["namespace"], meta["name"])
        status = item.get("status") or {}
        if status.get("observedGeneration") == meta["generation"] and status.get("conditions"):
            self.done.add(key)
        if any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])):
            self.ready.add(key)

    def stop(self) -> None:
        self._watch.close()


def children_exist(apps: Any, namespaces: list[str]) -> int:
    """Deployments the operator created (one LIST per namespace, at the end only)."""
    return sum(len(apps.list_namespaced_deployment(ns, label_selector="app.kubernetes.io/managed-by=disagg").items)
               for ns in namespaces)


def measure_event_to_apply(custom: Any, api: k8s.ApiClient, namespaces: list[str], services: int,
                           rate: float, seconds: float) -> list[float]:
    """Stamps spec changes at `rate`/s; latency until the prefill Deployment carries the stamp or a newer
    one of the same service (reconcile is level-triggered: a change superseded before it was applied
    is applied by the newer one)."""
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    owner: dict[str, str] = {}
    def changed(kind: Kind, change: str, deployment: dict[str, Any]) -> None:
        service = deployment["metadata"]["name"].removesuffix("-prefill")
        for env in deployment["spec"]["template"]["spec"]["containers"][0].get("env") or []:
            if env.get("name") == "STAMP" and env.get("value") in sent:
                now = time.monotonic()
                for stamp in [s for s, svc in list(owner.items()) if svc == service and int(s) <= int(env["value"])]:
                    seen.setdefault(stamp, now)

    kube = Kube(api)
    watches = [KindWatch(kube, DEPLOYMENT, ns, "disagg.dev/role=prefill", lambda *_: None, changed)
               for ns in namespaces]
    for watch in watches:
        watch.start()
    time.sleep(2)
    count = int(rate * seconds)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for i in range(count):
            target = started + i / rate
            time.sleep(max(0.0, target - time.monotonic()))
            index = i % services
            ns = namespaces[index % len(namespaces)]
            stamp = f"{i + 1}"
            owner[stamp] = f"svc-{index}"
            sent[stamp] = time.monotonic()
            body = {"spec": {"engine": {"kind": "vllm", "env": [{"name": "STAMP", "value": stamp}]}}}
            pool.submit(custom.patch_namespaced_custom_object, "disagg.dev", "v1alpha1", ns, "inferenceservices",
                        f"svc-{index}", body)
    deadline = time.monotonic() + 30
    while len(seen) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.2)
    for watch in watches:
        watch.close()
    return [seen[s] - sent[s] if s in seen else float("inf") for s in sent]


def apply_rate(make: Callable[[int], dict[str, Any]], objects: int, threads: int = 16) -> dict[str, float]:
    """Server-side applies per second of `objects` manifests from one client with `threads` connections."""
    api = k8s.ApiClient()
    api.configuration.connection_pool_maxsize = threads
    kube = Kube(api)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: kube.apply(make(i)), range(objects)))
    seconds = time.monotonic() - started
    return {"objects": objects, "seconds": round(seconds, 1), "applies_per_s": round(objects / seconds, 1)}


def apiserver_apply_ceiling(namespace: str, objects: int) -> dict[str, float]:
    """Server-side applies per second the API server takes from one client, of small objects
    (ServiceAccounts with a 2 KiB annotation: no controller reacts to them), on the same machine with
    nothing else running: the ceiling of any operator, measured before the benchmark starts."""
    return apply_rate(lambda i: {"apiVersion": "v1", "kind": "ServiceAccount",
                                 "metadata": {"name": f"ceiling-{i}", "namespace": namespace,
                                              "labels": {"app.kubernetes.io/name": "ceiling"},
                                              "annotations": {"bench/payload": "x" * 2048}}}, objects)


def service_apply_rates(namespace: str, objects: int) -> dict[str, float]:
    """Services applied per second with a cluster IP and headless: the API server allocates cluster
    IPs one at a time, which bounds how fast any operator can create services that have one."""

    def service(i: int, headless: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {"selector": {"bench": str(i)}, "ports": [{"name": "http", "port": 80}]}
        spec.update({"clusterIP": "None"} if headless else {"type": "ClusterIP"})
        return {"apiVersion": "v1", "kind": "Service", "spec": spec,
                "metadata": {"name": f"ceiling-{'headless' if headless else 'ip'}-{i}", "namespace": namespace}}

    return {f"{label}_per_s": apply_rate(functools.partial(service, headless=headless), objects)["applies_per_s"]
            for label, headless in (("cluster_ip", False), ("headless", True))}


def running_flags(cluster_dir: Path, component: str, prefixes: tuple[str, ...]) -> str:
    """The flags starting with one of `prefixes` that a running cluster component was started with."""
    try:
        pid = (cluster_dir / "pids" / f"{component}.pid").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except (OSError, ValueError):
        return ""
    return " ".join(a for a in argv if a.startswith(prefixes))


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of the observations made between two readings."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    return next(bound for bound, count in counts if count >= q * total)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="InferenceServices (default 1000)")
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--changes-per-second", type=float, default=20.0)
    parser.add_argument("--changes-seconds", type=float, default=30.0)
    parser.add_argument("--changes-services", type=int, default=100,
                        help="services the changes go round (each change rolls both pools: 100 services "
                             "roll at most 200 pods at once, which the spare GPU nodes take)")
    parser.add_argument("--idle-seconds", type=float, default=300.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    parser.add_argument("--keep", action="store_true", help="leave the services and nodes in place")
    parser.add_argument("--ceiling-objects", type=int, default=2000,
                        help="ServiceAccounts applied to measure the API server's apply rate first (0: skip)")
    args = parser.parse_args(argv)

    env_line = cluster("up").strip().splitlines()[-1]
    os.environ["KUBECONFIG"] = env_line.split("=", 1)[1]
    os.environ["PATH"] = cluster("bin-dir").strip() + os.pathsep + os.environ["PATH"]
    cluster_dir = Path(os.environ["KUBECONFIG"]).parent
    k8s_config.load_kube_config(config_file=os.environ["KUBECONFIG"])  # type: ignore[no-untyped-call]
    api = k8s.ApiClient()
    api.configuration.connection_pool_maxsize = 32
    core, apps, custom = k8s.CoreV1Api(api), k8s.AppsV1Api(api), k8s.CustomObjectsApi(api)

    log("CRD, RBAC, namespaces, nodes")
    kubectl("apply", "--server-side", "-f", "-", stdin=subprocess.run(
        [str(REPO / ".venv" / "bin" / "disagg"), "crd"], capture_output=True, text=True, check=True).stdout)
    subprocess.run("kubectl create namespace disagg-system --dry-run=client -o yaml | kubectl apply -f -",
                   shell=True, check=True, capture_output=True)
    kubectl("apply", "--server-side", "-f", "-", stdin=subprocess.run(
        [str(REPO / ".venv" / "bin" / "disagg"), "rbac", "--namespace", "disagg-system"],
        capture_output=True, text=True, check=True).stdout)
    run_id = time.strftime("%H%M%S")  # namespaces of an earlier run may still be terminating
    namespaces = [f"scale-{run_id}-{i}" for i in range(args.namespaces)]
    for ns in namespaces:
        subprocess.run(f"kubectl create namespace {ns} --dry-run=client -o yaml | kubectl apply -f -",
                       shell=True, check=True, capture_output=True)
    nodes = bench_nodes(args.n)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda body: _create_ignore_exists(core.create_node, body), nodes))
    log(f"{len(nodes)} bench nodes")

    ceiling_ns = f"scale-{run_id}-ceiling"
    subprocess.run(f"kubectl create namespace {ceiling_ns} --dry-run=client -o yaml | kubectl apply -f -",
                   shell=True, check=True, capture_output=True)
    ceiling = apiserver_apply_ceiling(ceiling_ns, args.ceiling_objects) if args.ceiling_objects else None
    if ceiling:
        log(f"API server alone: {ceiling['applies_per_s']} server-side applies/s "
            f"({ceiling['objects']} ServiceAccounts)")
        ceiling.update(service_apply_rates(ceiling_ns, 300))
        log(f"API server alone: Services with a cluster IP {ceiling['cluster_ip_per_s']}/s, "
            f"headless {ceiling['headless_per_s']}/s")
    subprocess.run(["kubectl", "delete", "namespace", ceiling_ns, "--wait=false"], capture_output=True)

    demo = cluster_dir / "pids" / "extra-operator.pid"
    if demo.exists():  # a cluster-wide demo operator would do (and muddle) the measured work
        try:
            os.kill(int(demo.read_text().strip()), signal.SIGTERM)
            log("stopped the demo's operator (make demo starts it again)")
        except (OSError, ValueError):
            pass
    operator = Operator(cluster_dir, namespaces, "http://127.0.0.1:9090")
    result: dict[str, Any] = {"n": args.n, "namespaces": args.namespaces,
                              "client_rate_limits": {
                                  component: running_flags(cluster_dir, component, prefixes) or "defaults"
                                  for component, prefixes in (("kube-controller-manager", ("--kube-api-",)),
                                                              ("kube-scheduler", ("--kube-api-",)),
                                                              ("kwok", ("--kube-api-", "--qps", "--burst")))},
                              "apiserver_apply_ceiling": ceiling}
    try:
        log(f"creating {args.n} InferenceServices")
        watch = ServiceWatch(namespaces)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: custom.create_namespaced_custom_object(
                "disagg.dev", "v1alpha1", namespaces[i % len(namespaces)], "inferenceservices",
                service(f"svc-{i}", namespaces[i % len(namespaces)])), range(args.n)))
        result["create_requests_s"] = round(time.monotonic() - t0, 1)
        work_s = None
        deadline = t0 + 1800
        while time.monotonic() < deadline:
            if len(watch.done) >= args.n:
                work_s = time.monotonic() - t0
                break
            time.sleep(0.2)
        result["operator_work_s"] = round(work_s, 1) if work_s else None
        result["deployments_created"] = children_exist(apps, namespaces)
        log(f"operator work done in {result['operator_work_s']} s "
            f"({result['deployments_created']} Deployments of {3 * args.n})")
        ready_s = None
        while time.monotonic() < deadline:
            if len(watch.ready) >= args.n:
                ready_s = time.monotonic() - t0
                break
            time.sleep(0.5)
        watch.stop()
        result["all_ready_s"] = round(ready_s, 1) if ready_s else None
        log(f"all Ready in {result['all_ready_s']} s")
        result["writes_cold_start"] = operator.writes()

        log(f"event-to-apply at {args.changes_per_second}/s for {args.changes_seconds} s")
        spec_before = {stage: operator.histogram("disagg_spec_change_seconds", stage=stage)
                       for stage in ("started", "applied")}
        latencies = measure_event_to_apply(custom, api, namespaces, min(args.changes_services, args.n),
                                           args.changes_per_second, args.changes_seconds)
        finite = [x for x in latencies if x != float("inf")]
        result["event_to_apply"] = {"changes": len(latencies), "missed": len(latencies) - len(finite),
                                    "p50_s": round(percentile(finite, 50), 3),
                                    "p99_s": round(percentile(latencies, 99), 3)}
        result["event_to_apply_p99_s"] = result["event_to_apply"]["p99_s"]
        log(f"event-to-apply p50 {result['event_to_apply']['p50_s']} s, p99 {result['event_to_apply_p99_s']} s")
        # the operator's own share: from the watch event reaching it to the reconcile starting and to the
        # children applied (bucket upper bounds), the rest is the API server's watch and the bench's
        for stage, before in spec_before.items():
            after = operator.histogram("disagg_spec_change_seconds", stage=stage)
            result["event_to_apply"][f"operator_{stage}_p50_s"] = bucket_quantile(before, after, 0.5)
            result["event_to_apply"][f"operator_{stage}_p99_s"] = bucket_quantile(before, after, 0.99)
        # The stamps rolled out hundreds of Deployments; the operator follows them into status until
        # they are done. Idle starts once it made no write for 15 s (how long that took is reported).
        settle_started = time.monotonic()
        quiet_since, last_writes = time.monotonic(), operator.writes()
        while time.monotonic() - quiet_since < 15 and time.monotonic() - settle_started < 600:
            time.sleep(1)
            writes = operator.writes()
            if writes != last_writes:
                quiet_since, last_writes = time.monotonic(), writes
        result["rollouts_settled_s"] = round(time.monotonic() - settle_started - 15, 1)
        log(f"the stamps' rollouts settled after {result['rollouts_settled_s']} s")

        log(f"idle for {args.idle_seconds} s")
        writes_before = operator.writes()
        queries_before = operator.metric("disagg_prometheus_query_duration_seconds_count")
        ticks_before = operator.metric("disagg_autoscaler_ticks_total", queried="true")
        time.sleep(args.idle_seconds)
        result["idle_seconds"] = args.idle_seconds
        result["idle_writes"] = operator.writes() - writes_before
        ticks = operator.metric("disagg_autoscaler_ticks_total", queried="true") - ticks_before
        queries = operator.metric("disagg_prometheus_query_duration_seconds_count") - queries_before
        result["prometheus_queries_per_tick"] = round(queries / ticks, 2) if ticks else None
        result["writes_total"] = operator.writes()
        result["operator_cpu_s"] = round(operator.cpu_seconds(), 1)
        result["peak_rss_mib"] = round(operator.peak_rss_mib(), 1)

        log("restart: SIGTERM, then a new operator process over the settled services")
        operator.stop()
        operator = Operator(cluster_dir, namespaces, "http://127.0.0.1:9090", name="operator-restarted")
        took_up_s = None
        while time.monotonic() - operator.started < 600:
            if operator.metric("disagg_reconciles_total") >= args.n:
                took_up_s = time.monotonic() - operator.started
                break
            time.sleep(0.5)
        result["restart"] = {"took_up_s": round(took_up_s, 1) if took_up_s else None,
                             "writes": operator.writes(), "peak_rss_mib": round(operator.peak_rss_mib(), 1)}
        log(f"restarted operator reconciled all {args.n} in {result['restart']['took_up_s']} s, "
            f"{result['restart']['writes']:.0f} writes")
    finally:
        operator.stop()
        if not args.keep:
            log("cleaning up")
            for ns in namespaces:
                subprocess.run(["kubectl", "delete", "namespace", ns, "--wait=false"], capture_output=True)
            subprocess.run(["kubectl", "delete", "nodes", "-l", "disagg.dev/bench=scale", "--wait=false"],
                           capture_output=True)

    rows = [
        ("operator work for N services (s)", result.get("operator_work_s"), f"<= {TARGETS['operator_work_s']:.0f}"),
        ("all pods Ready (s)", result.get("all_ready_s"), "(kcm/scheduler/kwok bound)"),
        ("API server alone: applies/s", (ceiling or {}).get("applies_per_s"), "(ceiling, see below)"),
        (f"  -> {CHILDREN_PER_SERVICE * args.n} child applies take (s)",
         round(CHILDREN_PER_SERVICE * args.n / ceiling["applies_per_s"], 1) if ceiling else None,
         "(lower bound of the work)"),
        ("  Services with a cluster IP: applies/s", (ceiling or {}).get("cluster_ip_per_s"), "(allocated in turn)"),
        ("  headless Services: applies/s", (ceiling or {}).get("headless_per_s"), ""),
        ("event-to-apply p50 (s)", result.get("event_to_apply", {}).get("p50_s"), ""),
        ("event-to-apply p99 (s)", result.get("event_to_apply_p99_s"), f"<= {TARGETS['event_to_apply_p99_s']}"),
        ("API writes, total", result.get("writes_total"), ""),
        (f"API writes, {args.idle_seconds:.0f} s idle", result.get("idle_writes"), "0"),
        ("operator CPU (s)", result.get("operator_cpu_s"), ""),
        ("operator peak RSS (MiB)", result.get("peak_rss_mib"), f"<= {TARGETS['peak_rss_mib']:.0f}"),
        ("Prometheus queries per tick", result.get("prometheus_queries_per_tick"), "independent of N"),
        ("restart: all N reconciled (s)", result.get("restart", {}).get("took_up_s"), "(from process start)"),
        ("restart: API writes", result.get("restart", {}).get("writes"), "0"),
        ("restart: peak RSS (MiB)", result.get("restart", {}).get("peak_rss_mib"),
         f"<= {TARGETS['peak_rss_mib']:.0f}"),
    ]
    print(f"\nscale benchmark, N = {args.n} InferenceServices\n")
    print(f"| {'measure':36} | {'value':>10} | target |")
    print(f"|{'-' * 38}|{'-' * 12}|--------|")
    for name, value, target in rows:
        print(f"| {name:36} | {value!s:>10} | {target} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def _create_ignore_exists(create: Any, body: dict[str, Any]) -> None:
    try:
        create(body)
    except k8s.ApiException as error:
        if error.status != 409:
            raise


if __name__ == "__main__":
    sys.exit(main())
