#!/usr/bin/env python3
"""A real Kubernetes control plane on this machine, on loopback, for tests and the demo.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake kubelets) built from their
Go modules by hack/build-binaries.sh, fake accelerator nodes from the accelerator catalogue, and a real
Prometheus (Debian package) that scrapes the targets listed in ``<cluster dir>/prometheus/engines.json``.

The LeaderWorkerSet controller (sigs.k8s.io/lws, built the same way) runs as a host process beside the
API server, with its webhooks served on loopback and registered by URL.

Subcommands: up, down, status, env, bin-dir, sa-kubeconfig, prometheus-start, prometheus-stop,
apiserver-restart, lws-restart, kwok-restart.
Progress goes to stderr; ``up`` and ``env`` print ``export KUBECONFIG=...`` as their last stdout line.
The cluster dir is ``$DISAGG_CLUSTER_DIR`` (default /tmp/disagg-cluster). See
docs/local-cluster.md for why each non-default flag is set.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _use_project_venv() -> None:
    """Run under the project's .venv when this interpreter lacks pyyaml or the kubernetes client."""
    import importlib.util

    venv = REPO / ".venv"
    if all(importlib.util.find_spec(m) for m in ("yaml", "kubernetes")):
        return
    if (venv / "bin" / "python").exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(venv / "bin" / "python"), [str(venv / "bin" / "python"), *sys.argv])


if __name__ == "__main__":
    _use_project_venv()

import yaml  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# configuration

K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
ETCD_VERSION = os.environ.get("ETCD_VERSION", "v3.6.16")
KWOK_VERSION = os.environ.get("KWOK_VERSION", "v0.8.0")
HELM_VERSION = os.environ.get("HELM_VERSION", "v3.21.4")
LWS_VERSION = os.environ.get("LWS_VERSION", "v0.10.0")
CACHE = Path(os.environ.get("DISAGG_CACHE", str(Path.home() / ".cache" / "disagg")))
K8S_BIN = CACHE / "k8s" / K8S_VERSION / "bin"
ETCD_BIN = CACHE / "etcd" / ETCD_VERSION / "bin"
KWOK_DIR = CACHE / "kwok" / KWOK_VERSION
HELM_BIN = CACHE / "helm" / HELM_VERSION / "bin"
LWS_DIR = CACHE / "lws" / LWS_VERSION
CATALOG = REPO / "operator" / "disagg" / "catalog" / "accelerators.yaml"

HOST = "127.0.0.1"
ETCD_PORT, ETCD_PEER_PORT = 2379, 2380
APISERVER_PORT = 6443
KCM_PORT = 10257
SCHEDULER_PORT = 10259
KWOK_PORT = 10247
PROMETHEUS_PORT = 9090
LWS_WEBHOOK_PORT = 10263
LWS_HEALTH_PORT = 10264
# the LWS webhook configurations this tool registers (removed before the controller stops: their
# failure policy is Fail, so a stopped controller would block every LeaderWorkerSet and its pods)
LWS_WEBHOOKS = {
    "MutatingWebhookConfiguration": "disagg-lws-mutating-webhook",
    "ValidatingWebhookConfiguration": "disagg-lws-validating-webhook",
}
SERVICE_CIDR = "10.96.0.0/16"  # distinct from the pod range below
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "127.100.0.0/16"  # inside 127.0.0.0/8: every pod IP is a loopback address
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "disagg-local"
MARKER = ".disagg-cluster"  # `down` only deletes a directory that carries this file

# fake nodes: accelerator type from the catalogue -> how many nodes. H200 has 8: the multi-node e2e test's
# DeepSeek-V3-like decode takes two groups of 2 whole nodes, and the other tests keep their 4.
NODE_POOLS: dict[str, int] = {
    "nvidia-h100": 4, "nvidia-h200": 8, "nvidia-b200": 2, "amd-mi300x": 2, "aws-trainium2": 2,
}
# network domains: consecutive nodes of a type share the value of the type's first topology label
# (e.g. topology.k8s.aws/network-node-layer-3), DOMAIN_SIZE nodes of each type per domain, as an EFA
# leaf switch connects instances of several types
DOMAIN_SIZE = 2
# InfiniBand HCAs as the RDMA shared device plugin advertises them, on the NVIDIA nodes (KV over RDMA)
RDMA_RESOURCE, RDMA_PER_NODE = "rdma/ib", "16"
RDMA_TYPES = {"nvidia-h100", "nvidia-h200", "nvidia-b200"}
CPU_NODES = 2
SPREAD_POD_IPS = 128
"""Free pod addresses kwok is given at start (Cluster.spread_pod_ips)."""
# per instance type: (vCPU, memory GiB) of the real instance; unknown types get the default
INSTANCE_SIZES: dict[str, tuple[int, int]] = {
    "p5.48xlarge": (192, 2048),
    "p5en.48xlarge": (192, 2048),
    "p6-b200.48xlarge": (192, 2048),
    "ND-MI300X-v5": (96, 1850),
    "trn2.48xlarge": (192, 2048),
    "r7i.48xlarge": (192, 1536),
}
DEFAULT_SIZE = (192, 2048)
CPU_INSTANCE_TYPE = "r7i.48xlarge"
NVIDIA_FAMILY = {"H100": "hopper", "H200": "hopper", "B200": "blackwell", "B300": "blackwell"}
AMD_DEVICE_ID = {"amd-mi300x": "74a1"}

COMPONENT_ORDER = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "lws-controller",
    "prometheus",
]


def log(msg: str) -> None:
    print(f"==> [cluster] {msg}", file=sys.stderr, flush=True)


class ClusterError(Exception):
    pass


# ----------------------------------------------------------------------------------------------------
# paths


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kubeconfigs(self) -> Path:
        return self.root / "kubeconfigs"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def prometheus(self) -> Path:
        return self.root / "prometheus"

    @property
    def engines_file(self) -> Path:
        return self.prometheus / "engines.json"

    @property
    def lws(self) -> Path:
        return self.root / "lws"

    @property
    def kwok_pod_delete_stage(self) -> Path:
        return self.root / "kwok-stages" / "pod-delete.yaml"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


def cluster_dir() -> Path:
    return Path(os.environ.get("DISAGG_CLUSTER_DIR") or "/tmp/disagg-cluster").resolve()


# ----------------------------------------------------------------------------------------------------
# processes


def _proc_argv(pid: int) -> list[str] | None:
    """argv of a live (non-zombie) process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "ZX":
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def port_owner(port: int) -> tuple[int, list[str]] | None:
    """The process listening on TCP `port` as (pid, argv); pid 0 when it cannot be identified."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(cols[9])
    if not inodes:
        with socket.socket() as s:
            s.settimeout(0.5)
            return (0, ["?"]) if s.connect_ex((HOST, port)) == 0 else None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        return int(proc.name), _proc_argv(int(proc.name)) or ["?"]
    return 0, ["?"]


def describe(owner: tuple[int, list[str]]) -> str:
    pid, argv = owner
    return f"pid {pid} ({' '.join(argv)[:200]})" if pid else "an unidentified process"


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join("    | " + line for line in text[-lines:])


Health = Callable[[], str | None]  # None when healthy, else a short reason


@dataclass
class Component:
    name: str
    binary: Path
    argv: Callable[[], list[str]]
    health: Health
    port: int
    timeout: float = 60.0
    env: dict[str, str] = field(default_factory=dict)


class Cluster:
    def __init__(self, root: Path) -> None:
        self.p = Paths(root)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.components = {c.name: c for c in self._components()}

    # ---------------------------------------------------------------- components

    def _components(self) -> list[Component]:
        p = self.p
        pki = p.pki
        kcfg = p.kubeconfigs
        stages = KWOK_DIR / "stages"
        prometheus_bin = Path(shutil.which("prometheus") or "/usr/bin/prometheus")
        return [
            Component(
                "etcd",
                ETCD_BIN / "etcd",
                lambda: [
                    str(ETCD_BIN / "etcd"),
                    "--name=node0",
                    f"--data-dir={p.etcd_data}",
                    f"--listen-client-urls=http://{HOST}:{ETCD_PORT}",
                    f"--advertise-client-urls=http://{HOST}:{ETCD_PORT}",
                    f"--listen-peer-urls=http://{HOST}:{ETCD_PEER_PORT}",
                    f"--initial-advertise-peer-urls=http://{HOST}:{ETCD_PEER_PORT}",
                    f"--initial-cluster=node0=http://{HOST}:{ETCD_PEER_PORT}",
                    "--auto-compaction-retention=1",
                    "--quota-backend-bytes=8589934592",
                    "--unsafe-no-fsync=true",
                ],
                self._etcd_health,
                ETCD_PORT,
                timeout=60,
            ),
            Component(
                "kube-apiserver",
                K8S_BIN / "kube-apiserver",
                lambda: [
                    str(K8S_BIN / "kube-apiserver"),
                    f"--etcd-servers=http://{HOST}:{ETCD_PORT}",
                    f"--bind-address={HOST}",
                    f"--secure-port={APISERVER_PORT}",
                    f"--advertise-address={HOST}",
                    "--endpoint-reconciler-type=none",
                    f"--tls-cert-file={pki / 'apiserver.crt'}",
                    f"--tls-private-key-file={pki / 'apiserver.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    f"--service-account-issuer={SA_ISSUER}",
                    f"--service-account-key-file={pki / 'sa.pub'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=RBAC",
                    # adds tolerations for the accelerator taints to pods that request accelerators
                    "--enable-admission-plugins=ExtendedResourceToleration",
                    "--allow-privileged=true",
                    "--max-requests-inflight=0",
                    "--max-mutating-requests-inflight=0",
                    "--enable-priority-and-fairness=false",
                    "--shutdown-watch-termination-grace-period=2s",
                    # aggregation layer: lets kcm/scheduler load the requestheader CA (no log spam)
                    f"--requestheader-client-ca-file={pki / 'ca.crt'}",
                    "--requestheader-allowed-names=front-proxy-client",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                    f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                    f"--cert-dir={p.root / 'apiserver-certs'}",
                    "--v=1",
                ],
                self._apiserver_health,
                APISERVER_PORT,
                timeout=180,
            ),
            Component(
                "kube-controller-manager",
                K8S_BIN / "kube-controller-manager",
                lambda: [
                    str(K8S_BIN / "kube-controller-manager"),
                    f"--kubeconfig={kcfg / 'kube-controller-manager.kubeconfig'}",
                    f"--authentication-kubeconfig={kcfg / 'kube-controller-manager.kubeconfig'}",
                    f"--authorization-kubeconfig={kcfg / 'kube-controller-manager.kubeconfig'}",
                    f"--bind-address={HOST}",
                    f"--secure-port={KCM_PORT}",
                    f"--cert-dir={p.root / 'kcm-certs'}",
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    "--use-service-account-credentials=true",
                    f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                    f"--cluster-signing-key-file={pki / 'ca.key'}",
                    "--leader-elect=false",
                    "--node-monitor-period=25s",
                    "--node-monitor-grace-period=3m20s",
                    "--kube-api-qps=100",
                    "--kube-api-burst=200",
                    # Pod IPs are loopback addresses here (POD_CIDR), which the API server refuses in
                    # Endpoints and EndpointSlices: these controllers would only retry failing writes
                    # forever, a steady load that at 1,000 services was ~70 writes/s and 1,500 Events.
                    "--controllers=*,-endpoints-controller,-endpointslice-controller,"
                    "-endpointslice-mirroring-controller",
                    "--v=1",
                ],
                lambda: self._https_health(KCM_PORT),
                KCM_PORT,
            ),
            Component(
                "kube-scheduler",
                K8S_BIN / "kube-scheduler",
                lambda: [
                    str(K8S_BIN / "kube-scheduler"),
                    f"--kubeconfig={kcfg / 'kube-scheduler.kubeconfig'}",
                    f"--authentication-kubeconfig={kcfg / 'kube-scheduler.kubeconfig'}",
                    f"--authorization-kubeconfig={kcfg / 'kube-scheduler.kubeconfig'}",
                    f"--bind-address={HOST}",
                    f"--secure-port={SCHEDULER_PORT}",
                    f"--cert-dir={p.root / 'scheduler-certs'}",
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
                    "--leader-elect=false",
                    "--v=1",
                ],
                lambda: self._https_health(SCHEDULER_PORT),
                SCHEDULER_PORT,
            ),
            Component(
                "kwok",
                KWOK_DIR / "bin" / "kwok",
                lambda: [
                    str(KWOK_DIR / "bin" / "kwok"),
                    f"--kubeconfig={kcfg / 'kwok.kubeconfig'}",
                    "--manage-all-nodes=true",
                    "--node-lease-duration-seconds=40",
                    f"--cidr={POD_CIDR}",
                    f"--node-ip={HOST}",
                    f"--server-address={HOST}:{KWOK_PORT}",
                    f"--config={stages / 'node' / 'fast' / 'node-initialize.yaml'}",
                    f"--config={stages / 'node' / 'heartbeat-with-lease' / 'node-heartbeat-with-lease.yaml'}",
                    f"--config={stages / 'pod' / 'fast' / 'pod-ready.yaml'}",
                    f"--config={stages / 'pod' / 'fast' / 'pod-complete.yaml'}",
                    f"--config={p.kwok_pod_delete_stage}",
                ],
                lambda: self._http_health(f"http://{HOST}:{KWOK_PORT}/healthz"),
                KWOK_PORT,
                # kwok reads ~/.kwok/kwok.yaml when present: keep a user's file out of the cluster
                env={"HOME": str(p.root / "kwok-home")},
            ),
            Component(
                "lws-controller",
                LWS_DIR / "bin" / "lws-controller",
                lambda: [
                    str(LWS_DIR / "bin" / "lws-controller"),
                    f"--kubeconfig={kcfg / 'lws-controller.kubeconfig'}",
                    f"--config={p.lws / 'config.yaml'}",
                ],
                self._lws_health,
                LWS_HEALTH_PORT,
                timeout=90,
            ),
            Component(
                "prometheus",
                prometheus_bin,
                lambda: [
                    str(prometheus_bin),
                    f"--config.file={p.prometheus / 'prometheus.yml'}",
                    f"--storage.tsdb.path={p.prometheus / 'data'}",
                    "--storage.tsdb.retention.time=1d",
                    f"--web.listen-address={HOST}:{PROMETHEUS_PORT}",
                    "--web.enable-lifecycle",
                ],
                lambda: self._http_health(f"http://{HOST}:{PROMETHEUS_PORT}/-/ready"),
                PROMETHEUS_PORT,
            ),
        ]

    # ---------------------------------------------------------------- health checks

    @staticmethod
    def _http_get(url: str, ctx: ssl.SSLContext | None = None) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=3, context=ctx) as resp:  # loopback only
                return int(resp.status), resp.read(4096).decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read(4096).decode(errors="replace")

    def _http_health(self, url: str, ctx: ssl.SSLContext | None = None) -> str | None:
        try:
            code, body = self._http_get(url, ctx)
        except (OSError, urllib.error.URLError) as e:
            return f"{url}: {getattr(e, 'reason', e)}"
        return None if code == 200 else f"{url}: HTTP {code} {body.strip()[:200]}"

    def _etcd_health(self) -> str | None:
        url = f"http://{HOST}:{ETCD_PORT}/health"
        try:
            code, body = self._http_get(url)
        except (OSError, urllib.error.URLError) as e:
            return f"{url}: {getattr(e, 'reason', e)}"
        with contextlib.suppress(ValueError):
            if code == 200 and json.loads(body).get("health") == "true":
                return None
        return f"{url}: HTTP {code} {body.strip()[:200]}"

    def admin_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.p.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.p.pki / "admin.crt"), str(self.p.pki / "admin.key"))
        return ctx

    def _apiserver_health(self) -> str | None:
        try:
            ctx = self.admin_ssl()
        except (OSError, ssl.SSLError) as e:
            return f"client certificate: {e}"
        return self._http_health(f"https://{HOST}:{APISERVER_PORT}/readyz", ctx)

    def _lws_health(self) -> str | None:
        """Ready, and its webhook server answering TLS (it starts once the certificates are read)."""
        reason = self._http_health(f"http://{HOST}:{LWS_HEALTH_PORT}/readyz")
        if reason is not None:
            return reason
        try:
            ctx = ssl.create_default_context(cafile=str(self.p.pki / "ca.crt"))
            with socket.create_connection((HOST, LWS_WEBHOOK_PORT), timeout=2) as raw, \
                    ctx.wrap_socket(raw, server_hostname=HOST):
                return None
        except (OSError, ssl.SSLError) as e:
            return f"webhook server https://{HOST}:{LWS_WEBHOOK_PORT}: {e}"

    def _https_health(self, port: int) -> str | None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert of kcm/scheduler, loopback only
        return self._http_health(f"https://{HOST}:{port}/healthz", ctx)

    # ---------------------------------------------------------------- pid bookkeeping

    def recorded_pid(self, name: str) -> int | None:
        try:
            return int(self.p.pidfile(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running_pid(self, name: str) -> int | None:
        """The recorded pid if that process is still the component this cluster started."""
        pid = self.recorded_pid(name)
        if pid is None:
            return None
        argv = _proc_argv(pid)
        comp = self.components[name]
        if not argv or argv[0] != str(comp.binary) or not any(str(self.p.root) in a for a in argv[1:]):
            return None
        return pid

    def is_healthy(self, name: str) -> tuple[bool, str]:
        pid = self.running_pid(name)
        if pid is None:
            return False, "not running"
        reason = self.components[name].health()
        return (reason is None), (reason or "healthy")

    # ---------------------------------------------------------------- start / stop

    def start(self, name: str) -> None:
        comp = self.components[name]
        if self.running_pid(name) is not None:
            reason = comp.health()
            if reason is None:
                log(f"{name}: already running (pid {self.running_pid(name)}) and healthy")
                return
            log(f"{name}: running but not healthy yet ({reason}); waiting")
            self._wait_healthy(comp, None)
            return
        if not comp.binary.exists():
            raise ClusterError(f"{name}: binary {comp.binary} is missing (run hack/build-binaries.sh)")
        owner = port_owner(comp.port)
        if owner is not None and owner[0] and owner[1][0] == str(comp.binary) and name == "lws-controller":
            # a controller this tool started for an earlier cluster dir, which a checkout without the
            # LWS component tore down around it: its cluster is gone
            log(f"{name}: stopping a leftover controller of an earlier cluster, {describe(owner)}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(owner[0], signal.SIGTERM)
            for _ in range(100):
                if port_owner(comp.port) is None:
                    break
                time.sleep(0.1)
            owner = port_owner(comp.port)
        if owner is not None:
            raise ClusterError(
                f"{name}: port {HOST}:{comp.port} is already in use by {describe(owner)}; stop it or run `down` first"
            )
        self.p.logs.mkdir(parents=True, exist_ok=True)
        self.p.pids.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **comp.env}
        for d in comp.env.values():
            if d.startswith(str(self.p.root)):
                Path(d).mkdir(parents=True, exist_ok=True)
        # benchmarks raise client rate limits this way, e.g. DISAGG_KUBE_SCHEDULER_ARGS="--kube-api-qps=200"
        extra = os.environ.get(f"DISAGG_{name.upper().replace('-', '_')}_ARGS", "")
        argv = [*comp.argv(), *shlex.split(extra)]
        log(f"{name}: starting (log {self.p.log(name)})")
        with self.p.log(name).open("ab") as logf:
            logf.write(f"\n---- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=str(self.p.root),
                env=env,
                start_new_session=True,  # survives this script, Ctrl-C and CI step process groups
            )
        self.children[name] = proc
        self.p.pidfile(name).write_text(f"{proc.pid}\n")
        self._wait_healthy(comp, proc)

    def _wait_healthy(self, comp: Component, proc: subprocess.Popen[bytes] | None) -> None:
        t0 = time.monotonic()
        reason: str | None = "not checked yet"
        while time.monotonic() - t0 < comp.timeout:
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"{comp.name} exited with code {proc.returncode} while starting; last lines of "
                    f"{self.p.log(comp.name)}:\n{tail(self.p.log(comp.name))}"
                )
            reason = comp.health()
            if reason is None:
                log(f"{comp.name}: healthy after {time.monotonic() - t0:.1f}s")
                return
            time.sleep(0.5)
        raise ClusterError(
            f"{comp.name} did not become healthy within {comp.timeout:.0f}s ({reason}); last lines of "
            f"{self.p.log(comp.name)}:\n{tail(self.p.log(comp.name))}"
        )

    def stop(self, name: str, timeout: float = 20.0) -> None:
        pid = self.running_pid(name)
        recorded = self.recorded_pid(name)
        if pid is None:
            if recorded is not None:
                log(f"{name}: recorded pid {recorded} is not running (or is not ours); nothing to stop")
            self.p.pidfile(name).unlink(missing_ok=True)
            return
        log(f"{name}: stopping pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            _reap(pid)
            if _proc_argv(pid) is None:
                break
            time.sleep(0.2)
        else:
            log(f"{name}: pid {pid} ignored SIGTERM for {timeout:.0f}s; sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                _reap(pid)
                if _proc_argv(pid) is None:
                    break
                time.sleep(0.1)
        if name in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.children.pop(name).wait(timeout=1)
        self.p.pidfile(name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- files

    def write_pki(self) -> None:
        pki = self.p.pki
        pki.mkdir(parents=True, exist_ok=True)
        os.chmod(pki, 0o700)
        cnf = pki / "openssl.cnf"
        cnf.write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n"
            "[v3_ca]\nbasicConstraints = critical,CA:TRUE\n"
            "keyUsage = critical,digitalSignature,keyEncipherment,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier = hash\n"
        )

        def openssl(*args: str) -> None:
            r = subprocess.run(["openssl", *args], cwd=pki, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise ClusterError(f"openssl {' '.join(args)} failed:\n{r.stderr.strip()}")

        if not (pki / "ca.crt").exists() or not (pki / "ca.key").exists():
            log("pki: writing CA")
            openssl(
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3650",
                "-sha256",
                "-subj",
                f"/CN={CLUSTER_NAME}-ca",
                "-config",
                str(cnf),
                "-extensions",
                "v3_ca",
            )
        sans = ",".join(
            [
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
                f"IP:{HOST}",
                f"IP:{SERVICE_IP}",
            ]
        )
        leaves = {
            # name: (subject, extendedKeyUsage, subjectAltName)
            "apiserver": ("/CN=kube-apiserver", "serverAuth", sans),
            "admin": ("/O=system:masters/CN=disagg-admin", "clientAuth", ""),
            "kube-controller-manager": ("/CN=system:kube-controller-manager", "clientAuth", ""),
            "kube-scheduler": ("/CN=system:kube-scheduler", "clientAuth", ""),
            "kwok": ("/O=system:masters/CN=kwok", "clientAuth", ""),
            "front-proxy-client": ("/CN=front-proxy-client", "clientAuth", ""),
            # the LWS controller manages StatefulSets, Services, Pods and its CRDs cluster-wide
            "lws-controller": ("/O=system:masters/CN=lws-controller", "clientAuth", ""),
            "lws-webhook": ("/CN=lws-webhook", "serverAuth", f"IP:{HOST}"),
        }
        for name, (subject, eku, san) in leaves.items():
            if (pki / f"{name}.crt").exists() and (pki / f"{name}.key").exists():
                continue
            log(f"pki: writing {name} certificate ({subject})")
            ext = pki / f"{name}.ext"
            ext.write_text(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                f"extendedKeyUsage={eku}\n" + (f"subjectAltName={san}\n" if san else "")
            )
            openssl(
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
                "-subj",
                subject,
                "-config",
                str(cnf),
            )
            openssl(
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "0x" + secrets.token_hex(16),
                "-days",
                "3650",
                "-sha256",
                "-extfile",
                str(ext),
                "-out",
                f"{name}.crt",
            )
        if not (pki / "sa.key").exists() or not (pki / "sa.pub").exists():
            log("pki: writing service-account signing key")
            openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
            openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        for key in pki.glob("*.key"):
            os.chmod(key, 0o600)

    @staticmethod
    def _b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    def kubeconfig_dict(self, user: str, credentials: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CLUSTER_NAME,
                    "cluster": {
                        "server": f"https://{HOST}:{APISERVER_PORT}",
                        "certificate-authority-data": self._b64(self.p.pki / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
            "current-context": CLUSTER_NAME,
        }

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)

    def write_kubeconfigs(self) -> None:
        pki = self.p.pki
        for name, path in [
            ("admin", self.p.kubeconfig),
            ("kube-controller-manager", self.p.kubeconfigs / "kube-controller-manager.kubeconfig"),
            ("kube-scheduler", self.p.kubeconfigs / "kube-scheduler.kubeconfig"),
            ("kwok", self.p.kubeconfigs / "kwok.kubeconfig"),
            ("lws-controller", self.p.kubeconfigs / "lws-controller.kubeconfig"),
        ]:
            creds = {
                "client-certificate-data": self._b64(pki / f"{name}.crt"),
                "client-key-data": self._b64(pki / f"{name}.key"),
            }
            self._write_private(path, yaml.safe_dump(self.kubeconfig_dict(name, creds), sort_keys=False))

    def write_kwok_stages(self) -> None:
        """kwok's pod-delete stage, but for pods without finalizers only. kwok's own (`fast`) removes a deleted
        pod at once, grace period or not; a real kubelet removes it when its containers have stopped. The
        lab's engine kubelet holds a finalizer on the pods whose engines it runs (lab/disagg_lab/kubelet.py)
        and takes it off when the engine has exited; kwok removes the pod then. Pods nobody holds are
        removed at once, as before."""
        stage = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Stage",
            "metadata": {"name": "pod-delete"},
            "spec": {
                "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
                "selector": {"matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "Exists"},
                    {"key": ".metadata.finalizers", "operator": "DoesNotExist"},
                ]},
                "next": {"delete": True},
            },
        }
        path = self.p.kwok_pod_delete_stage
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# written by hack/cluster.py (write_kwok_stages)\n" + yaml.safe_dump(stage, sort_keys=False))

    def write_prometheus_config(self) -> None:
        d = self.p.prometheus
        (d / "data").mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s", "scrape_timeout": "2s"},
            "scrape_configs": [
                {
                    "job_name": "disagg-engines",
                    "honor_labels": True,
                    "file_sd_configs": [{"files": [str(self.p.engines_file)], "refresh_interval": "2s"}],
                }
            ],
        }
        (d / "prometheus.yml").write_text(
            "# written by hack/cluster.py; other tools add scrape targets to engines.json (file_sd)\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        if not self.p.engines_file.exists():
            self.p.engines_file.write_text("[]\n")

    # ---------------------------------------------------------------- LeaderWorkerSet controller

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.p.kubeconfig)}
        r = subprocess.run([str(K8S_BIN / "kubectl"), *args], input=stdin, capture_output=True, text=True,
                           env=env, check=False, timeout=120)
        if check and r.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()[:1000]}")
        return r

    def prepare_lws(self) -> None:
        """The controller's config and serving certificate, and its CRDs (it watches them from the start)."""
        crds = LWS_DIR / "config" / "crd" / "bases"
        if not crds.is_dir():
            raise ClusterError(f"lws-controller: {crds} is missing (run hack/build-binaries.sh lws)")
        certs = self.p.lws / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.p.pki / "lws-webhook.crt", certs / "tls.crt")
        shutil.copyfile(self.p.pki / "lws-webhook.key", certs / "tls.key")
        os.chmod(certs / "tls.key", 0o600)
        config = {
            "apiVersion": "config.lws.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {"host": HOST, "port": LWS_WEBHOOK_PORT, "certDir": str(certs)},
            "health": {"healthProbeBindAddress": f"{HOST}:{LWS_HEALTH_PORT}"},
            "metrics": {"bindAddress": "0"},  # no metrics server
        }
        (self.p.lws / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        for crd in sorted(crds.glob("*.yaml")):
            name = yaml.safe_load(crd.read_text())["metadata"]["name"]
            self.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
        log(f"lws-controller: CRDs applied from {crds}")

    def lws_webhook_manifests(self) -> list[dict[str, Any]]:
        """The controller's webhook configurations, pointed at its loopback server by URL. The pod
        webhooks only see LeaderWorkerSet pods (the objectSelector of the project's own patches)."""
        source = LWS_DIR / "config" / "webhook" / "manifests.yaml"
        ca = self._b64(self.p.pki / "ca.crt")
        docs = [d for d in yaml.safe_load_all(source.read_text()) if d]
        out = []
        for doc in docs:
            for hook in doc["webhooks"]:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://{HOST}:{LWS_WEBHOOK_PORT}{path}", "caBundle": ca}
                if any(r.get("resources") == ["pods"] for r in hook.get("rules", [])):
                    hook["objectSelector"] = {"matchExpressions": [
                        {"key": "leaderworkerset.sigs.k8s.io/name", "operator": "Exists"}]}
            doc["metadata"] = {"name": LWS_WEBHOOKS[doc["kind"]],
                               "labels": {"app.kubernetes.io/managed-by": "disagg-local-cluster"}}
            out.append(doc)
        return out

    def register_lws_webhooks(self) -> None:
        text = "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in self.lws_webhook_manifests())
        (self.p.lws / "webhooks.yaml").write_text(text)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(self.p.lws / "webhooks.yaml"))
        log(f"lws-controller: webhooks registered at https://{HOST}:{LWS_WEBHOOK_PORT}")

    def unregister_lws_webhooks(self) -> None:
        """Before the controller stops: with it gone, Fail-policy webhooks would refuse LWS objects."""
        if self._apiserver_health() is not None:
            return
        for kind, name in LWS_WEBHOOKS.items():
            self.kubectl("delete", kind.lower(), name, "--ignore-not-found", "--wait=false", check=False)
        log("lws-controller: webhooks unregistered")

    def start_lws(self) -> None:
        self.prepare_lws()
        self.start("lws-controller")
        self.register_lws_webhooks()

    # ---------------------------------------------------------------- kubernetes objects

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        from kubernetes import config as kconfig

        loader: Any = kconfig.new_client_from_config
        return loader(config_file=str(kubeconfig or self.p.kubeconfig))

    def ensure_nodes(self) -> list[str]:
        from kubernetes import client as kclient

        api: Any = kclient.CoreV1Api(self.api_client())
        names: list[str] = []
        created = updated = 0
        for body in node_manifests():
            name = body["metadata"]["name"]
            names.append(name)
            try:
                current = api.read_node(name)
            except kclient.ApiException as e:
                if e.status != 404:
                    raise
                api.create_node(body)
                created += 1
                continue
            want_labels = body["metadata"]["labels"]
            have_labels = current.metadata.labels or {}
            stale = {k: None for k in have_labels if k not in want_labels and _ours(k)}
            if stale or any(have_labels.get(k) != v for k, v in want_labels.items()):
                api.patch_node(name, {"metadata": {"labels": {**want_labels, **stale}}})
                updated += 1
            want_taints = body["spec"]["taints"]
            have_taints = [t.to_dict() for t in (current.spec.taints or [])]
            for taint in want_taints:
                if not any(t.get("key") == taint["key"] and t.get("effect") == taint["effect"] for t in have_taints):
                    taints = [*(t for t in have_taints if t.get("key")), *want_taints]
                    api.patch_node(name, {"spec": {"taints": taints}})
                    updated += 1
                    break
            want_alloc = body["status"]["allocatable"]
            have_alloc = current.status.allocatable or {}
            if any(_qty(have_alloc.get(k)) != _qty(v) for k, v in want_alloc.items()):
                api.patch_node_status(
                    name,
                    {"status": {"capacity": body["status"]["capacity"], "allocatable": want_alloc}},
                )
                updated += 1
        if created or updated:
            log(f"nodes: created {created}, updated {updated}, total {len(names)}")
        else:
            log(f"nodes: all {len(names)} already present")
        return names

    def wait_nodes_ready(self, names: list[str], timeout: float = 180.0) -> None:
        from kubernetes import client as kclient

        api: Any = kclient.CoreV1Api(self.api_client())
        t0 = time.monotonic()
        pending = list(names)
        while time.monotonic() - t0 < timeout:
            nodes = {n.metadata.name: n for n in api.list_node().items}
            pending = [n for n in names if n not in nodes or not _node_ready(nodes[n])]
            if not pending:
                log(f"nodes: {len(names)} Ready and schedulable after {time.monotonic() - t0:.1f}s")
                return
            time.sleep(1)
        raise ClusterError(
            f"nodes not Ready (or still tainted not-ready) after {timeout:.0f}s: {', '.join(pending)}; "
            f"kwok log:\n{tail(self.p.log('kwok'))}\nkube-controller-manager log:\n"
            f"{tail(self.p.log('kube-controller-manager'))}"
        )

    def warm_pod_ips(self, node: str, timeout: float = 60.0) -> None:
        """Run one pod through kwok before any other. kwok v0.8.0 creates its pod IP pool on first use
        with a load-then-store (pod_controller.go, ipPool): pods given IPs at the same moment on a fresh
        kwok can each create a pool and get the same address (seen: a service's prefill and decode pods
        both 127.100.0.1, so the engine fleet could serve only one). Once the pool exists, allocation is
        serialised."""
        from kubernetes import client as kclient

        api: Any = kclient.CoreV1Api(self.api_client())
        name = "kwok-ip-pool-warmup"
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, "containers": [{"name": "warmup", "image": "kwok-warmup"}]}}
        try:
            api.create_namespaced_pod("default", body)
        except kclient.ApiException as e:
            if e.status != 409:
                raise
        t0 = time.monotonic()
        try:
            while not (api.read_namespaced_pod(name, "default").status.pod_ip or ""):
                if time.monotonic() - t0 > timeout:
                    raise ClusterError(f"pod default/{name} on {node} got no IP from kwok within {timeout:.0f}s; "
                                       f"kwok log:\n{tail(self.p.log('kwok'))}")
                time.sleep(0.2)
        finally:
            with contextlib.suppress(kclient.ApiException):
                api.delete_namespaced_pod(name, "default", grace_period_seconds=0)

    def spread_pod_ips(self, node: str, count: int = SPREAD_POD_IPS, timeout: float = 120.0) -> None:
        """Give kwok's pod IP pool `count` free addresses to pick from. kwok v0.8.0 hands out a freed address
        before a new one (utils.go, ipPool.Get: any of the `usable` set), so a pod made to replace a deleted one
        would get its address again at once, where CNIs avoid that (host-local allocates round-robin from the
        last address it gave, the AWS VPC CNI keeps a freed address 30 s). An engine's peers tell engines apart
        by address (a restarted one at the same address crashes them: vllm#49238, smg#2503), so the lab needs
        addresses that are not reused at once: with `count` free ones, a new pod takes a given one rarely."""
        from kubernetes import client as kclient

        api: Any = kclient.CoreV1Api(self.api_client())
        names = [f"kwok-ip-spread-{i}" for i in range(count)]
        for name in names:
            body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                    "spec": {"nodeName": node, "containers": [{"name": "spread", "image": "kwok-ip-spread"}]}}
            with contextlib.suppress(kclient.ApiException):
                api.create_namespaced_pod("default", body)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < timeout:
                pods = api.list_namespaced_pod("default", label_selector="").items
                given = {p.metadata.name for p in pods if p.metadata.name in names and p.status.pod_ip}
                if len(given) == len(names):
                    break
                time.sleep(0.5)
        finally:
            for name in names:
                with contextlib.suppress(kclient.ApiException):
                    api.delete_namespaced_pod(name, "default", grace_period_seconds=0)

    def wait_default_sa(self, timeout: float = 120.0) -> None:
        from kubernetes import client as kclient

        api: Any = kclient.CoreV1Api(self.api_client())
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                api.read_namespaced_service_account("default", "default")
                return
            except kclient.ApiException as e:
                if e.status != 404:
                    raise
            time.sleep(0.5)
        raise ClusterError(
            f"ServiceAccount default/default did not appear within {timeout:.0f}s; kube-controller-manager "
            f"log:\n{tail(self.p.log('kube-controller-manager'))}"
        )


def _ours(label: str) -> bool:
    """Labels this tool manages on its nodes (others' labels are left alone)."""
    prefixes = ("nvidia.com/", "amd.com/", "karpenter.k8s.aws/", "feature.node.kubernetes.io/", "disagg.dev/",
                "topology.k8s.aws/", "network.topology.nvidia.com/", "cloud.google.com/gce-topology")
    return label.startswith(prefixes)


def _qty(value: Any) -> Any:
    """A resource quantity as a number ("2040Gi" == "2088960Mi"), None when absent or unparsable."""
    from kubernetes.utils import parse_quantity

    parse: Any = parse_quantity
    try:
        return None if value is None else parse(value)
    except ValueError:
        return None


def _node_ready(node: Any) -> bool:
    ready = any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))
    tainted = any(
        t.key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable") for t in (node.spec.taints or [])
    )
    return ready and not tainted


# ----------------------------------------------------------------------------------------------------
# fake nodes from the catalogue


def load_catalog() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(CATALOG.read_text())
    accelerators = data.get("accelerators") if isinstance(data, dict) else None
    if not isinstance(accelerators, dict):
        raise ClusterError(f"{CATALOG}: no `accelerators:` mapping")
    return accelerators


def _vendor_labels(type_name: str, entry: dict[str, Any], count: int) -> dict[str, str]:
    """Labels the vendor's node-labelling components put on such a node (GPU feature discovery etc.)."""
    vendor = entry.get("vendor", "")
    specs = entry.get("specs") or {}
    mem = float(specs.get("memoryBytes", 0))
    labels: dict[str, str] = {}
    if vendor == "nvidia":  # NVIDIA GPU feature discovery
        product = str((entry.get("nodeLabels") or {}).get("nvidia.com/gpu.product", type_name))
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.count": str(count),
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": str(int(mem / 2**20)),  # MiB, as GFD reports it
                "nvidia.com/gpu.replicas": "1",
            }
        )
        family = next((f for key, f in NVIDIA_FAMILY.items() if key in product), None)
        if family:
            labels["nvidia.com/gpu.family"] = family
    elif vendor == "amd":  # AMD GPU operator (NFD rule + node labeller)
        labels["feature.node.kubernetes.io/amd-gpu"] = "true"
        labels["amd.com/gpu.vram"] = f"{round(mem / 1e9)}G"
        if type_name in AMD_DEVICE_ID:
            labels["amd.com/gpu.device-id"] = AMD_DEVICE_ID[type_name]
    elif vendor == "aws":  # what Karpenter puts on accelerator instances
        labels.update(
            {
                "karpenter.k8s.aws/instance-accelerator-manufacturer": "aws",
                "karpenter.k8s.aws/instance-accelerator-name": type_name.removeprefix("aws-"),
                "karpenter.k8s.aws/instance-accelerator-count": str(count),
            }
        )
    return labels


def _node(name: str, instance_type: str, zone: str, labels: dict[str, str], extended: dict[str, str]) -> dict[str, Any]:
    cpu, mem_gi = INSTANCE_SIZES.get(instance_type, DEFAULT_SIZE)
    capacity = {
        "cpu": str(cpu),
        "memory": f"{mem_gi}Gi",
        "pods": "110",
        "ephemeral-storage": "500Gi",
        **extended,
    }
    # kubelet reservations: allocatable is a little below capacity, as on real nodes
    allocatable = {
        **capacity,
        "cpu": f"{cpu * 1000 - 500}m",
        "memory": f"{mem_gi * 1024 - 8 * 1024}Mi",
        "ephemeral-storage": "480Gi",
    }
    all_labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": instance_type,
        "topology.kubernetes.io/region": "local",
        "topology.kubernetes.io/zone": zone,
        **labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": all_labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
        },
        # accelerator nodes are tainted with their resource name, as managed GPU node pools are:
        # only pods that request the accelerator (and so tolerate it) land there
        "spec": {"taints": [{"key": k, "value": "present", "effect": "NoSchedule"} for k in extended
                            if k != RDMA_RESOURCE]},
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
                "bootID": "",
                "containerRuntimeVersion": "",
                "kernelVersion": "",
                "machineID": "",
                "osImage": "",
                "systemUUID": "",
            },
            "phase": "Running",
        },
    }


def node_manifests() -> list[dict[str, Any]]:
    catalog = load_catalog()
    nodes: list[dict[str, Any]] = []
    for type_name, count in NODE_POOLS.items():
        entry = catalog.get(type_name)
        if not isinstance(entry, dict):
            raise ClusterError(f"{CATALOG}: accelerator type {type_name!r} is missing")
        per_node = int(entry["perNode"])
        instance_type = str(entry["instanceTypes"][0])
        labels = {
            **{k: str(v) for k, v in (entry.get("nodeLabels") or {}).items()},
            **_vendor_labels(type_name, entry, per_node),
        }
        domain_label = next(iter(entry.get("topologyLabels") or []), None)
        for i in range(count):
            # a domain never spans zones: pairs of consecutive nodes, zone by pair
            domain = i // DOMAIN_SIZE
            node_labels = dict(labels)
            if domain_label:
                node_labels[domain_label] = f"nn-{domain}"  # shared across types: prefill pairs with decode
            nodes.append(
                _node(
                    f"{type_name}-{i}",
                    instance_type,
                    f"local-{'ab'[domain % 2]}",
                    node_labels,
                    {
                        str(entry["resourceName"]): str(per_node),
                        **({RDMA_RESOURCE: RDMA_PER_NODE} if type_name in RDMA_TYPES else {}),
                    },
                )
            )
    for i in range(CPU_NODES):
        nodes.append(_node(f"cpu-{i}", CPU_INSTANCE_TYPE, f"local-{'ab'[i % 2]}", {}, {}))
    return nodes


# ----------------------------------------------------------------------------------------------------
# commands


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One `up`/`down`/restart at a time per cluster dir (e.g. parallel test sessions)."""
    lock = root.parent / f".{root.name}.lock"
    root.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_prometheus_installed() -> None:
    if shutil.which("prometheus"):
        return
    if os.geteuid() != 0:
        raise ClusterError(
            "prometheus is not installed; run: sudo apt-get update && "
            "sudo apt-get install -y --no-install-recommends prometheus"
        )
    log("prometheus: not installed; installing the Debian package (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
    ):
        r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, check=False)
        if r.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed with code {r.returncode}")
    # the package enables a system service on :9090; this tool runs its own Prometheus instead
    if Path("/run/systemd/system").exists():
        subprocess.run(["systemctl", "disable", "--now", "prometheus"], capture_output=True, check=False)
    elif Path("/etc/init.d/prometheus").exists():
        subprocess.run(["/etc/init.d/prometheus", "stop"], capture_output=True, check=False)


def stop_system_prometheus_if_conflicting(root: Path) -> None:
    """The Debian package's own service (if something started it) would hold :9090; stop it."""
    owner = port_owner(PROMETHEUS_PORT)
    if owner is None:
        return
    _, argv = owner
    if not argv[0].endswith("prometheus") or any(str(root) in a for a in argv):
        return
    log(
        f"prometheus: a Prometheus not started by this tool holds :{PROMETHEUS_PORT} ({describe(owner)}); "
        "stopping the system service"
    )
    if Path("/run/systemd/system").exists():
        subprocess.run(["systemctl", "disable", "--now", "prometheus"], capture_output=True, check=False)
    elif Path("/etc/init.d/prometheus").exists():
        subprocess.run(["/etc/init.d/prometheus", "stop"], capture_output=True, check=False)
    for _ in range(20):
        if port_owner(PROMETHEUS_PORT) is None:
            return
        time.sleep(0.5)


BIN_LINKS = {
    "kubectl": K8S_BIN / "kubectl",
    "kube-apiserver": K8S_BIN / "kube-apiserver",
    "kube-controller-manager": K8S_BIN / "kube-controller-manager",
    "kube-scheduler": K8S_BIN / "kube-scheduler",
    "etcd": ETCD_BIN / "etcd",
    "kwok": KWOK_DIR / "bin" / "kwok",
    "helm": HELM_BIN / "helm",
    "lws-controller": LWS_DIR / "bin" / "lws-controller",
}


def link_bin_dir() -> Path:
    """`<cache>/bin` with symlinks to the built binaries of the pinned versions (for PATH)."""
    bindir = CACHE / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, target in BIN_LINKS.items():
        link = bindir / name
        if not target.exists():
            continue
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = bindir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)
    return bindir


def run_build(no_build: bool) -> None:
    if no_build:
        return
    script = REPO / "hack" / "build-binaries.sh"
    log(f"building/checking binaries: {script} all")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(script), "all"], stdout=sys.stderr, stderr=sys.stderr, check=False)
    if r.returncode != 0:
        raise ClusterError(f"hack/build-binaries.sh failed with code {r.returncode} (see its output above)")
    log(f"binaries ready ({time.monotonic() - t0:.1f}s)")


def cmd_up(args: argparse.Namespace) -> int:
    root = cluster_dir()
    t0 = time.monotonic()
    with locked(root):
        c = Cluster(root)
        if root.exists() and all(c.is_healthy(n)[0] for n in COMPONENT_ORDER):
            log(f"cluster in {root} is already up and healthy")
            c.register_lws_webhooks()  # idempotent: brings their manifest up to this checkout's
            names = c.ensure_nodes()
            c.wait_nodes_ready(names)
        else:
            run_build(args.no_build)
            ensure_prometheus_installed()
            root.mkdir(parents=True, exist_ok=True)
            (root / MARKER).write_text("created by hack/cluster.py\n")
            c.write_pki()
            c.write_kubeconfigs()
            c.write_prometheus_config()
            c.write_kwok_stages()
            for name in COMPONENT_ORDER:
                if name == "prometheus":
                    continue
                if name == "lws-controller":
                    c.start_lws()
                    continue
                c.start(name)
            names = c.ensure_nodes()
            c.wait_nodes_ready(names)
            c.wait_default_sa()
            c.warm_pod_ips(next((n for n in names if n.startswith("cpu-")), names[0]))
            c.spread_pod_ips(next((n for n in names if n.startswith("cpu-")), names[0]))
            stop_system_prometheus_if_conflicting(root)
            c.start("prometheus")
            log(
                f"cluster up in {time.monotonic() - t0:.1f}s: {len(names)} nodes; prometheus "
                f"http://{HOST}:{PROMETHEUS_PORT} (targets file {c.p.engines_file})"
            )
            log(f"kubectl, helm, ...: export PATH={link_bin_dir()}:$PATH")
    print(f"export KUBECONFIG={c.p.kubeconfig}", flush=True)
    return 0


def stop_extras(pids: Path) -> None:
    """Stops processes others started for this cluster (the demo's operator and engine fleet):
    pid files `extra-*.pid` in the pids dir, only if the process still runs a disagg command."""
    for pidfile in sorted(pids.glob("extra-*.pid")):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pidfile.read_text().strip())
            argv = _proc_argv(pid)
            if argv is not None and any("disagg" in part for part in argv):
                log(f"{pidfile.stem.removeprefix('extra-')}: stopping pid {pid}")
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    _reap(pid)
                    if _proc_argv(pid) is None:
                        break
                    time.sleep(0.1)
        pidfile.unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace) -> int:
    root = cluster_dir()
    t0 = time.monotonic()
    with locked(root):
        if not root.exists():
            log(f"{root} does not exist; nothing to do")
            return 0
        if not (root / MARKER).exists():
            raise ClusterError(f"{root} has no {MARKER} marker: not a cluster dir of this tool; not touching it")
        c = Cluster(root)
        stop_extras(c.p.pids)
        if c.running_pid("lws-controller") is not None:
            c.unregister_lws_webhooks()
        for name in reversed(COMPONENT_ORDER):  # etcd last
            c.stop(name)
        shutil.rmtree(root)
        log(f"cluster down, {root} removed ({time.monotonic() - t0:.1f}s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    c = Cluster(cluster_dir())
    ok = True
    for name in COMPONENT_ORDER:
        pid = c.running_pid(name)
        healthy, detail = c.is_healthy(name)
        ok = ok and healthy
        print(
            f"{name:<24} pid {pid if pid is not None else '-':<8} {'healthy' if healthy else 'UNHEALTHY'}"
            + ("" if healthy else f"  ({detail})")
        )
    if c.is_healthy("kube-apiserver")[0]:
        with contextlib.suppress(Exception):
            from kubernetes import client as kclient

            nodes = kclient.CoreV1Api(c.api_client()).list_node().items
            ready = sum(1 for n in nodes if _node_ready(n))
            print(f"{'nodes':<24} {ready}/{len(nodes)} Ready")
    print(f"{'kubeconfig':<24} {c.p.kubeconfig}")
    return 0 if ok else 1


def cmd_env(args: argparse.Namespace) -> int:
    kubeconfig = Paths(cluster_dir()).kubeconfig
    if not kubeconfig.exists():
        log(f"warning: {kubeconfig} does not exist yet (run `hack/cluster.py up`)")
    print(f"export KUBECONFIG={kubeconfig}")
    return 0


def cmd_bin_dir(args: argparse.Namespace) -> int:
    bindir = link_bin_dir()
    missing = [n for n, target in BIN_LINKS.items() if not target.exists()]
    if missing:
        log(f"warning: not built yet: {', '.join(missing)} (run `hack/cluster.py up` or hack/build-binaries.sh)")
    print(bindir)
    return 0


def cmd_sa_kubeconfig(args: argparse.Namespace) -> int:
    from kubernetes import client as kclient

    c = Cluster(cluster_dir())
    if not c.p.kubeconfig.exists():
        raise ClusterError(f"no cluster in {c.p.root} (run `hack/cluster.py up`)")
    api: Any = kclient.CoreV1Api(c.api_client())
    if args.create:
        with contextlib.suppress(kclient.ApiException):
            api.create_namespaced_service_account(args.namespace, {"metadata": {"name": args.service_account}})
    try:
        tr = api.create_namespaced_service_account_token(
            args.service_account,
            args.namespace,
            kclient.AuthenticationV1TokenRequest(
                spec=kclient.V1TokenRequestSpec(audiences=[], expiration_seconds=int(args.duration))
            ),
        )
    except kclient.ApiException as e:
        raise ClusterError(
            f"TokenRequest for {args.namespace}/{args.service_account} failed: "
            f"{e.status} {e.reason}: {(e.body or '')[:300]}"
        ) from e
    user = f"system:serviceaccount:{args.namespace}:{args.service_account}"
    cfg = c.kubeconfig_dict(user, {"token": tr.status.token})
    out = Path(args.out).resolve()
    c._write_private(out, yaml.safe_dump(cfg, sort_keys=False))
    log(f"wrote {out} for {user} (token expires {tr.status.expiration_timestamp})")
    print(out)
    return 0


def _single(name: str, action: str) -> int:
    root = cluster_dir()
    with locked(root):
        c = Cluster(root)
        if not (root / MARKER).exists():
            raise ClusterError(f"no cluster in {root} (run `hack/cluster.py up`)")
        if action in ("stop", "restart"):
            if name == "lws-controller":
                c.unregister_lws_webhooks()
            c.stop(name)
        if action in ("start", "restart"):
            c.write_pki()  # only writes what is missing
            if name == "prometheus":
                ensure_prometheus_installed()
                c.write_prometheus_config()
                stop_system_prometheus_if_conflicting(root)
            if name == "lws-controller":
                c.write_kubeconfigs()
                c.start_lws()
                return 0
            if name == "kwok":
                c.write_kwok_stages()
            c.start(name)
    return 0


def cmd_spread_pod_ips(args: argparse.Namespace) -> int:
    root = cluster_dir()
    with locked(root):
        if not (root / MARKER).exists():
            raise ClusterError(f"no cluster in {root} (run `hack/cluster.py up`)")
        c = Cluster(root)
        node = next((b["metadata"]["name"] for b in node_manifests() if b["metadata"]["name"].startswith("cpu-")), None)
        if node is None:
            raise ClusterError("no cpu- node to place the pods on")
        c.spread_pod_ips(node)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/cluster.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build (cached) and start the cluster, nodes and Prometheus; idempotent")
    up.add_argument("--no-build", action="store_true", help="do not run hack/build-binaries.sh")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `up` started (etcd last) and remove the cluster dir").set_defaults(
        func=cmd_down
    )
    sub.add_parser("status", help="each component with pid and health; exit 0 only if all healthy").set_defaults(
        func=cmd_status
    )
    sub.add_parser("env", help="print export KUBECONFIG=...").set_defaults(func=cmd_env)
    sub.add_parser("bin-dir", help="print a directory with kubectl, helm, etcd, kwok, ... for PATH").set_defaults(
        func=cmd_bin_dir
    )
    sa = sub.add_parser("sa-kubeconfig", help="kubeconfig with a TokenRequest token of a ServiceAccount")
    sa.add_argument("--namespace", "-n", required=True)
    sa.add_argument("--service-account", required=True)
    sa.add_argument("--out", required=True)
    sa.add_argument("--duration", type=int, default=7200, help="token lifetime in seconds (default 2h)")
    sa.add_argument("--create", action="store_true", help="create the ServiceAccount if it does not exist")
    sa.set_defaults(func=cmd_sa_kubeconfig)
    sub.add_parser("prometheus-stop", help="stop only Prometheus").set_defaults(
        func=lambda a: _single("prometheus", "stop")
    )
    sub.add_parser("prometheus-start", help="start only Prometheus").set_defaults(
        func=lambda a: _single("prometheus", "start")
    )
    sub.add_parser("apiserver-restart", help="stop and start kube-apiserver only").set_defaults(
        func=lambda a: _single("kube-apiserver", "restart")
    )
    sub.add_parser("lws-restart", help="stop and start the LeaderWorkerSet controller only").set_defaults(
        func=lambda a: _single("lws-controller", "restart")
    )
    sub.add_parser("kwok-restart", help="stop and start kwok only (rewriting its pod-delete stage)").set_defaults(
        func=lambda a: _single("kwok", "restart")
    )
    sub.add_parser("spread-pod-ips", help="give kwok's pod IP pool free addresses (after a kwok restart)").set_defaults(
        func=cmd_spread_pod_ips
    )
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ClusterError as e:
        print(f"!!! [cluster] error: {e}", file=sys.stderr, flush=True)
        if args.command == "up":
            print(
                "!!! [cluster] what started so far keeps running for inspection; logs are in "
                f"{Paths(cluster_dir()).logs}; `hack/cluster.py down` stops it all",
                file=sys.stderr,
                flush=True,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
