"""`disagg-lab routers`: the real router binary of every router pod, run as its kubelet would run it.

kwok pods run no process. For each Running router pod (`disagg.dev/role=router`, managed by disagg) with
a loopback IP, this supervisor:

- installs the router's PyPI package at the version the engine-flag tests pin (vllm-router 0.1.17,
  sglang-router 0.3.2) once into ~/.cache/disagg/routers/<package>-<version>/ (a virtualenv), and picks
  it from the container's command (`vllm-router ...`, `python3 -m sglang_router.launch_router ...`);
- runs exactly the container's command and arguments with its environment, as the kubelet builds them:
  literal values and the downward API (`fieldRef`), `$(VAR)` references expanded from the variables
  before, `$$` escaping a `$`. One translation: a wildcard listen address (`0.0.0.0`) means all of the
  pod's interfaces, and a pod here has exactly one, its loopback IP, so the wildcard becomes that IP.
  The process's executables resolve through the package's virtualenv first, as through an image's PATH;
- gives it the credentials of the pod's ServiceAccount, as a projected token would: a TokenRequest token
  bound to the pod, in a token file named by a kubeconfig in `KUBECONFIG` (both routers build their
  Kubernetes client with kube-rs `Client::try_default()`, which reads `KUBECONFIG` before trying the
  in-cluster files), renewed every 20 minutes. A permission the rendered Role lacks fails discovery;
- probes it as the kubelet does, with the container's own readiness and liveness probes (httpGet path
  and port, period, timeout, thresholds, initial delay): the pod's `Ready` condition (and
  `ContainersReady`, the container status) follows the readiness probe from NotReady at start; a
  liveness failure or an exit restarts the process after a back-off (1 s doubling to 30 s; the
  kubelet's is 10 s to 5 min), counting `restartCount`;
- terminates it as the kubelet does when the pod is deleted: the container's preStop hook (a sleep, as the
  operator renders it), then SIGTERM, then SIGKILL when the pod's grace period ends (both routers drain on
  SIGTERM: they stop accepting and finish what is in flight); a finalizer of the lab's keeps the pod until
  then (kwok would remove it at once). A pod that stops Running without being deleted is stopped at once.

Logs per pod: <log dir>/<namespace>_<pod>.log (default <cluster dir>/lab/routers/). Bounded: at most
`--max-routers` processes; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from disagg.wellknown import MANAGED_SELECTOR, ROLE_LABEL, ROUTER
from disagg_lab.kube import Event, PodObservation, Watcher, admin_client, is_loopback
from disagg_lab.kubelet import FINALIZER, PodApi, run_hook
from disagg_lab.podspec import container_env, deletion_deadline, expand, grace_seconds, prestop_hook

log = logging.getLogger("disagg_lab.routers")

ROUTER_SELECTOR = f"{MANAGED_SELECTOR},{ROLE_LABEL}={ROUTER}"
ROUTER_PACKAGES: dict[str, str] = {"vllm-router": "0.1.17", "sglang-router": "0.3.2"}
"""PyPI package -> the version tests/data/engine_flags/ records (tests/unit/test_lab_routers.py checks)."""
TOKEN_SECONDS = 3600
TOKEN_RENEW_S = 1200.0
BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 30.0
STOP_GRACE_S = 5.0
MAX_ROUTERS = 32
WILDCARD = "0.0.0.0"


def cache_dir() -> Path:
    return Path(os.environ.get("DISAGG_CACHE", str(Path.home() / ".cache" / "disagg"))) / "routers"


def default_state_dir() -> Path:
    return Path(os.environ.get("DISAGG_CLUSTER_DIR") or "/tmp/disagg-cluster") / "lab" / "routers"


def router_package(argv: list[str]) -> str | None:
    """Which router package a container's command runs."""
    if argv and Path(argv[0]).name == "vllm-router":
        return "vllm-router"
    if any("sglang_router" in part for part in argv[:3]):
        return "sglang-router"
    return None


def ensure_router(package: str, version: str, root: Path | None = None) -> Path:
    """The virtualenv holding `package==version`, installed on first use (a lock serialises installers)."""
    venv = (root or cache_dir()) / f"{package}-{version}"
    marker = venv / ".installed"
    if marker.exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{package}-{version}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv
        log.info("installing %s==%s into %s (once per version)", package, version, venv)
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                               "--progress-bar", "off", "-q", f"{package}=={version}"],
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {package}=={version} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        marker.write_text(f"{package}=={version}\n")
    return venv


def container_argv(pod: Any, container: Any, env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded and the wildcard listen address made the pod's IP."""
    ip = pod.status.pod_ip
    argv = [expand(part, env) for part in [*(container.command or []), *(container.args or [])]]
    return [ip if part == WILDCARD else part for part in argv]


@dataclass(frozen=True)
class Probe:
    """An httpGet probe of the container."""

    path: str
    port: int
    period_s: float
    timeout_s: float
    failure_threshold: int
    success_threshold: int
    initial_delay_s: float

    @classmethod
    def of(cls, probe: Any, container: Any) -> Probe | None:
        if probe is None or probe.http_get is None:
            return None
        port = probe.http_get.port
        if isinstance(port, str) and not port.isdigit():
            named = {p.name: p.container_port for p in container.ports or []}
            if port not in named:
                raise ValueError(f"probe port {port!r} names no container port")
            port = named[port]
        return cls(path=probe.http_get.path or "/", port=int(port), period_s=float(probe.period_seconds or 10),
                   timeout_s=float(probe.timeout_seconds or 1), failure_threshold=int(probe.failure_threshold or 3),
                   success_threshold=int(probe.success_threshold or 1),
                   initial_delay_s=float(probe.initial_delay_seconds or 0))


@dataclass
class Router:
    """One router pod and its process."""

    uid: str
    namespace: str
    name: str
    pod: Any
    directory: Path
    restarts: int = 0
    ready: bool | None = None
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    terminating: asyncio.Task[None] | None = None
    finalized: bool = False
    last_probe: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Supervisor:
    """Runs and probes the router of every Running router pod it watches."""

    def __init__(self, *, namespaces: list[str] | None, kubeconfig: str | None, state_dir: Path,
                 max_routers: int = MAX_ROUTERS, install_root: Path | None = None) -> None:
        self.namespaces = namespaces
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.max_routers = max_routers
        self.install_root = install_root
        self.pods: dict[str, Any] = {}
        self.routers: dict[str, Router] = {}
        self.problems: dict[str, str] = {}
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._thread_stop = threading.Event()
        self._api: Any = None
        self._http: aiohttp.ClientSession | None = None
        self.pod_api: PodApi | None = None

    # -- kubernetes

    def client(self) -> Any:
        return admin_client(self.kubeconfig)

    @property
    def core(self) -> Any:
        from kubernetes import client as kclient

        if self._api is None:
            self._api = self.client()
        return kclient.CoreV1Api(self._api)

    def apply(self, event: Event) -> None:
        if event.type == "SYNC":
            seen = {p.metadata.uid for p in event.items}
            for uid, pod in list(self.pods.items()):
                if (event.scope is None or pod.metadata.namespace == event.scope) and uid not in seen:
                    del self.pods[uid]
        for pod in event.items:
            if event.type == "DELETED":
                self.pods.pop(pod.metadata.uid, None)
            else:
                self.pods[pod.metadata.uid] = pod

    def wanted(self, pod: Any) -> bool:
        """A Running pod with a loopback IP (a deleted one too: its router drains until the grace ends)."""
        status = pod.status
        return status is not None and status.phase == "Running" and bool(status.pod_ip) and is_loopback(status.pod_ip)

    async def patch_status(self, router: Router, ready: bool, running: bool, reason: str, message: str) -> None:
        """The pod's Ready/ContainersReady conditions and container status, as the kubelet reports them."""
        container = router.pod.spec.containers[0]
        condition = "True" if ready else "False"
        state: dict[str, Any] = ({"running": {"startedAt": _now()}} if running
                                 else {"waiting": {"reason": reason, "message": message[:300]}})
        body = {"status": {
            "conditions": [
                {"type": "Ready", "status": condition, "lastTransitionTime": _now(),
                 "reason": None if ready else reason, "message": None if ready else message[:300]},
                {"type": "ContainersReady", "status": condition, "lastTransitionTime": _now(),
                 "reason": None if ready else reason, "message": None if ready else message[:300]},
            ],
            "containerStatuses": [{
                "name": container.name, "image": container.image, "imageID": "", "ready": ready,
                "started": running, "restartCount": router.restarts, "state": state,
            }],
        }}
        try:
            await asyncio.to_thread(self.core.patch_namespaced_pod_status, router.name, router.namespace, body,
                                    _request_timeout=10)
            router.ready = ready
        except Exception as error:  # the pod may be gone; the next observation decides
            log.info("%s: status patch failed: %s", router.ref, str(error).splitlines()[0][:200])

    # -- credentials

    async def write_credentials(self, router: Router) -> Path:
        """A TokenRequest token of the pod's ServiceAccount, bound to the pod, and a kubeconfig naming it."""
        from kubernetes import client as kclient

        pod = router.pod
        account = pod.spec.service_account_name or "default"
        request = kclient.AuthenticationV1TokenRequest(spec=kclient.V1TokenRequestSpec(
            audiences=[], expiration_seconds=TOKEN_SECONDS,
            bound_object_ref=kclient.V1BoundObjectReference(kind="Pod", api_version="v1", name=router.name,
                                                            uid=router.uid)))
        issued = await asyncio.to_thread(self.core.create_namespaced_service_account_token, account,
                                         router.namespace, request, _request_timeout=10)
        token = router.directory / "token"
        tmp = token.with_suffix(".tmp")
        tmp.write_text(issued.status.token)
        tmp.chmod(0o600)
        tmp.replace(token)
        configuration = self._api.configuration
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": configuration.host,
                                                        "certificate-authority": str(router.directory / "ca.crt")}}],
            "users": [{"name": f"system:serviceaccount:{router.namespace}:{account}",
                       "user": {"tokenFile": str(token)}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "namespace": router.namespace,
                                                       "user": f"system:serviceaccount:{router.namespace}:{account}"}}],
            "current-context": "local",
        }
        ca = configuration.ssl_ca_cert
        if ca:
            shutil.copyfile(ca, router.directory / "ca.crt")
        path = router.directory / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
        path.chmod(0o600)
        return path

    # -- one router

    async def probe(self, router: Router, probe: Probe) -> tuple[bool, str]:
        assert self._http is not None
        url = f"http://{router.pod.status.pod_ip}:{probe.port}{probe.path}"
        try:
            async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=probe.timeout_s)) as response:
                text = (await response.text())[:200]
                return 200 <= response.status < 400, f"HTTP {response.status} {text}"
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return False, f"{type(error).__name__}: {error}"

    async def _start(self, router: Router) -> asyncio.subprocess.Process:
        pod = router.pod
        container = pod.spec.containers[0]
        env = container_env(pod, container)
        argv = container_argv(pod, container, env)
        package = router_package(argv)
        if package is None:
            raise ValueError(f"the container's command {argv[:3]} runs neither vllm-router nor sglang-router")
        venv = await asyncio.to_thread(ensure_router, package, ROUTER_PACKAGES[package], self.install_root)
        router.directory.mkdir(parents=True, exist_ok=True)
        kubeconfig = await self.write_credentials(router)
        env.update({"KUBECONFIG": str(kubeconfig), "HOME": str(router.directory),
                    "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"})
        executable = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        logfile = self.state_dir / f"{router.namespace}_{router.name}.log"
        with logfile.open("ab") as out:
            out.write(f"===== {_now()} start (restarts {router.restarts}): {' '.join(argv)}\n".encode())
            process = await asyncio.create_subprocess_exec(executable, *argv[1:], env=env, cwd=router.directory,
                                                           stdout=out, stderr=subprocess.STDOUT,
                                                           start_new_session=True)
        log.info("%s: started %s (pid %d) on %s", router.ref, package, process.pid, pod.status.pod_ip)
        return process

    async def _stop_process(self, router: Router, grace_s: float = STOP_GRACE_S) -> None:
        process = router.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=max(0.0, grace_s))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.wait_for(process.wait(), timeout=10)

    async def run_router(self, router: Router) -> None:
        """Start, probe, restart on exit or liveness failure, until the pod goes."""
        backoff = BACKOFF_START_S
        await self.patch_status(router, False, False, "ContainerCreating", "the lab is starting the router")
        while not router.stopping:
            try:
                router.process = await self._start(router)
            except Exception as error:
                self.problems[router.uid] = f"cannot start: {error}"
                log.warning("%s: cannot start the router: %s", router.ref, error)
                await self.patch_status(router, False, False, "CreateContainerError", str(error))
                await self._sleep(router, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self.problems.pop(router.uid, None)
            if not router.finalized and self.pod_api is not None:
                router.finalized = True
                await asyncio.to_thread(self.pod_api.add_finalizer, router.namespace, router.name)
            reason = await self._watch_process(router)
            if router.terminating is not None:  # terminate() signals the process and kills it at the grace end
                while router.process.returncode is None:
                    await asyncio.sleep(0.2)
                break
            await self._stop_process(router)
            if router.stopping:
                break
            router.restarts += 1
            log.warning("%s: %s; restarting in %.0f s", router.ref, reason, backoff)
            await self.patch_status(router, False, False, "CrashLoopBackOff", reason)
            await self._sleep(router, backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
        await self._stop_process(router)

    async def _sleep(self, router: Router, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not router.stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.2, deadline - time.monotonic()))

    async def _watch_process(self, router: Router) -> str:
        """Probes the running process; returns why it must restart."""
        container = router.pod.spec.containers[0]
        readiness = Probe.of(container.readiness_probe, container)
        liveness = Probe.of(container.liveness_probe, container)
        started = time.monotonic()
        next_ready = started + (readiness.initial_delay_s if readiness else 0.0)
        next_live = started + (liveness.initial_delay_s if liveness else 0.0)
        next_renew = started + TOKEN_RENEW_S
        successes = failures = live_failures = 0
        process = router.process
        assert process is not None
        await self.patch_status(router, readiness is None, True, "", "")
        while not router.stopping:
            if process.returncode is not None:
                return f"the router exited with code {process.returncode}"
            now = time.monotonic()
            if readiness is not None and now >= next_ready:
                next_ready = now + readiness.period_s
                ok, detail = await self.probe(router, readiness)
                router.last_probe["readiness"] = detail
                successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
                if ok and successes >= readiness.success_threshold and router.ready is not True:
                    await self.patch_status(router, True, True, "", "")
                elif not ok and failures >= readiness.failure_threshold and router.ready is not False:
                    log.info("%s: readiness probe failed: %s", router.ref, detail)
                    await self.patch_status(router, False, True, "ReadinessProbeFailed",
                                            f"Readiness probe failed: {detail}")
            if liveness is not None and now >= next_live:
                next_live = now + liveness.period_s
                ok, detail = await self.probe(router, liveness)
                router.last_probe["liveness"] = detail
                live_failures = 0 if ok else live_failures + 1
                if live_failures >= liveness.failure_threshold:
                    return f"liveness probe failed {live_failures} times: {detail}"
            if now >= next_renew:
                next_renew = now + TOKEN_RENEW_S
                with contextlib.suppress(Exception):
                    await self.write_credentials(router)
            await asyncio.sleep(0.2)
        return "stopping"

    async def terminate(self, router: Router) -> None:
        """The pod was deleted: preStop hook, SIGTERM, SIGKILL at the grace period's end, then the finalizer
        comes off."""
        loop = asyncio.get_running_loop()
        pod = router.pod
        container = pod.spec.containers[0]
        deadline_unix = deletion_deadline(pod)
        remaining = max(0.0, deadline_unix - time.time()) if deadline_unix is not None else grace_seconds(pod)
        deadline = loop.time() + remaining
        try:
            hook = prestop_hook(pod, container, container_env(pod, container, strict=False))
            if hook is not None:
                observed = PodObservation(uid=router.uid, namespace=router.namespace, name=router.name, service="",
                                          role="decode", ip=str(pod.status.pod_ip), ready=False)
                done = await run_hook(hook, observed, deadline - loop.time())
                log.info("%s: deleted; preStop hook done: %s", router.ref, done)
            router.stopping = True
            await self._stop_process(router, deadline - loop.time())
            if router.task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(router.task, timeout=15)
            log.info("%s: terminated (%.1f s of %.0f s grace)", router.ref, remaining - (deadline - loop.time()),
                     remaining)
        finally:
            self.routers.pop(router.uid, None)
            if self.pod_api is not None:
                await asyncio.to_thread(self.pod_api.remove_finalizer, router.namespace, router.name)

    # -- all routers

    async def reconcile(self) -> None:
        wanted = {uid: pod for uid, pod in self.pods.items() if self.wanted(pod)}
        await self._stop_unwanted(wanted)
        await self._start_wanted(wanted)

    async def _stop_unwanted(self, wanted: dict[str, Any]) -> None:
        """Terminates the routers of deleted pods (their preStop and grace) and stops those of pods gone."""
        for uid, router in list(self.routers.items()):
            pod = wanted.get(uid)
            if pod is not None and pod.metadata.deletion_timestamp is not None:
                if router.terminating is None:
                    router.pod = pod
                    router.terminating = asyncio.create_task(self.terminate(router), name=f"terminate-{router.ref}")
                continue
            if router.terminating is not None:
                continue
            if pod is None or pod.status.pod_ip != router.pod.status.pod_ip:
                router.stopping = True
                if router.task is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(router.task, timeout=STOP_GRACE_S + 15)
                log.info("%s: stopped (the pod is gone or no longer running)", router.ref)
                del self.routers[uid]

    async def _start_wanted(self, wanted: dict[str, Any]) -> None:
        """Starts a router for every wanted pod without one."""
        for uid, pod in sorted(wanted.items(), key=lambda item: (item[1].metadata.namespace, item[1].metadata.name)):
            if uid in self.routers:
                if self.routers[uid].terminating is None:
                    self.routers[uid].pod = pod
                continue
            if pod.metadata.deletion_timestamp is not None:
                if FINALIZER in (pod.metadata.finalizers or []) and self.pod_api is not None:
                    await asyncio.to_thread(self.pod_api.remove_finalizer, pod.metadata.namespace, pod.metadata.name)
                continue
            if len(self.routers) >= self.max_routers:
                self.problems[uid] = f"more than {self.max_routers} router pods: not run"
                continue
            meta = pod.metadata
            router = Router(uid, meta.namespace, meta.name, pod, self.state_dir / f"{meta.namespace}_{meta.name}")
            router.directory.mkdir(parents=True, exist_ok=True)
            router.task = asyncio.create_task(self.run_router(router), name=f"router-{router.ref}")
            self.routers[uid] = router

    async def _consume(self) -> None:
        while not self._stop.is_set():
            try:
                event = await asyncio.wait_for(self._events.get(), timeout=1.0)
                self.apply(event)
                while not self._events.empty():
                    self.apply(self._events.get_nowait())
            except TimeoutError:
                pass
            await self.reconcile()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, duration: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._api = self.client()
        self.pod_api = PodApi(self.client)
        self._http = aiohttp.ClientSession()

        def post(event: Event) -> None:
            loop.call_soon_threadsafe(self._events.put_nowait, event)

        scopes: list[str | None] = list(self.namespaces) if self.namespaces else [None]
        for scope in scopes:
            Watcher("pods", scope, self.client, post, self._thread_stop, selector=ROUTER_SELECTOR,
                    convert=lambda pod: pod).start()
        consumer = asyncio.create_task(self._consume())
        log.info("supervising router pods in %s; logs in %s", ", ".join(self.namespaces or ["all namespaces"]),
                 self.state_dir)
        try:
            if duration:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=duration)
            else:
                await self._stop.wait()
        finally:
            self._thread_stop.set()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer
            for router in self.routers.values():
                router.stopping = True
            tasks = [r.task for r in self.routers.values() if r.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_GRACE_S + 15)
            held = [(p.metadata.namespace, p.metadata.name) for p in self.pods.values()
                    if FINALIZER in (p.metadata.finalizers or [])]
            held += [(r.namespace, r.name) for r in self.routers.values() if r.finalized]
            if held and self.pod_api is not None:
                api = self.pod_api
                await asyncio.gather(*(asyncio.to_thread(api.remove_finalizer, ns, name) for ns, name in set(held)),
                                     return_exceptions=True)
            await self._http.close()
            log.info("stopped")


def routers_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg-lab routers",
        description="Run the real router binary of every Running router pod of the local cluster, with the pod's "
                    "command, arguments, environment and ServiceAccount, on the pod's own IP, probed as the "
                    "kubelet would.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    parser.add_argument("--kubeconfig", default=None, help="an admin kubeconfig (default: $KUBECONFIG)")
    parser.add_argument("--state-dir", default=None, help="logs, tokens and kubeconfigs per pod "
                                                         "(default <cluster dir>/lab/routers)")
    parser.add_argument("--max-routers", type=int, default=MAX_ROUTERS)
    parser.add_argument("--install-only", action="store_true", help="install the pinned router packages and exit")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on signal)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def routers_main(argv: list[str]) -> int:
    args = routers_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s routers: %(message)s", stream=sys.stderr)
    if not args.verbose:
        for noisy in ("aiohttp", "kubernetes"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.install_only:
        for package, version in ROUTER_PACKAGES.items():
            print(ensure_router(package, version))
        return 0
    supervisor = Supervisor(namespaces=args.namespace or None, kubeconfig=args.kubeconfig,
                            state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
                            max_routers=max(1, args.max_routers))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(supervisor.run(args.duration or None))
    return 0
