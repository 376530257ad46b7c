"""The fleet process: one HTTP site per Ready engine pod on the pod's own IP, the simulated engines
behind them (`engines.FleetSim`, stepped every `TICK_S` of the event loop's clock), Kubernetes watches,
the Prometheus targets file, and a control API on 127.0.0.1.

Per pod, on `spec.engine.port`: `/metrics`, `/health` (and `/ping`, `/health_generate`), `/version`,
`/v1/models`, SGLang's `/server_info`, `/model_info` (`/get_model_info`) and `/get_load`, and the
generation endpoints `/v1/completions`, `/v1/chat/completions` and `/generate`, answered at the model's
times (a prefill leg when its batch ends, each decode token when its step ends).

Control API: `PUT /load/NS/NAME` (injected load: `{"rps": 8}`, `{"x": 4}`, `{"spec": "steps:..."}`, with
optional `prompt_tokens`/`output_tokens`), `DELETE /load/NS/NAME`, `GET /load`, `PUT /fault/NS/POD`
(`{"fault": "unhealthy"}`: /health and requests answer 503; `"down"`: nothing listens, as after an
engine crash, and in-flight requests are lost; `"kill"`: the engine process is killed (SIGKILL) and the
kubelet restarts it in place after `restart_s`, a new engine at the same address; `null`: healthy again, a
restarted engine), `GET /state`, `GET /healthz`.

The engine pods' kubelet, as far as kwok does not play it (termination with preStop hook, SIGTERM and
grace period; restarts; readiness), is `kubelet.py`'s, driven from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from disagg_lab.engines import (
    DecodeEngine,
    FleetSim,
    LiveRequest,
    PrefillEngine,
    SimPod,
)
from disagg_lab.kube import (
    Event,
    PodObservation,
    ServiceObservation,
    Watcher,
    admin_client,
    is_loopback,
)
from disagg_lab.kubelet import DEFAULT_RESTART_S, FINALIZER, Container, PodApi, run_hook
from disagg_lab.metrics import EXPOSITION_CONTENT_TYPE
from disagg_lab.offered import MAX_RPS, LoadError, LoadSpec, parse_load_spec, parse_service_key
from disagg_lab.protocol import (
    DECODE_POD_HEADER,
    KV_HEADER,
    PREFILL_POD_HEADER,
    Api,
    Generation,
    Reply,
    error_body,
    parse_generation,
    tokenizer_json,
)
from disagg_lab.targets import target_groups, write_targets

log = logging.getLogger("disagg_lab.fleet")

DEFAULT_CONTROL_PORT = 18090
TICK_S = 0.02
"""How often the engines are stepped; decode tokens are computed one tick ahead and sent on time."""
REQUEST_TIMEOUT_S = 3600.0
"""Longest any one request is kept open (the engines' own deadlines come much sooner)."""
ENGINE_VERSIONS = {"vllm": "0.33.0", "sglang": "0.5.23"}
"""The versions tests/data/engine_flags records."""
FAULTS = ("unhealthy", "down", "kill")


def default_models_dir() -> Path:
    root = os.environ.get("DISAGG_CLUSTER_DIR") or "/tmp/disagg-cluster"
    return Path(root) / "lab" / "models"


class HttpListener:
    """Turns a request's model events into queue items at their due times on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: float) -> None:
        self.loop = loop
        self.origin = origin
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def _at(self, at: float, item: tuple[Any, ...]) -> None:
        when = self.origin + at
        if when <= self.loop.time():
            self.queue.put_nowait(item)
        else:
            self.loop.call_at(when, self.queue.put_nowait, item)

    def prefill_done(self, at: float) -> None:
        self._at(at, ("prefill", at))

    def token(self, index: int, at: float) -> None:
        self._at(at, ("token", index))

    def finished(self, at: float) -> None:
        self._at(at, ("finished", at))

    def failed(self, at: float, status: int, message: str) -> None:
        self._at(at, ("failed", status, message))


class FleetServer:
    """The process around FleetSim: Kubernetes watches, one HTTP site per served pod, control API, ticker."""

    def __init__(
        self,
        sim: FleetSim,
        *,
        namespaces: Sequence[str] | None,
        kubeconfig: str | None,
        targets_file: Path | None,
        scrape_interval: str | None = None,
        control_host: str = "127.0.0.1",
        control_port: int = DEFAULT_CONTROL_PORT,
        allow_remote_apiserver: bool = False,
        make_client: Callable[[], Any] | None = None,
        models_dir: Path | None = None,
        restart_s: float = DEFAULT_RESTART_S,
        pod_api: PodApi | None = None,
    ) -> None:
        self.sim = sim
        self.models_dir = models_dir or default_models_dir()
        self.namespaces = list(namespaces) if namespaces else None
        self.kubeconfig = kubeconfig
        self.targets_file = targets_file
        self.scrape_interval = scrape_interval
        self.control_host = control_host
        self.control_port = control_port
        self.allow_remote_apiserver = allow_remote_apiserver
        self._make_client = make_client
        self.owner = str(os.getpid())
        self.observed: dict[str, PodObservation] = {}
        self.service_specs: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.sites: dict[str, web.TCPSite] = {}
        self.by_address: dict[tuple[str, int], SimPod] = {}
        self.problems: dict[str, str] = {}
        """uid -> why a Ready pod is not served (bind error, non-loopback IP, unsupported service, fault)."""
        self.down: set[str] = set()
        """uids of pods whose engine is 'down' (a fault): not served until the fault is cleared."""
        self._written: list[dict[str, Any]] | None = None
        self._stop = asyncio.Event()
        self._thread_stop = threading.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._pod_runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self.started_wall = time.time()
        self.restart_s = restart_s
        self.pod_api = pod_api
        """The kubelet's writes (finalizers, readiness); None: none (tests without a cluster)."""
        self.containers: dict[str, Container] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.origin: float | None = None
        """Event-loop time of the model's time 0."""
        self.watch_synced: set[str] = set()

    # -- time

    def now(self) -> float:
        """Model time: seconds of the event loop's clock since the fleet started."""
        loop = asyncio.get_running_loop()
        if self.origin is None:
            self.origin = loop.time() - self.sim.time
        return loop.time() - self.origin

    # -- kubernetes

    def client(self) -> Any:
        if self._make_client is not None:
            return self._make_client()
        return admin_client(self.kubeconfig, self.allow_remote_apiserver)

    def _post(self, loop: asyncio.AbstractEventLoop) -> Callable[[Event], None]:
        def post(event: Event) -> None:
            loop.call_soon_threadsafe(self._events.put_nowait, event)

        return post

    def apply(self, event: Event) -> None:
        """Takes one observation from a watch into account (call reconcile() afterwards)."""
        if event.kind == "services":
            self._apply_services(event)
        else:
            self._apply_pods(event)

    def _apply_services(self, event: Event) -> None:
        """InferenceServices listed, changed or deleted: the simulated services follow."""
        if event.type == "SYNC":
            self.watch_synced.add(f"services/{event.scope or '*'}")
            listed = {(s.namespace, s.name) for s in event.items}
            for key in list(self.service_specs):
                if (event.scope is None or key[0] == event.scope) and key not in listed:
                    self._forget_service(key)
        for item in event.items:
            assert isinstance(item, ServiceObservation)
            key = (item.namespace, item.name)
            if event.type == "DELETED":
                self._forget_service(key)
                continue
            self.service_specs[key] = item.spec
            reason = self.sim.upsert_service(item.namespace, item.name, item.spec)
            if reason:
                log.warning("%s", reason)

    def _apply_pods(self, event: Event) -> None:
        """Pods listed, changed or deleted: the observed pods follow; a gone pod's container is dropped."""
        if event.type == "SYNC":
            self.watch_synced.add(f"pods/{event.scope or '*'}")
            seen = {p.uid for p in event.items}
            for uid, pod in list(self.observed.items()):
                if (event.scope is None or pod.namespace == event.scope) and uid not in seen:
                    del self.observed[uid]
        for item in event.items:
            assert isinstance(item, PodObservation)
            if event.type == "DELETED":
                self.observed.pop(item.uid, None)
            else:
                self.observed[item.uid] = item
        for uid in [u for u in self.containers if u not in self.observed]:
            container = self.containers.pop(uid)
            if container.terminating is not None:
                container.terminating.cancel()

    def _forget_service(self, key: tuple[str, str]) -> None:
        self.service_specs.pop(key, None)
        for uid in self.sim.remove_service(*key):
            self.problems.pop(uid, None)

    # -- pod servers

    async def _stop_pod(self, uid: str) -> None:
        pod = self.sim.remove_pod(uid)
        site = self.sites.pop(uid, None)
        for address, served in list(self.by_address.items()):
            if served.pod.uid == uid:
                del self.by_address[address]
                pod = pod or served
        if pod is not None and site is not None:
            log.info("stopped %s (%s) at %s:%d", pod.ref, pod.pod.role, pod.pod.ip, pod.port)
        if site is not None:
            with contextlib.suppress(Exception):
                await site.stop()

    async def reconcile(self) -> None:
        """Serves exactly the Ready pods of simulated services; rewrites the targets file when that changed."""
        desired, problems = self._desired_pods()
        for uid in [u for u in self.sites if u not in self.sim.pods]:  # their service went away
            await self._stop_pod(uid)
        for uid in list(self.sim.pods):
            current = self.sim.pods[uid]
            wanted = desired.get(uid)
            if (wanted is None or wanted.ip != current.pod.ip or current.service is not self.sim.services.get(
                    (wanted.namespace, wanted.service)) or current.port != current.service.spec.engine.port):
                await self._stop_pod(uid)
        await self._serve_new(desired, problems)
        for uid, reason in problems.items():
            if self.problems.get(uid) != reason and uid in self.observed:
                log.warning("pod %s/%s: %s", self.observed[uid].namespace, self.observed[uid].name, reason)
        self.problems = problems
        self._write_targets()

    def _desired_pods(self) -> tuple[dict[str, PodObservation], dict[str, str]]:
        """The pods an engine should serve, and why each other running pod is not served. A deleted pod's
        engine starts terminating; one that runs no engine exits at once."""
        desired: dict[str, PodObservation] = {}
        problems: dict[str, str] = {}
        for uid, pod in self.observed.items():
            if not pod.ip or not (pod.running or pod.ready):
                continue
            container = self.containers.setdefault(uid, Container(uid))
            if container.exited:
                continue
            if pod.deleting:
                if uid not in self.sim.pods:  # no engine runs (never started, restarting, down): nothing to stop
                    self._exit(uid)
                    continue
                if container.terminating is None:
                    container.terminating = asyncio.create_task(self._terminate(uid), name=f"terminate-{pod.name}")
            elif container.restart_at is not None:
                problems[uid] = "the engine is restarting (its process was killed)"
                continue
            problem = self._unservable(uid, pod)
            if problem is not None:
                problems[uid] = problem
                continue
            desired[uid] = pod
        return desired, problems

    def _unservable(self, uid: str, pod: PodObservation) -> str | None:
        """Why a running pod gets no engine: no simulated service, not a loopback address, a fault."""
        key = (pod.namespace, pod.service)
        if key not in self.sim.services:
            return self.sim.unsupported.get(key, f"no InferenceService {key[0]}/{key[1]} (not listed yet, or deleted)")
        if not is_loopback(pod.ip):
            return f"pod IP {pod.ip} is not a loopback address: not served"
        if uid in self.down:
            return "fault: the engine is down"
        return None

    async def _serve_new(self, desired: dict[str, PodObservation], problems: dict[str, str]) -> None:
        """Starts an engine at every desired pod's address that has none yet (its problem noted if it cannot)."""
        assert self._pod_runner is not None
        for uid, pod in sorted(desired.items(), key=lambda item: (item[1].namespace, item[1].name)):
            if uid in self.sim.pods:
                continue
            sim_pod = self.sim.add_pod(pod)
            if sim_pod.key in self.by_address:
                problems[uid] = f"{pod.ip}:{sim_pod.port} is already served for another pod"
                self.sim.remove_pod(uid)
                continue
            site = web.TCPSite(self._pod_runner, pod.ip, sim_pod.port, reuse_address=True)
            try:
                await site.start()
            except OSError as error:
                problems[uid] = f"cannot listen on {pod.ip}:{sim_pod.port}: {error.strerror or error}"
                self.sim.remove_pod(uid)
                continue
            self.sites[uid] = site
            self.by_address[sim_pod.key] = sim_pod
            log.info("serving %s (%s, %s) at http://%s:%d", sim_pod.ref, pod.role, sim_pod.engine.config.kind,
                     pod.ip, sim_pod.port)
            self._started(uid, pod)

    # -- the kubelet (kubelet.py): finalizer, termination, restarts, readiness

    def _in_background(self, call: Callable[..., Any], *args: Any) -> None:
        """An API write in a thread, not awaited (its outcome is logged)."""
        task = asyncio.create_task(asyncio.to_thread(call, *args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _started(self, uid: str, pod: PodObservation) -> None:
        """An engine process started on the pod: the finalizer that keeps the pod until it exits, and Ready
        again after a restart."""
        container = self.containers.setdefault(uid, Container(uid))
        if self.pod_api is None:
            return
        if FINALIZER not in pod.finalizers and not container.finalized:
            container.finalized = True
            self._in_background(self.pod_api.add_finalizer, pod.namespace, pod.name)
        if container.restarts or container.ready is False:
            container.ready = True
            self._in_background(self.pod_api.set_ready, pod.namespace, pod.name, True,
                                pod.restart_count + container.restarts, "", "")

    def _exit(self, uid: str) -> None:
        """The container is gone for good: the lab's finalizer comes off (kwok then removes the pod)."""
        container = self.containers.setdefault(uid, Container(uid))
        container.exited = True
        pod = self.observed.get(uid)
        if pod is not None and self.pod_api is not None and (FINALIZER in pod.finalizers or container.finalized):
            self._in_background(self.pod_api.remove_finalizer, pod.namespace, pod.name)

    def _busy(self, served: SimPod) -> bool:
        """Whether an engine still works on something SIGTERM waits for (SGLang's prefill: rooms it prefilled
        whose decode has not taken the KV yet)."""
        if served.engine.in_flight():
            return True
        uid = served.pod.uid
        return served.engine.config.kind == "sglang" and any(r.prefill_uid == uid for r in self.sim.rooms.values())

    async def _terminate(self, uid: str) -> None:
        """A deleted pod's container: preStop hook, SIGTERM (the engine's shutdown), then the process exits
        when done or is killed at the grace period's end."""
        loop = asyncio.get_running_loop()
        pod = self.observed[uid]
        container = self.containers[uid]
        remaining = max(0.0, pod.deadline - time.time()) if pod.deadline is not None else pod.grace_s
        deadline = loop.time() + remaining
        hook = "none" if pod.prestop is None else (" ".join(pod.prestop.command)[:80] or f"sleep {pod.prestop.sleep_s}")
        log.info("%s/%s: deleted, %.0f s of grace: preStop %s", pod.namespace, pod.name, remaining, hook)
        try:
            if pod.prestop is not None:
                container.hook = await run_hook(pod.prestop, pod, deadline - loop.time())
                log.info("%s/%s: preStop hook done: %s", pod.namespace, pod.name,
                         {k: v for k, v in container.hook.items() if k != "output"})
            served = self.sim.pods.get(uid)
            if served is not None:
                engine = served.engine
                engine.shutdown()
                timeout = engine.shutdown_timeout
                end = deadline if timeout is None else min(deadline, loop.time() + timeout)
                while loop.time() < end and self._busy(served):
                    await asyncio.sleep(TICK_S)
                left = engine.in_flight()
                why = "killed at the grace period's end" if loop.time() >= deadline else "its shutdown timeout"
                log.info("%s/%s: SIGTERM: %s", pod.namespace, pod.name,
                         f"{left} requests still in flight are lost ({why})" if left else "exited, nothing in flight")
            await self._stop_pod(uid)
        finally:
            self._exit(uid)

    async def kill(self, uid: str, reason: str) -> None:
        """The engine process dies (SIGKILL, a crash): in-flight requests are lost; the kubelet restarts it in
        place after `restart_s`, unless the pod is being deleted."""
        container = self.containers.setdefault(uid, Container(uid))
        pod = self.observed.get(uid)
        if container.exited or pod is None:
            return
        log.warning("%s/%s: the engine process died (%s)", pod.namespace, pod.name, reason)
        await self._stop_pod(uid)
        if container.terminating is not None or pod.deleting:
            if container.terminating is not None:
                container.terminating.cancel()
            self._exit(uid)
            return
        container.restarts += 1
        container.restart_at = asyncio.get_running_loop().time() + self.restart_s
        container.ready = False
        if self.pod_api is not None:
            self._in_background(self.pod_api.set_ready, pod.namespace, pod.name, False,
                                pod.restart_count + container.restarts, "ContainerRestarting", reason)

    def _kubelet_tick(self) -> None:
        """Crashes to kill, restarts that are due, and the readiness probe of unhealthy engines."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for uid, reason in list(self.sim.crashed.items()):
            del self.sim.crashed[uid]
            task = asyncio.create_task(self.kill(uid, reason))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        due = [c for c in self.containers.values() if c.restart_at is not None and c.restart_at <= now]
        for waiting in due:
            waiting.restart_at = None
        if due:
            restart = asyncio.create_task(self.reconcile())
            self._background.add(restart)
            restart.add_done_callback(self._background.discard)
        if self.pod_api is None:
            return
        for uid, served in self.sim.pods.items():
            container = self.containers.get(uid)
            if container is None or container.terminating is not None or now < container.next_probe:
                continue
            probe = served.pod.readiness
            container.next_probe = now + probe.period_s
            healthy = served.fault is None and not served.engine.draining
            if healthy:
                container.probe_failures, container.probe_successes = 0, container.probe_successes + 1
            else:
                container.probe_failures, container.probe_successes = container.probe_failures + 1, 0
            pod = served.pod
            if not healthy and container.probe_failures >= probe.failure_threshold and container.ready is not False:
                container.ready = False
                self._in_background(self.pod_api.set_ready, pod.namespace, pod.name, False,
                                    pod.restart_count + container.restarts, "ReadinessProbeFailed",
                                    "Readiness probe failed: HTTP probe failed with statuscode: 503")
            elif healthy and container.ready is False and container.probe_successes >= probe.success_threshold:
                container.ready = True
                self._in_background(self.pod_api.set_ready, pod.namespace, pod.name, True,
                                    pod.restart_count + container.restarts, "", "")

    def _write_targets(self, final: bool = False) -> None:
        if self.targets_file is None:
            return
        targets = [(f"{p.pod.ip}:{p.port}", p.labels) for p in self.sim.pods.values()]
        groups = [] if final else target_groups(targets, self.owner, self.scrape_interval)
        if groups == self._written and not final:
            return
        try:
            write_targets(self.targets_file, groups, self.owner)
            self._written = groups
        except OSError as error:
            log.warning("cannot write %s: %s", self.targets_file, error)

    def model_path(self, name: str) -> str:
        """The local model directory the simulated engines report, with the simulated tokenizer in it."""
        directory = self.models_dir / name
        tokenizer = directory / "tokenizer.json"
        if not tokenizer.exists():
            directory.mkdir(parents=True, exist_ok=True)
            tokenizer.write_text(json.dumps(tokenizer_json()))
        return str(directory)

    # -- HTTP handlers (one app for every pod: the local address says which pod is asked)

    def _pod_of(self, request: web.Request) -> SimPod | None:
        transport = request.transport
        if transport is None:
            return None
        sockname = transport.get_extra_info("sockname")
        if not sockname:
            return None
        return self.by_address.get((str(sockname[0]), int(sockname[1])))

    @staticmethod
    def _gone(request: web.Request) -> web.Response:
        """A kept-alive connection to a pod no longer served: dropped, as the engine's process is gone."""
        if request.transport is not None:
            request.transport.close()
        return web.json_response({"error": {"message": "no engine here any more", "code": 404}}, status=404)

    @staticmethod
    def _error(kind: str, status: int, message: str) -> web.Response:
        return web.json_response(error_body(kind, status, message), status=status)

    async def _metrics(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        return web.Response(body=pod.metrics_page().encode(), headers={"Content-Type": EXPOSITION_CONTENT_TYPE})

    async def _health(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        return web.Response(status=503 if pod.fault == "unhealthy" or pod.engine.draining else 200)

    async def _version(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        return web.json_response({"version": ENGINE_VERSIONS[pod.engine.config.kind]})

    async def _models(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        name = pod.service.spec.model.name
        return web.json_response({"object": "list", "data": [{
            "id": name, "object": "model", "created": int(self.started_wall), "owned_by": pod.engine.config.kind,
            "root": name, "parent": None, "max_model_len": pod.engine.config.model.max_context,
        }]})

    async def _model_info(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        name = pod.service.spec.model.name
        return web.json_response({"model_path": self.model_path(name), "tokenizer_path": self.model_path(name),
                                  "is_generation": True,
                                  "preferred_sampling_params": None, "weight_version": "default",
                                  "has_image_understanding": False, "has_audio_understanding": False})

    async def _server_info(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        engine = pod.engine
        name = pod.service.spec.model.name
        info: dict[str, Any] = {
            # a local directory, as for weights on a volume (with a hub id the router would download the
            # tokenizer from the hub): its tokenizer.json is the simulated tokenizer's (one token per word)
            "model_path": self.model_path(name), "served_model_name": name, "tokenizer_path": self.model_path(name),
            "tp_size": engine.config.tensor_parallel, "dp_size": 1, "disaggregation_mode": pod.pod.role,
            "version": ENGINE_VERSIONS[engine.config.kind],
            "internal_states": [{"last_gen_throughput": getattr(engine, "tokens_per_s", 0.0)}],
        }
        if isinstance(engine, PrefillEngine):
            info["disaggregation_bootstrap_port"] = engine.bootstrap_port
        return web.json_response(info)

    async def _get_load(self, request: web.Request) -> web.Response:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        running, waiting, usage = pod.engine.gauges()
        return web.json_response([{"dp_rank": 0, "num_reqs": running + waiting, "num_waiting_reqs": waiting,
                                   "num_tokens": int(usage * pod.engine.config.kv_capacity_tokens)}])

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "chat")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, "generate")

    async def _generation(self, request: web.Request, api: Api) -> web.StreamResponse:
        pod = self._pod_of(request)
        if pod is None:
            return self._gone(request)
        kind = pod.engine.config.kind
        if pod.fault == "unhealthy":
            return self._error(kind, 503, "the engine is unhealthy")
        if pod.engine.draining:
            return self._error(kind, 503, "the server is shutting down")
        try:
            generation = parse_generation(await request.json(), api)
        except (ValueError, json.JSONDecodeError) as error:
            return self._error(kind, 400, str(error))
        model = pod.service.spec.model.name
        if api != "generate" and generation.model not in (None, model):
            return self._error(kind, 404, f"The model `{generation.model}` does not exist.")
        loop = asyncio.get_running_loop()
        now = self.now()
        assert self.origin is not None
        listener = HttpListener(loop, self.origin)
        live = LiveRequest(self.sim.next_id(), generation.prompt_tokens, generation.max_tokens, received=now,
                           listener=listener)
        prefix = {"chat": "chatcmpl", "completions": "cmpl", "generate": "gen"}[api]
        reply = Reply(generation, f"{prefix}-{pod.pod.uid[:8]}-{next(self._ids)}", model)
        try:
            if isinstance(pod.engine, PrefillEngine):
                return await self._prefill_leg(request, pod, pod.engine, generation, live, reply, listener)
            return await self._decode_leg(request, pod, pod.engine, generation, live, reply, listener)
        except (asyncio.CancelledError, ConnectionResetError):
            self.sim.abort(pod, live)
            raise

    async def _next(self, listener: HttpListener) -> tuple[Any, ...]:
        return await asyncio.wait_for(listener.queue.get(), timeout=REQUEST_TIMEOUT_S)

    async def _prefill_leg(self, request: web.Request, pod: SimPod, engine: PrefillEngine, generation: Generation,
                           live: LiveRequest, reply: Reply, listener: HttpListener) -> web.StreamResponse:
        kind = engine.config.kind
        params = generation.kv_transfer_params
        pd = bool(params and params.get("do_remote_decode")) if kind == "vllm" else generation.bootstrap is not None
        live.hold_kv = pd
        if kind == "sglang" and generation.bootstrap is not None:
            live.room = generation.bootstrap
            self.sim.open_room(generation.bootstrap, live.received)
        self.sim.handle_prefilled(pod.service, engine.advance(live.received), engine)
        if not engine.submit(live, live.received):
            return self._error(kind, 503, "the engine's queue is full")
        while True:
            item = await self._next(listener)
            if item[0] == "failed":
                return self._error(kind, int(item[1]), str(item[2]))
            if item[0] == "prefill":
                break
        self.sim.handle_prefilled(pod.service, engine.advance(float(item[1])), engine)
        # a P/D prefill leg samples one token; a direct request gets its whole answer when its prefill ends
        tokens = 1 if pd else generation.max_tokens
        if not generation.stream:
            return web.json_response(reply.whole(tokens, live.kv_params if kind == "vllm" else None))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        body = reply.opening() + b"".join(reply.token(i) for i in range(1, tokens + 1))
        await response.write(body + reply.closing(tokens))
        await response.write_eof()
        return response

    async def _decode_leg(self, request: web.Request, pod: SimPod, engine: DecodeEngine, generation: Generation,
                          live: LiveRequest, reply: Reply, listener: HttpListener) -> web.StreamResponse:
        refused = self._take_kv(pod, engine, generation, live)
        if refused is not None:
            return refused
        if not engine.submit(live):
            return self._error(engine.config.kind, 503, "the engine's queue is full")
        return await self._stream_decode(request, pod, engine.config.kind, generation, live, reply, listener)

    def _take_kv(self, pod: SimPod, engine: DecodeEngine, generation: Generation,
                 live: LiveRequest) -> web.Response | None:
        """The decode leg's KV cache: vLLM loads the prefill's hand-off (or recomputes the prompt), SGLang
        joins the bootstrap room; the error response when the request cannot go on."""
        kind = engine.config.kind
        now = live.received
        if kind != "vllm":
            if generation.bootstrap is None:
                return self._error(kind, 400, "a decode engine needs bootstrap_host, bootstrap_port and "
                                              "bootstrap_room (requests come through the router)")
            live.room = generation.bootstrap
            self.sim.join_room(pod, live, now)
            return None
        params = generation.kv_transfer_params
        if not (params and params.get("do_remote_prefill")):
            engine.recompute(live, now)
            return None
        reason = self.sim.claim_kv(pod, params, live, now)
        if pod.pod.uid in self.sim.crashed:  # the process died under this request
            return self._error(kind, 500, reason or "the engine crashed")
        if reason is not None:
            engine.stats.kv_failed += 1
            if engine.failure_policy != "recompute":
                engine.stats.failed += 1
                log.info("%s: KV load failed (%s): the request fails (kv_load_failure_policy fail)",
                         pod.ref, reason)
                return self._error(kind, 500, f"KV cache load failed: {reason}")
            engine.recompute(live, now)
        return None

    async def _stream_decode(self, request: web.Request, pod: SimPod, kind: str, generation: Generation,
                             live: LiveRequest, reply: Reply, listener: HttpListener) -> web.StreamResponse:
        """The decoded tokens as the engine emits them: streamed as events, or one JSON body at the end."""
        response: web.StreamResponse | None = None
        written = 0
        finished = False
        while not (finished and written >= generation.max_tokens):
            item = await self._next(listener)
            if item[0] == "failed":
                if response is None:
                    failure = self._error(kind, int(item[1]), str(item[2]))
                    failure.headers.update(self._decode_headers(pod, live, stream=False))
                    return failure
                await response.write(Reply.event(error_body(kind, int(item[1]), str(item[2]))) + Reply.event("[DONE]"))
                await response.write_eof()
                return response
            if item[0] == "finished":
                finished = True
                continue
            if item[0] != "token":
                continue
            written += 1
            if not generation.stream:
                continue
            if response is None:
                response = web.StreamResponse(headers=self._decode_headers(pod, live, stream=True))
                await response.prepare(request)
                await response.write(reply.opening() + reply.token(int(item[1])))
            else:
                await response.write(reply.token(int(item[1])))
        if response is None:
            return web.json_response(reply.whole(written), headers=self._decode_headers(pod, live, stream=False))
        await response.write(reply.closing(written))
        await response.write_eof()
        return response

    @staticmethod
    def _decode_headers(pod: SimPod, live: LiveRequest, stream: bool) -> dict[str, str]:
        headers = {PREFILL_POD_HEADER: live.prefill_pod, DECODE_POD_HEADER: pod.ref, KV_HEADER: live.kv_source}
        if stream:
            headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        return headers

    def pod_app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_get("/metrics", self._metrics)
        for path in ("/health", "/ping", "/health_generate"):
            app.router.add_get(path, self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/v1/models", self._models)
        for path in ("/model_info", "/get_model_info"):
            app.router.add_get(path, self._model_info)
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self._server_info)
        app.router.add_get("/get_load", self._get_load)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/generate", self._generate)
        return app

    # -- control API

    async def _get_load_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.load_state())

    async def _put_load(self, request: web.Request) -> web.Response:
        try:
            namespace, name = parse_service_key(f"{request.match_info['namespace']}/{request.match_info['name']}")
            body = await request.json()
            if not isinstance(body, dict):
                raise LoadError("the body must be a JSON object")
            spec = self._load_from_body(body)
            result = self.sim.set_load(namespace, name, spec)
        except (LoadError, ValueError, json.JSONDecodeError) as error:
            return web.json_response({"error": str(error)}, status=400)
        result["applied_at_unix"] = time.time()
        result["sim_time_s"] = round(self.sim.time, 3)
        log.info("load of %s/%s set to %s", namespace, name, result.get("spec"))
        return web.json_response(result)

    async def _delete_load(self, request: web.Request) -> web.Response:
        try:
            namespace, name = parse_service_key(f"{request.match_info['namespace']}/{request.match_info['name']}")
        except LoadError as error:
            return web.json_response({"error": str(error)}, status=400)
        result = self.sim.set_load(namespace, name, None)
        result["applied_at_unix"] = time.time()
        return web.json_response(result)

    @staticmethod
    def _load_from_body(body: Mapping[str, Any]) -> LoadSpec:
        allowed = {"rps", "x", "spec", "prompt_tokens", "output_tokens"}
        unknown = set(body) - allowed
        if unknown:
            raise LoadError(f"unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        given = [k for k in ("rps", "x", "spec") if k in body]
        if len(given) != 1:
            raise LoadError("give exactly one of 'rps' (requests/s), 'x' (multiple of the base load) or 'spec'")
        if "spec" in body:
            spec = parse_load_spec(str(body["spec"]))
        else:
            value = body[given[0]]
            if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
                    or not 0 <= value <= MAX_RPS):
                raise LoadError(f"'{given[0]}' must be a number in [0, {MAX_RPS:g}]")
            spec = LoadSpec(steps=((0.0, float(value), given[0] == "x"),))
        sizes: dict[str, int] = {}
        for key in ("prompt_tokens", "output_tokens"):
            if key in body:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
                    raise LoadError(f"'{key}' must be an integer in [1, 1000000]")
                sizes[key] = value
        return LoadSpec(spec.steps, spec.trace, spec.time_scale, sizes.get("prompt_tokens"),
                        sizes.get("output_tokens"))

    async def _put_fault(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["pod"]
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        fault = body.get("fault") if isinstance(body, dict) else "?"
        if fault is not None and fault not in FAULTS:
            return web.json_response({"error": f"'fault' must be one of {list(FAULTS)} or null"}, status=400)
        uid = next((u for u, p in self.observed.items() if (p.namespace, p.name) == (namespace, name)), None)
        if uid is None:
            return web.json_response({"error": f"no engine pod {namespace}/{name} is observed"}, status=404)
        served = self.sim.pods.get(uid)
        if fault == "kill":
            await self.kill(uid, "killed (SIGKILL) through the control API")
            log.info("fault of %s/%s: killed", namespace, name)
            return web.json_response({"pod": f"{namespace}/{name}", "fault": fault, "applied_at_unix": time.time()})
        if fault == "down":
            self.down.add(uid)
        else:
            self.down.discard(uid)
            if served is not None:
                served.fault = fault
        await self.reconcile()
        log.info("fault of %s/%s set to %s", namespace, name, fault)
        return web.json_response({"pod": f"{namespace}/{name}", "fault": fault, "applied_at_unix": time.time()})

    async def _get_state(self, request: web.Request) -> web.Response:
        state = self.sim.state()
        state["wall_started_unix"] = self.started_wall
        state["uptime_s"] = round(time.time() - self.started_wall, 3)
        state["cpu_seconds"] = round(time.process_time(), 3)
        state["watches_synced"] = sorted(self.watch_synced)
        state["not_served"] = {
            f"{self.observed[uid].namespace}/{self.observed[uid].name}": reason
            for uid, reason in sorted(self.problems.items()) if uid in self.observed
        }
        state["targets_file"] = str(self.targets_file) if self.targets_file else None
        return web.json_response(state)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "time_s": round(self.sim.time, 3)})

    def control_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 16)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/load", self._get_load_state)
        app.router.add_put("/load/{namespace}/{name}", self._put_load)
        app.router.add_delete("/load/{namespace}/{name}", self._delete_load)
        app.router.add_put("/fault/{namespace}/{pod}", self._put_fault)
        app.router.add_get("/state", self._get_state)
        return app

    # -- main loop

    def stop(self) -> None:
        self._stop.set()

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        last_retry = loop.time()
        while not self._stop.is_set():
            self.sim.tick(self.now(), ahead=TICK_S)
            self._kubelet_tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=TICK_S)
            if self.problems and loop.time() - last_retry > 5.0:  # e.g. an address that was still in use
                last_retry = loop.time()
                self._events.put_nowait(Event("pods", "RETRY", "", ()))

    async def _consume(self) -> None:
        while not self._stop.is_set():
            event = await self._events.get()
            self.apply(event)
            for _ in range(1000):  # apply what else is queued, then reconcile once
                try:
                    self.apply(self._events.get_nowait())
                except asyncio.QueueEmpty:
                    break
            await self.reconcile()

    async def run(self, duration: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        self.client().close()  # fail fast: kubeconfig readable, API server on loopback
        if self.pod_api is None:
            self.pod_api = PodApi(self.client)
        await self.start_http()
        post = self._post(loop)
        scopes: list[str | None] = list(self.namespaces) if self.namespaces else [None]
        kinds: tuple[Literal["services", "pods"], ...] = ("services", "pods")
        for scope in scopes:
            for kind in kinds:
                Watcher(kind, scope, self.client, post, self._thread_stop).start()
        tasks = [asyncio.create_task(self._ticker(), name="ticker"),
                 asyncio.create_task(self._consume(), name="consume")]
        try:
            if duration:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=duration)
            else:
                await self._stop.wait()
        finally:
            self._stop.set()
            self._thread_stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.shutdown()
            log.info("stopped")

    async def start_http(self) -> None:
        """The control API, and the (still empty) application every pod's site will serve."""
        if not is_loopback(self.control_host):
            raise OSError(f"the control API may only listen on a loopback address, not {self.control_host}")
        self.now()
        self._pod_runner = web.AppRunner(self.pod_app(), access_log=None, handle_signals=False)
        await self._pod_runner.setup()
        self._control_runner = web.AppRunner(self.control_app(), access_log=None, handle_signals=False)
        await self._control_runner.setup()
        control = web.TCPSite(self._control_runner, self.control_host, self.control_port, reuse_address=True)
        await control.start()
        log.info("control API on http://%s:%d (GET /state, GET /load, PUT /load/NS/NAME, PUT /fault/NS/POD)",
                 self.control_host, self.control_port)

    async def _release_finalizers(self) -> None:
        """The fleet stops: its finalizers come off every pod (their engines stop with the fleet), so that
        nothing waits on a lab that is gone."""
        api = self.pod_api
        if api is None:
            return
        held = [p for uid, p in self.observed.items()
                if FINALIZER in p.finalizers or (uid in self.containers and self.containers[uid].finalized)]
        if held:
            await asyncio.gather(*(asyncio.to_thread(api.remove_finalizer, p.namespace, p.name) for p in held),
                                 return_exceptions=True)

    async def shutdown(self) -> None:
        """Stops every pod's site, takes our targets out of the targets file, closes the servers."""
        for container in self.containers.values():
            if container.terminating is not None:
                container.terminating.cancel()
        for uid in list(self.sim.pods):
            await self._stop_pod(uid)
        for uid in list(self.sites):
            await self._stop_pod(uid)
        await self._release_finalizers()
        self._write_targets(final=True)
        if self._pod_runner is not None:
            await self._pod_runner.cleanup()
            self._pod_runner = None
        if self._control_runner is not None:
            await self._control_runner.cleanup()
            self._control_runner = None
