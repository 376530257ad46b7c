"""The simulated engines of the local cluster: `disagg simulate`'s engine model stepped live, per pod.

Pure (no I/O): time is what the caller passes (seconds since the fleet started); the server maps it to
its event loop's clock. Each Ready prefill pod is a `PrefillReplica` of the engine model, each Ready
decode pod a slot of its service's `DecodePool` (`disagg.sim.engine`), with every cost from the
roofline. What the model does not decide, the engines' protocols do:

vLLM over NIXL (the router calls prefill, then decode)
    A prefill leg carrying `kv_transfer_params.do_remote_decode` is prefilled and answered with one
    token and the parameters its decode must echo (`remote_engine_id`, `remote_request_id`,
    `remote_block_ids`, the side channel `remote_host`/`remote_port`, `tp_size`); the prefill engine
    holds that KV cache until a decode pulls it or `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` (480 s) passes.
    A decode leg whose parameters name a KV cache this service's prefill engine still holds pulls it
    (the roofline's KV transfer time) and counts it received; the prefill counts it handed off and frees
    it. A decode leg with parameters that name nothing usable (another pod, another service's pod —
    the NetworkPolicy closes the side channel — or a cache already consumed or expired) is a KV load
    failure, handled by the pod's `kv_load_failure_policy` (from its `--kv-transfer-config`, vLLM's
    default `fail`): `recompute` prefills the prompt on the decode engine, `fail` answers an error. A
    decode leg without parameters is a plain request: the decode engine prefills it itself. Both count
    as recomputed prompts.

SGLang (the router sends the same request to prefill and decode at once)
    Both legs carry `bootstrap_host`/`bootstrap_port`/`bootstrap_room`. The decode leg waits until the
    prefill engine at that bootstrap address has prefilled the same room, then for the KV transfer; a
    prefill that never comes fails the decode after `SGLANG_DISAGGREGATION_WAITING_TIMEOUT` (300 s, from
    the pod's environment), as SGLang's decode does. A prefilled room whose decode never registers is
    dropped after `SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT` (300 s).

Versions, restarts and shutdown (what the operations lab needs)
    Each engine carries an identity (`engine_id`, new at every start of its process) and a revision key
    (`compat_key`: image, model, model revision, KV dtype, block size, tensor parallelism and connector, as
    the pod's container says them). A hand-off between engines of different revision keys is refused and
    counted on the decode engine (`kv_refused`): vLLM's decode recomputes the prompt (its failure policy),
    SGLang's fails the request. Real engines compare only part of this (NIXL's handshake: block size, KV
    layout, TP); the lab refuses every mix, so that a mixed pair cannot hide. A peer that comes back at an
    address with a new identity crashes the engine that had talked to the old one, as the pinned versions
    do: a vLLM decode pulling from a restarted prefill (vllm#49238, NIXL `loadRemoteMD`), an SGLang prefill
    sending to a restarted decode (smg#2503). A crash is put in `FleetSim.crashed` for the kubelet.
    `shutdown()` is SIGTERM: new requests are refused (503) and the kubelet waits for `in_flight()`.

Listeners hear each request's events at their exact model times: a prefill leg's answer, each decode
token (the k-th token when the replica's step clock passes the sequence's start + k), the end, or a
failure. Decode slots are stepped ahead of time (`tick(now, ahead)`), so token times are known before
they are due and can be sent on time.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import ModelConfigError, ModelShape
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    kv_capacity_tokens,
    kv_link_bytes_per_s,
    kv_transfer_seconds,
    prefill_seconds,
)
from disagg.capacity.traces import TraceError, Workload, read_trace, scale_time
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog
from disagg.engines import MOONCAKE_BOOTSTRAP_PORT, NIXL_SIDE_CHANNEL_PORT
from disagg.engines.custom import metric_names as custom_metric_names
from disagg.sim.engine import DecodePool, PrefillReplica
from disagg.wellknown import ROLES, Role
from disagg_lab.kube import PodObservation
from disagg_lab.metrics import (
    ENGINE_METRICS,
    EngineMetrics,
    EngineStats,
    custom_metrics,
    label_text,
    render_metrics,
)
from disagg_lab.offered import (
    DEFAULT_BASE_SHARE,
    DEFAULT_OUTPUT_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    BaseLoad,
    LoadError,
    LoadSpec,
    OfferedLoad,
    accelerator_of,
    base_load,
    default_traces_dir,
    model_of,
    resolve_trace,
)

MAX_QUEUE = 20_000
"""Requests a pod holds waiting at most (prefill queue, decode waiting list); more are refused."""
NIXL_ABORT_REQUEST_TIMEOUT_S = 480.0
"""vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT default: a prefill frees KV no decode pulled after this."""
SGLANG_WAITING_TIMEOUT_S = 300.0
"""SGLang's SGLANG_DISAGGREGATION_WAITING_TIMEOUT default (decode waiting for its KV)."""
SGLANG_BOOTSTRAP_TIMEOUT_S = 300.0
"""SGLang's SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT default (prefill waiting for its decode)."""
SGLANG_HEARTBEAT_INTERVAL_S, SGLANG_HEARTBEAT_MAX_FAILURE = 5.0, 2
"""SGLang's decode checks the bootstrap server of every prefill it waits on this often and gives a prefill up
after this many failed checks (SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL, _MAX_FAILURE): the requests waiting
on it fail then ("Losing connection with prefill instance"), not at the waiting timeout."""
ADMIT_LOOKAHEAD = 512
"""Waiting requests a decode engine looks through per step for one whose KV is in place."""
PREFILL_BATCH_TOKENS = 8192
"""Prompt tokens one prefill batch holds (vLLM's max_num_batched_tokens; `SimSetup` default)."""
PREFILL_BATCH_OVERHEAD_S = 0.01
"""Fixed cost of one prefill batch (`SimSetup` default)."""
MAX_STEP_S = 1.0
"""Longest stretch of model time one tick runs (a starved process catches up in pieces)."""


class Listener(Protocol):
    """What the owner of a live request hears, at model times (seconds since the fleet started)."""

    def prefill_done(self, at: float) -> None:
        """A prefill leg's answer is due at `at` (the engine's bookkeeping for it runs then)."""

    def token(self, index: int, at: float) -> None:
        """Decode token `index` (1-based) is due at `at`."""

    def finished(self, at: float) -> None:
        """The last token was due at `at`."""

    def failed(self, at: float, status: int, message: str) -> None:
        """The request failed at `at` (HTTP status and message, as the engine answers)."""


@dataclass(eq=False)
class LiveRequest:
    """One request as an engine sees it."""

    id: int
    prompt: int
    output: int
    received: float
    """When it reached this engine."""
    listener: Listener | None = None
    """None for injected load (no HTTP)."""
    ready_at: float = math.inf
    """Decode: when its KV cache is in place."""
    deadline: float = math.inf
    """Decode: when it fails if its KV never came (SGLang)."""
    admitted: float | None = None
    start_clock: float = 0.0
    first_token: float | None = None
    started: bool = False
    """Decode: admitted at least once."""
    kv_source: str = ""
    """Decode: 'transferred', 'recomputed' or 'refused' (the prefill runs another revision); prefill of
    injected load: 'injected'."""
    prefill_pod: str = ""
    """Decode: namespace/name of the prefill pod whose KV it received."""
    hold_kv: bool = False
    """Prefill: keep the KV cache for a remote decode."""
    kv_params: dict[str, Any] | None = None
    """Prefill (vLLM): the parameters its decode must echo, set when the prefill is done."""
    room: tuple[str, int, int] | None = None
    """SGLang: (bootstrap host, bootstrap port, room) of both legs."""
    forward: bool = False
    """Injected prefill: hand over to the service's decode pods when done."""
    done: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """What one simulated engine replica is."""

    kind: str
    role: Role
    model: ModelShape
    accelerator: Accelerator
    tensor_parallel: int
    kv_link_bytes_per_s: float
    """Prefill to decode bandwidth of this service's KV hand-off."""
    efficiency: Efficiency = DEFAULT_EFFICIENCY
    exported: EngineMetrics | None = None
    """The metric names a custom engine exports (None: those of `kind`)."""

    @property
    def metrics(self) -> EngineMetrics:
        return self.exported or ENGINE_METRICS[self.kind]

    @cached_property
    def kv_capacity_tokens(self) -> float:
        return kv_capacity_tokens(self.model, self.accelerator, self.tensor_parallel, self.efficiency)

    def prefill_seconds(self, prompt: int) -> float:
        return prefill_seconds(self.model, self.accelerator, self.tensor_parallel, float(prompt), self.efficiency)

    def transfer_seconds(self, prompt: int) -> float:
        return kv_transfer_seconds(self.model, float(prompt), self.kv_link_bytes_per_s, self.efficiency)


@dataclass(frozen=True)
class KVHold:
    """A KV cache a prefill engine keeps for a remote decode (vLLM NIXL)."""

    holder_uid: str
    tokens: int
    expires_at: float


@dataclass
class Room:
    """An SGLang bootstrap room: the two legs of one request."""

    created: float
    prefill_uid: str | None = None
    prefill_done_at: float | None = None
    prompt: int = 0
    decode: tuple[str, LiveRequest] | None = None
    """(decode pod uid, its waiting request)."""


def kv_load_failure_policy(pod: PodObservation) -> str:
    """vLLM: the pod's `kv_load_failure_policy` from its --kv-transfer-config (vLLM's default `fail`)."""
    raw = pod.arg_value("--kv-transfer-config")
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            return "fail"
        if isinstance(config, dict) and config.get("kv_load_failure_policy") in ("recompute", "fail"):
            return str(config["kv_load_failure_policy"])
    return "fail"


COMPAT_FLAGS = ("--revision", "--kv-cache-dtype", "--block-size", "--page-size", "--tensor-parallel-size",
                "--tp-size", "--dtype", "--disaggregation-transfer-backend")
"""Flags whose values two engines must share to exchange KV (with the image, the model and the connector)."""


POD_ONLY_POOL_FIELDS = ("replicas", "autoscaling", "image", "resources", "tolerations", "nodeSelector", "affinity")
"""Pool fields that change pods (their number, image, placement), never how a running engine computes."""


def _engine_model(raw_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a service's spec the simulated engines are made from: not its pools' sizes, autoscaling,
    images or placement, the engine image or the model revision (an engine's image and revision are its pod's:
    `compat_key`), nor its router or drain. An edit of those changes pods, never the engines already running
    (a real engine does not see the InferenceService)."""
    spec = {k: v for k, v in raw_spec.items() if k not in ("router", "drain")}
    if isinstance(spec.get("engine"), Mapping):
        spec["engine"] = {k: v for k, v in spec["engine"].items() if k != "image"}
    if isinstance(spec.get("model"), Mapping):
        spec["model"] = {k: v for k, v in spec["model"].items() if k != "revision"}
    for role in ("prefill", "decode"):
        pool = spec.get(role)
        if isinstance(pool, Mapping):
            spec[role] = {k: v for k, v in pool.items() if k not in POD_ONLY_POOL_FIELDS}
    return spec


def compat_key(pod: PodObservation) -> str:
    """A short key of what a prefill and a decode engine must agree on to exchange KV, from the pod's
    container: the image, the model, the flags of `COMPAT_FLAGS` and the KV connector (not the role)."""
    model = pod.arg_value("--model-path") or pod.arg_value("--model")
    if model is None and len(pod.args) > 2 and pod.args[:2] == ("vllm", "serve"):
        model = pod.args[2]
    connector = ""
    raw = pod.arg_value("--kv-transfer-config")
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            config = {}
        connector = str(config.get("kv_connector", "")) if isinstance(config, dict) else ""
    parts = [pod.image, str(model), connector, *(f"{flag}={pod.arg_value(flag)}" for flag in COMPAT_FLAGS)]
    return f"{zlib.crc32(chr(0).join(parts).encode()):08x}"


def shutdown_timeout(pod: PodObservation) -> float | None:
    """How long the engine finishes its requests after SIGTERM: vLLM's `--shutdown-timeout` (0, its default,
    aborts them at once); None for SGLang, which waits for them however long they take."""
    if pod.arg_value("--shutdown-timeout") is None:
        return None if pod.arg_value("--model-path") is not None else 0.0
    try:
        return max(0.0, float(pod.arg_value("--shutdown-timeout") or 0))
    except ValueError:
        return 0.0


def _env_seconds(pod: PodObservation, name: str, default: float) -> float:
    value = pod.env_value(name)
    try:
        return float(value) if value is not None else default
    except ValueError:
        return default


class PrefillEngine:
    """A prefill pod: a `PrefillReplica` of the engine model with the engine's counters."""

    role: Role = "prefill"

    def __init__(self, config: EngineConfig, pod: PodObservation) -> None:
        self.config = config
        self.metrics = config.metrics
        self.stats = EngineStats(self.metrics)
        self.replica: PrefillReplica[LiveRequest] = PrefillReplica(PREFILL_BATCH_TOKENS, PREFILL_BATCH_OVERHEAD_S)
        self.held_tokens = 0
        self._announced: list[tuple[LiveRequest, float, float]] | None = None
        self._service: dict[int, float] = {}
        self.engine_id = str(uuid.uuid4())
        """vLLM's engine id (a uuid per engine start), which decode legs must echo."""
        self.compat = compat_key(pod)
        self.shutdown_timeout = shutdown_timeout(pod)
        self.draining = False
        """SIGTERM received: new requests are refused, the ones in flight go on."""
        self.peers: dict[str, str] = {}
        """SGLang: decode pod IP -> the engine id this engine last sent KV to there."""
        port = pod.env_value("VLLM_NIXL_SIDE_CHANNEL_PORT")
        self.side_channel_port = int(port) if port and port.isdigit() else NIXL_SIDE_CHANNEL_PORT
        bootstrap = pod.arg_value("--disaggregation-bootstrap-port")
        self.bootstrap_port = int(bootstrap) if bootstrap and bootstrap.isdigit() else MOONCAKE_BOOTSTRAP_PORT

    def service_seconds(self, prompt: int) -> float:
        cached = self._service.get(prompt)
        if cached is None:
            cached = self.config.prefill_seconds(prompt)
            if len(self._service) < 4096:
                self._service[prompt] = cached
        return cached

    def submit(self, request: LiveRequest, now: float) -> bool:
        """Queues a request arriving at `now` (call `advance(now)` first); False when the queue is full."""
        if self.replica.waiting >= MAX_QUEUE:
            self.stats.dropped += 1
            return False
        self.replica.submit(request, request.prompt, self.service_seconds(request.prompt), now)
        self._announce()
        return True

    def _announce(self) -> None:
        """Tells the listeners of a newly started batch when their answers are due."""
        batch = self.replica.batch
        if batch and batch is not self._announced:
            self._announced = batch
            for request, _, _ in batch:
                if request.listener is not None:
                    request.listener.prefill_done(self.replica.busy_until)

    def advance(self, now: float) -> list[tuple[float, LiveRequest]]:
        """Runs the batches that ended by `now`; their requests with their end times."""
        done: list[tuple[float, LiveRequest]] = []
        stats = self.stats
        for finished_at, batch in self.replica.advance(now):
            for request, prompt, service in batch:
                transfer = self.config.transfer_seconds(request.prompt)
                ttft = finished_at - request.received + transfer
                stats.ttft.observe(ttft)
                stats.e2e.observe(ttft)
                stats.queue_time.observe(max(0.0, finished_at - request.received - service))
                stats.prefill_time.observe(service)
                stats.decode_time.observe(0.0)
                stats.prompt_tokens += int(prompt)
                stats.generation_tokens += 1  # P/D: the prefill engine samples the first token only
                stats.requests += 1
                stats.prefills += 1
                done.append((finished_at, request))
            self._announce()
        return done

    def in_flight(self) -> int:
        """Requests this engine is still working on (SIGTERM waits for them)."""
        return self.replica.running + self.replica.waiting

    def shutdown(self) -> None:
        self.draining = True

    def gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV usage): the running batch and the KV caches held for decodes."""
        capacity = self.config.kv_capacity_tokens
        tokens = sum(p for _, p, _ in self.replica.batch) + self.held_tokens
        usage = min(1.0, tokens / capacity) if capacity > 0 else 0.0
        return self.replica.running, self.replica.waiting, usage


class DecodeEngine:
    """A decode pod: one slot of its service's `DecodePool`, with a FIFO of requests waiting for room."""

    role: Role = "decode"

    def __init__(self, config: EngineConfig, pod: PodObservation, pool: DecodePool, slot: int) -> None:
        self.config = config
        self.metrics = config.metrics
        self.stats = EngineStats(self.metrics)
        self.pool = pool
        self.slot = slot
        self.waiting: deque[LiveRequest] = deque()
        self.running: dict[int, LiveRequest] = {}
        self.failure_policy = kv_load_failure_policy(pod)
        self.waiting_timeout_s = _env_seconds(pod, "SGLANG_DISAGGREGATION_WAITING_TIMEOUT", SGLANG_WAITING_TIMEOUT_S)
        self.prefill_lost_s = max(2.0, _env_seconds(pod, "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL",
                                                    SGLANG_HEARTBEAT_INTERVAL_S)) * max(
            1.0, _env_seconds(pod, "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", SGLANG_HEARTBEAT_MAX_FAILURE))
        """SGLang: how long after its prefill's bootstrap server stops answering a waiting request fails."""
        self.step_seconds = 0.0
        self.tokens_per_s = 0.0
        self.engine_id = str(uuid.uuid4())
        self.compat = compat_key(pod)
        self.shutdown_timeout = shutdown_timeout(pod)
        self.draining = False
        self.peers: dict[tuple[str, int], str] = {}
        """vLLM: (prefill host, side-channel port) -> the engine id this engine last pulled KV from there."""

    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def shutdown(self) -> None:
        self.draining = True

    def submit(self, request: LiveRequest) -> bool:
        if len(self.waiting) >= MAX_QUEUE:
            self.stats.dropped += 1
            return False
        self.waiting.append(request)
        return True

    def recompute(self, request: LiveRequest, now: float) -> None:
        """No usable hand-off: this engine prefills the prompt itself before decoding it."""
        request.kv_source = "refused" if request.kv_source == "refused" else "recomputed"
        request.ready_at = now + self.config.prefill_seconds(request.prompt)
        self.stats.recomputed += 1
        self.stats.prompt_local += request.prompt

    def expire(self, now: float) -> list[LiveRequest]:
        """Fails the waiting requests whose KV never came by their deadline."""
        expired = [r for r in self.waiting if r.deadline <= now and r.ready_at > now]
        for request in expired:
            self.waiting.remove(request)
            self.stats.kv_failed += 1
            self.stats.failed += 1
        return expired

    def admit(self, now: float) -> None:
        """FIFO among the requests whose KV is in place: each joins the batch when the slot's free KV holds it.
        A request whose KV is still coming waits aside and holds up no other (vLLM's scheduler skips requests
        WAITING_FOR_REMOTE_KVS; SGLang's decode admits from its transfer queue only what has arrived)."""
        pool, slot, stats = self.pool, self.slot, self.stats
        if not self.waiting or (self.waiting[0].ready_at > now and len(self.waiting) == 1):
            return
        kept: deque[LiveRequest] = deque()
        looked = 0
        while self.waiting and looked < ADMIT_LOOKAHEAD:
            request = self.waiting.popleft()
            looked += 1
            if request.ready_at > now:
                kept.append(request)
                continue
            if request.prompt + request.output > pool.capacity:  # can never fit: the engine rejects it
                stats.dropped += 1
                stats.failed += 1
                if request.listener is not None:
                    request.listener.failed(now, 400, f"the request's {request.prompt + request.output} tokens "
                                                      f"exceed the KV cache ({int(pool.capacity)} tokens)")
                continue
            if pool.free_kv(slot) < request.prompt + request.output:
                self.waiting.appendleft(request)
                break
            request.start_clock = float(pool.clock[slot])
            request.admitted = now
            pool.admit(slot, request.id, float(request.prompt), float(request.output))
            self.running[request.id] = request
            if not request.started:
                request.started = True
                stats.prompt_tokens += request.prompt
                stats.queue_time.observe(max(0.0, now - min(request.ready_at, now)))
        kept.extend(self.waiting)
        self.waiting = kept

    def abort(self, request: LiveRequest) -> None:
        """The client went away: the request leaves the waiting list or the batch (freeing its KV)."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif self.running.pop(request.id, None) is not None:
            self.pool.abort(self.slot, request.id)

    def gauges(self) -> tuple[int, int, float]:
        capacity = self.pool.capacity
        usage = min(1.0, float(self.pool.reserved[self.slot]) / capacity) if capacity > 0 else 0.0
        return len(self.running), len(self.waiting), usage


Engine = PrefillEngine | DecodeEngine


class SimPod:
    """One served pod: its engine, its labels and its cached /metrics page."""

    def __init__(self, pod: PodObservation, service: ServiceSim, engine: Engine, port: int) -> None:
        self.pod = pod
        self.service = service
        self.engine = engine
        self.port = port
        self.labels: dict[str, str] = {
            "namespace": pod.namespace,
            "pod": pod.name,
            "disagg_service": pod.service,
            "disagg_role": pod.role,
            "model_name": service.spec.model.name,
        }
        self.label_text = label_text(list(self.labels.items()) + list(engine.metrics.constant_labels))
        self._page: tuple[int, str] | None = None
        self.fault: str | None = None
        """None, 'unhealthy' (/health and requests answer 503) or 'down' (nothing listens)."""

    @property
    def key(self) -> tuple[str, int]:
        return self.pod.ip, self.port

    @property
    def ref(self) -> str:
        return f"{self.pod.namespace}/{self.pod.name}"

    def metrics_page(self) -> str:
        tick = self.service.fleet.ticks
        if self._page is None or self._page[0] != tick:
            self._page = (tick, render_metrics(self.engine.metrics, self.label_text, self.engine.gauges(),
                                               self.engine.stats))
        return self._page[1]

    def summary(self) -> dict[str, Any]:
        running, waiting, kv = self.engine.gauges()
        stats = self.engine.stats
        out: dict[str, Any] = {
            "namespace": self.pod.namespace,
            "pod": self.pod.name,
            "service": self.pod.service,
            "role": self.pod.role,
            "address": f"{self.pod.ip}:{self.port}",
            "engine": self.engine.config.kind,
            "accelerator": f"{self.engine.config.accelerator.name} x{self.engine.config.tensor_parallel}",
            "fault": self.fault,
            "running": running,
            "waiting": waiting,
            "kv_usage": round(kv, 4),
            "prompt_tokens_total": stats.prompt_tokens,
            "generation_tokens_total": stats.generation_tokens,
            "requests_total": stats.requests,
            "dropped_total": stats.dropped,
            "failed_total": stats.failed,
            "prefills_total": stats.prefills,
            "kv_handed_off_total": stats.kv_sent,
            "kv_received_total": stats.kv_received,
            "prompts_recomputed_total": stats.recomputed,
            "kv_load_failures_total": stats.kv_failed,
            "kv_refused_total": stats.kv_refused,
            "engine_id": self.engine.engine_id,
            "revision": self.engine.compat,
            "draining": self.engine.draining,
            "in_flight": self.engine.in_flight(),
            "ttft_p90_s": _round(stats.ttft.quantile(0.9)),
        }
        if isinstance(self.engine, DecodeEngine):
            out["itl_p90_s"] = _round(stats.itl.quantile(0.9))
            out["step_s"] = round(self.engine.step_seconds, 5)
            out["generation_tokens_per_s"] = round(self.engine.tokens_per_s, 1)
            out["kv_load_failure_policy"] = self.engine.failure_policy
        return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


class ServiceSim:
    """One InferenceService: its engines' configuration, its decode pool, its injected load, its pods."""

    def __init__(self, fleet: FleetSim, namespace: str, name: str, spec: InferenceServiceSpec,
                 raw_spec: Mapping[str, Any]) -> None:
        self.fleet = fleet
        self.namespace = namespace
        self.name = name
        self.pods: dict[Role, dict[str, SimPod]] = {"prefill": {}, "decode": {}}
        seed = [fleet.seed, zlib.crc32(f"{namespace}/{name}".encode())]
        self.rng = np.random.default_rng(seed)
        self.offered = 0
        self.unserved = 0
        self.ever_served = False
        self.spec = spec
        self.raw_spec: Mapping[str, Any] = {}
        self.configure(spec, raw_spec)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def configure(self, spec: InferenceServiceSpec, raw_spec: Mapping[str, Any]) -> None:
        """(Re)computes engine configurations and the base load; raises LoadError/ModelConfigError."""
        fleet = self.fleet
        model = model_of(spec)
        link = kv_link_bytes_per_s(spec.prefill.parallelism.tensor, spec.decode.parallelism.tensor,
                                   fleet.kv_over_rdma)
        # a custom engine behaves as the engine whose P/D protocol it speaks, under its own metric names
        protocol, exported = spec.engine.kind, None
        if spec.engine.custom is not None:
            protocol = spec.engine.custom.protocol
            exported = custom_metrics(protocol, custom_metric_names(spec.engine.custom.metrics))
        configs = {
            role: EngineConfig(protocol, role, model, accelerator_of(spec, role, fleet.catalog),
                               getattr(spec, role).parallelism.tensor, link, fleet.efficiency, exported)
            for role in ROLES
        }
        base = base_load(spec, fleet.catalog, prompt_tokens=fleet.prompt_tokens, output_tokens=fleet.output_tokens,
                         share=fleet.base_share, kv_over_rdma=fleet.kv_over_rdma, efficiency=fleet.efficiency)
        decode = configs["decode"]
        self.spec = spec
        self.raw_spec = dict(raw_spec)
        self.configs: dict[Role, EngineConfig] = configs
        self.pool = DecodePool(decode.model, decode.accelerator, decode.tensor_parallel, decode.efficiency, size=4)
        self.pool_time = fleet.time
        self.base = base
        self.load = fleet.make_load(self.key, base)

    def ordered(self, role: Role) -> list[SimPod]:
        return [self.pods[role][name] for name in sorted(self.pods[role])]

    # -- the injected load's router (the simulator's: least outstanding prefill, most free decode KV)

    def route_prefill(self, request: LiveRequest, now: float) -> bool:
        best: PrefillEngine | None = None
        best_work = math.inf
        for pod in self.ordered("prefill"):
            engine = pod.engine
            assert isinstance(engine, PrefillEngine)
            if pod.fault is not None:
                continue
            work = engine.replica.outstanding(now)
            if work < best_work:
                best, best_work = engine, work
        if best is None:
            return False
        self.fleet.handle_prefilled(self, best.advance(now), best)
        return best.submit(request, now)

    def route_decode(self, request: LiveRequest, source: PrefillEngine) -> bool:
        pods = [p for p in self.ordered("decode") if p.fault is None]
        if not pods:
            return False
        best = max(pods, key=lambda p: self.pool.free_kv(p.engine.slot) if isinstance(p.engine, DecodeEngine) else 0)
        engine = best.engine
        assert isinstance(engine, DecodeEngine)
        request.kv_source = "transferred"
        source.stats.kv_sent += 1
        engine.stats.kv_received += 1
        return engine.submit(request)

    # -- time

    def tick(self, t0: float, now: float, ahead: float) -> None:
        fleet = self.fleet
        if self.ever_served:  # nothing is offered before the first pod is Ready (start-up, not an outage)
            for when, prompt, output in self.load.arrivals(t0, now, self.rng):
                self.offered += 1
                request = LiveRequest(fleet.next_id(), prompt, output, received=when, forward=True)
                if not self.route_prefill(request, when):
                    self.unserved += 1
        for pod in self.ordered("prefill"):
            engine = pod.engine
            assert isinstance(engine, PrefillEngine)
            fleet.handle_prefilled(self, engine.advance(now), engine)
        self.step_decode(now, ahead)

    def step_decode(self, now: float, ahead: float) -> None:
        """Admits what fits at the pool's time, then runs the decode pool up to `now + ahead`."""
        pool = self.pool
        start = max(self.pool_time, now - MAX_STEP_S)
        engines: dict[int, DecodeEngine] = {}
        for pod in self.ordered("decode"):
            engine = pod.engine
            assert isinstance(engine, DecodeEngine)
            engines[engine.slot] = engine
            for request in engine.expire(start):
                if request.listener is not None:
                    request.listener.failed(start, 500, "KV transfer failed: the prefill never came (waited "
                                                        f"{engine.waiting_timeout_s:g} s) or was lost (its bootstrap "
                                                        f"server unanswered for {engine.prefill_lost_s:g} s)")
            engine.admit(start)
        end = now + ahead
        dt = end - start
        self.pool_time = end
        if dt <= 0:
            return
        clock_before = pool.clock.copy()
        active, steps_s, _, tokens, finished = pool.step(end, dt)
        for engine in engines.values():
            engine.step_seconds = 0.0
            engine.tokens_per_s = 0.0
        for index, slot_value in enumerate(active.tolist()):
            engine_for_slot = engines.get(int(slot_value))
            if engine_for_slot is None:
                continue
            step = float(steps_s[index])
            engine_for_slot.step_seconds = step
            engine_for_slot.tokens_per_s = float(tokens[index]) / dt
            self._emit(engine_for_slot, float(clock_before[slot_value]), float(pool.clock[slot_value]), step, start)
        for slot, request_id, _, _, finished_at in finished:
            engine_done = engines.get(slot)
            if engine_done is None:
                continue
            if request_id not in engine_done.running:
                continue
            request = engine_done.running.pop(request_id)
            stats = engine_done.stats
            stats.e2e.observe(finished_at - request.received)
            first = request.first_token if request.first_token is not None else finished_at
            stats.decode_time.observe(max(0.0, finished_at - first))
            stats.requests += 1
            request.done = True
            if request.listener is not None:
                request.listener.finished(finished_at)

    def _emit(self, engine: DecodeEngine, clock0: float, clock1: float, step: float, start: float) -> None:
        """Each running sequence's tokens whose clock falls in (clock0, clock1], at their exact times."""
        stats = engine.stats
        generated = 0
        for request in engine.running.values():
            first_index = max(1, math.floor(clock0 - request.start_clock + 1e-9) + 1)
            last_index = min(request.output, math.floor(clock1 - request.start_clock + 1e-9))
            if last_index < first_index:
                continue
            for index in range(first_index, last_index + 1):
                at = start + (request.start_clock + index - clock0) * step
                if index == 1:
                    request.first_token = at
                    stats.ttft.observe(at - request.received)
                    stats.prefill_time.observe(at - (request.admitted if request.admitted is not None else at))
                else:
                    stats.itl.observe(step)
                generated += 1
                if request.listener is not None:
                    request.listener.token(index, at)
        stats.generation_tokens += generated

    def summary(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "engine": self.spec.engine.kind,
            "model": self.spec.model.name,
            "rps_now": round(self.load.rps_at(self.fleet.time), 4),
            "load": self.load.describe(),
            "base": {
                "rps": round(self.base.rps, 4),
                "prefill_capacity_rps": round(self.base.prefill_capacity_rps, 4),
                "decode_capacity_rps": round(self.base.decode_capacity_rps, 4),
                "prompt_tokens": self.base.prompt_tokens,
                "output_tokens": self.base.output_tokens,
            },
            "pods": {role: sorted(self.pods[role]) for role in ROLES},
            "offered_requests": self.offered,
            "unserved_requests": self.unserved,
        }


class FleetSim:
    """Every simulated service and pod; time advances only in `tick(now)`. No I/O."""

    def __init__(
        self,
        catalog: AcceleratorCatalog,
        *,
        seed: int = 0,
        prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
        output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        base_share: float = DEFAULT_BASE_SHARE,
        arrivals: str = "poisson",
        kv_over_rdma: bool = True,
        default_load: LoadSpec | None = None,
        loads: Mapping[tuple[str, str], LoadSpec] | None = None,
        traces_dir: Any = None,
        efficiency: Efficiency = DEFAULT_EFFICIENCY,
    ) -> None:
        if arrivals not in ("poisson", "uniform"):
            raise ValueError(f"arrivals must be poisson or uniform, got {arrivals!r}")
        self.catalog = catalog
        self.seed = seed
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.base_share = base_share
        self.arrivals = arrivals
        self.kv_over_rdma = kv_over_rdma
        self.efficiency = efficiency
        self.default_load = default_load or LoadSpec(steps=((0.0, 0.0, False),))
        self.loads: dict[tuple[str, str], LoadSpec] = dict(loads or {})
        self.load_set_at: dict[tuple[str, str], float] = {}
        self.traces_dir = traces_dir or default_traces_dir()
        self._workloads: dict[tuple[str, float], Workload] = {}
        self.time = 0.0
        self.ticks = 0
        self.services: dict[tuple[str, str], ServiceSim] = {}
        self.unsupported: dict[tuple[str, str], str] = {}
        self.pods: dict[str, SimPod] = {}
        self.kv_holds: dict[tuple[str, str], KVHold] = {}
        """(engine id, request id) -> a KV cache a vLLM prefill engine keeps for its decode."""
        self.rooms: dict[tuple[str, int, int], Room] = {}
        self.crashed: dict[str, str] = {}
        """uid -> why the engine of that pod crashed (a peer came back with a new identity): for the kubelet."""
        self._ids = itertools.count(1)
        for spec in [self.default_load, *self.loads.values()]:
            self.workload(spec)  # fail fast on a missing or bad trace

    def next_id(self) -> int:
        return next(self._ids)

    # -- loads

    def workload(self, spec: LoadSpec) -> Workload | None:
        if spec.trace is None:
            return None
        key = (spec.trace, spec.time_scale)
        if key not in self._workloads:
            path = resolve_trace(spec.trace, self.traces_dir)
            try:
                self._workloads[key] = scale_time(read_trace(path), spec.time_scale)
            except TraceError as error:
                raise LoadError(str(error)) from None
        return self._workloads[key]

    def make_load(self, key: tuple[str, str], base: BaseLoad) -> OfferedLoad:
        spec = self.loads.get(key, self.default_load)
        started = self.load_set_at.get(key, 0.0)
        return OfferedLoad(spec, base, started, process=self.arrivals, workload=self.workload(spec))

    def set_load(self, namespace: str, name: str, spec: LoadSpec | None) -> dict[str, Any]:
        """Sets (None: resets to the default) a service's load from the next tick on; its schedule starts now."""
        key = (namespace, name)
        if spec is None:
            self.loads.pop(key, None)
        else:
            self.workload(spec)
            self.loads[key] = spec
        self.load_set_at[key] = self.time
        service = self.services.get(key)
        if service is not None:
            service.load = self.make_load(key, service.base)
            return {"service": f"{namespace}/{name}", "known": True, **service.load.describe()}
        return {"service": f"{namespace}/{name}", "known": False, "spec": (spec or self.default_load).text()}

    # -- services and pods

    def upsert_service(self, namespace: str, name: str, raw_spec: Mapping[str, Any]) -> str | None:
        """Adds or updates a service from its spec; the reason when it cannot be simulated, else None."""
        key = (namespace, name)
        existing = self.services.get(key)
        if existing is not None and existing.raw_spec == raw_spec:
            return None
        if existing is not None and _engine_model(existing.raw_spec) == _engine_model(raw_spec):
            existing.raw_spec = dict(raw_spec)  # a pool resized, a router or drain edit: the engines run on
            return None
        try:
            spec = InferenceServiceSpec.model_validate(dict(raw_spec))
            if existing is None:
                self.services[key] = ServiceSim(self, namespace, name, spec, raw_spec)
            else:
                for uid in [u for u, p in self.pods.items() if p.service is existing]:
                    self.remove_pod(uid)
                existing.configure(spec, raw_spec)
        except (ValidationError, LoadError, ModelConfigError, ValueError) as error:
            reason = f"cannot simulate {namespace}/{name}: {str(error).splitlines()[0]}"
            if existing is not None:
                self.remove_service(namespace, name)
            self.unsupported[key] = reason
            return reason
        self.unsupported.pop(key, None)
        return None

    def remove_service(self, namespace: str, name: str) -> list[str]:
        """Forgets a service and its pods; the uids of the pods removed."""
        key = (namespace, name)
        self.unsupported.pop(key, None)
        service = self.services.get(key)
        if service is None:
            return []
        removed = [uid for uid, pod in self.pods.items() if pod.service is service]
        for uid in removed:
            self.remove_pod(uid)
        del self.services[key]
        return removed

    def add_pod(self, pod: PodObservation) -> SimPod:
        """Starts simulating a Ready pod (its service must be known)."""
        existing = self.pods.get(pod.uid)
        if existing is not None:
            return existing
        service = self.services[(pod.namespace, pod.service)]
        config = service.configs[pod.role]
        engine: Engine
        if pod.role == "prefill":
            engine = PrefillEngine(config, pod)
        else:
            engine = DecodeEngine(config, pod, service.pool, service.pool.add(self.time, self.time))
        sim_pod = SimPod(pod, service, engine, service.spec.engine.port)
        service.pods[pod.role][pod.name] = sim_pod
        service.ever_served = True
        self.pods[pod.uid] = sim_pod
        return sim_pod

    def remove_pod(self, uid: str) -> SimPod | None:
        """Stops simulating a pod: its requests fail, its decode slot is freed, its KV holds are dropped."""
        pod = self.pods.pop(uid, None)
        if pod is None:
            return None
        service = pod.service
        service.pods[pod.pod.role].pop(pod.pod.name, None)
        engine = pod.engine
        requests: list[LiveRequest] = []
        if isinstance(engine, DecodeEngine):
            requests = [*engine.waiting, *engine.running.values()]
            engine.waiting.clear()
            engine.running.clear()
            service.pool.release(engine.slot)
        else:
            requests = [r for r, _, _ in [*engine.replica.batch, *engine.replica.queue]]
            for key in [k for k, hold in self.kv_holds.items() if hold.holder_uid == uid]:
                del self.kv_holds[key]
            self._prefill_lost(pod.pod.ip)
        for request in requests:
            if request.listener is not None and not request.done:
                request.listener.failed(self.time, 503, "the engine went away")
        return pod

    def _prefill_lost(self, ip: str) -> None:
        """SGLang: the decode requests waiting on the prefill at `ip` fail when their engine's heartbeat gives
        that prefill up (unless an engine serves there again by then)."""
        for key, room in self.rooms.items():
            if key[0] != ip or room.decode is None:
                continue
            decode = self.pods.get(room.decode[0])
            if decode is not None and isinstance(decode.engine, DecodeEngine):
                request = room.decode[1]
                request.deadline = min(request.deadline, self.time + decode.engine.prefill_lost_s)

    def pod_at(self, ip: str, role: Role | None = None) -> SimPod | None:
        for pod in self.pods.values():
            if pod.pod.ip == ip and (role is None or pod.pod.role == role):
                return pod
        return None

    # -- the P/D hand-off

    def handle_prefilled(self, service: ServiceSim, done: list[tuple[float, LiveRequest]],
                         engine: PrefillEngine) -> None:
        """Bookkeeping of finished prefills: the hand-off of injected load, KV holds, SGLang rooms."""
        holder = next((p for p in service.pods["prefill"].values() if p.engine is engine), None)
        for finished_at, request in done:
            request.done = True
            if request.forward:
                handed = LiveRequest(self.next_id(), request.prompt, request.output, received=finished_at,
                                     ready_at=finished_at + engine.config.transfer_seconds(request.prompt))
                handed.prefill_pod = holder.ref if holder is not None else ""
                if not service.route_decode(handed, engine):
                    service.unserved += 1
                continue
            if holder is None or not request.hold_kv:
                continue
            if request.room is not None:
                self._room_prefilled(request.room, holder, finished_at, request.prompt)
                continue
            engine_kind = engine.config.kind
            if engine_kind == "vllm":
                request_id = f"cmpl-{holder.pod.uid[:8]}-{request.id}"
                self.kv_holds[(engine.engine_id, request_id)] = KVHold(
                    holder.pod.uid, request.prompt, finished_at + NIXL_ABORT_REQUEST_TIMEOUT_S)
                engine.held_tokens += request.prompt
                blocks = max(1, math.ceil(request.prompt / 16))
                request.kv_params = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_block_ids": list(range(1, blocks + 1)),
                    "remote_engine_id": engine.engine_id,
                    "remote_request_id": request_id,
                    "remote_host": holder.pod.ip,
                    "remote_port": engine.side_channel_port,
                    "tp_size": engine.config.tensor_parallel,
                }

    def claim_kv(self, decode: SimPod, params: Mapping[str, Any], request: LiveRequest, now: float) -> str | None:
        """vLLM decode leg: pulls the KV cache its parameters name (None), or says why it cannot. A prefill of
        another revision is refused (`kv_source` 'refused'); a prefill engine that came back at an address
        this decode pulled from before, with a new identity, crashes the decode (`crashed`)."""
        host, port = params.get("remote_host"), params.get("remote_port")
        holder = self.pod_at(str(host), "prefill") if isinstance(host, str) else None
        assert isinstance(decode.engine, DecodeEngine)
        if holder is None or not isinstance(holder.engine, PrefillEngine) or holder.fault == "down":
            decode.engine.stats.kv_transfer_failed += 1
            return f"no prefill engine answers at {host}:{port}"
        engine = holder.engine
        if holder.service is not decode.service:
            return f"{holder.ref} is another service's prefill engine (its KV port is closed to this one)"
        if port != engine.side_channel_port or params.get("remote_engine_id") != engine.engine_id:
            return f"{host}:{port} is not engine {params.get('remote_engine_id')}"
        peer = (str(host), int(port))
        known = decode.engine.peers.get(peer)
        if known is not None and known != engine.engine_id:
            self.crashed[decode.pod.uid] = (f"segfault in NIXL loadRemoteMD: {holder.ref} at {host}:{port} came back "
                                            f"as engine {engine.engine_id[:8]} (was {known[:8]})")
            return f"the decode engine crashed handshaking with {host}:{port}"
        decode.engine.peers[peer] = engine.engine_id
        key = (engine.engine_id, str(params.get("remote_request_id")))
        if engine.compat != decode.engine.compat:
            hold = self.kv_holds.pop(key, None)
            if hold is not None:
                engine.held_tokens -= hold.tokens
            decode.engine.stats.kv_refused += 1
            decode.engine.stats.kv_transfer_failed += 1
            request.kv_source = "refused"
            request.prefill_pod = holder.ref
            return (f"{holder.ref} runs revision {engine.compat}, this engine {decode.engine.compat}: the KV layouts "
                    "differ (hand-off refused)")
        hold = self.kv_holds.pop(key, None)
        if hold is None:
            return f"engine {engine.engine_id} holds no KV cache for {key[1]} (consumed or expired)"
        engine.held_tokens -= hold.tokens
        engine.stats.kv_sent += 1
        decode.engine.stats.kv_received += 1
        decode.engine.stats.kv_bytes.observe(request.prompt * decode.engine.config.model.kv_bytes_per_token)
        decode.engine.stats.prompt_external += request.prompt
        request.kv_source = "transferred"
        request.prefill_pod = holder.ref
        request.ready_at = now + decode.engine.config.transfer_seconds(request.prompt)
        return None

    def open_room(self, room: tuple[str, int, int], now: float) -> Room:
        existing = self.rooms.get(room)
        if existing is None:
            existing = self.rooms[room] = Room(created=now)
        return existing

    def _room_prefilled(self, key: tuple[str, int, int], holder: SimPod, at: float, prompt: int) -> None:
        room = self.open_room(key, at)
        room.prefill_uid = holder.pod.uid
        room.prefill_done_at = at
        room.prompt = prompt
        if room.decode is not None:
            self._room_transfer(key, room)

    def join_room(self, decode: SimPod, request: LiveRequest, now: float) -> None:
        """SGLang decode leg: waits in its room for the prefill of the same request."""
        assert isinstance(decode.engine, DecodeEngine) and request.room is not None
        request.deadline = now + decode.engine.waiting_timeout_s
        if self.pod_at(request.room[0], "prefill") is None:  # no bootstrap server answers there
            request.deadline = min(request.deadline, now + decode.engine.prefill_lost_s)
        room = self.open_room(request.room, now)
        room.decode = (decode.pod.uid, request)
        if room.prefill_done_at is not None:
            self._room_transfer(request.room, room)

    def _room_transfer(self, key: tuple[str, int, int], room: Room) -> None:
        assert room.decode is not None and room.prefill_done_at is not None and room.prefill_uid is not None
        decode_uid, request = room.decode
        decode, holder = self.pods.get(decode_uid), self.pods.get(room.prefill_uid)
        del self.rooms[key]
        if decode is None or holder is None or holder.service is not decode.service:
            return  # the decode waits until its deadline: SGLang fails it then
        assert isinstance(decode.engine, DecodeEngine) and isinstance(holder.engine, PrefillEngine)
        at = max(room.prefill_done_at, request.received)
        known = holder.engine.peers.get(decode.pod.ip)
        if known is not None and known != decode.engine.engine_id:
            self.crashed[holder.pod.uid] = (f"segfault in NIXL add_remote_agent: {decode.ref} at {decode.pod.ip} came "
                                            f"back as engine {decode.engine.engine_id[:8]} (was {known[:8]})")
            self._fail_transfer(decode.engine, request, at, "KV transfer failed: the prefill engine crashed")
            return
        holder.engine.peers[decode.pod.ip] = decode.engine.engine_id
        if holder.engine.compat != decode.engine.compat:
            decode.engine.stats.kv_refused += 1
            request.kv_source = "refused"
            request.prefill_pod = holder.ref
            self._fail_transfer(decode.engine, request, at,
                                f"KV transfer refused: {holder.ref} runs revision {holder.engine.compat}, this engine "
                                f"{decode.engine.compat}")
            return
        holder.engine.stats.kv_sent += 1
        decode.engine.stats.kv_received += 1
        transfer_s = decode.engine.config.transfer_seconds(request.prompt)
        decode.engine.stats.kv_transfer_ms.observe(transfer_s * 1000.0)
        decode.engine.stats.prompt_external += request.prompt
        request.kv_source = "transferred"
        request.prefill_pod = holder.ref
        request.ready_at = at + transfer_s

    @staticmethod
    def _fail_transfer(engine: DecodeEngine, request: LiveRequest, at: float, message: str) -> None:
        """SGLang: the decode fails a request whose KV cannot come (it does not recompute)."""
        if request in engine.waiting:
            engine.waiting.remove(request)
        engine.stats.kv_transfer_failed += 1
        engine.stats.kv_failed += 1
        engine.stats.failed += 1
        request.done = True
        if request.listener is not None:
            request.listener.failed(at, 500, message)

    def abort(self, pod: SimPod, request: LiveRequest) -> None:
        """A request's client went away before it finished."""
        if request.done:
            return
        engine = pod.engine
        if isinstance(engine, DecodeEngine):
            engine.abort(request)
        else:
            kept = deque(item for item in engine.replica.queue if item[0] is not request)
            if len(kept) != len(engine.replica.queue):
                engine.replica.queue = kept
                engine.replica.queued_work = sum(item[2] for item in kept)
        if request.room is not None:
            room = self.rooms.get(request.room)
            if room is not None and room.decode is not None and room.decode[1] is request:
                room.decode = None

    # -- time

    def tick(self, now: float, ahead: float = 0.0) -> None:
        """Advances to `now` (seconds since the start); decode slots run `ahead` seconds further."""
        t0 = self.time
        now = max(now, t0)
        for key in sorted(self.services):
            self.services[key].tick(t0, now, ahead)
        self._expire(now)
        self.ticks += 1
        self.time = now

    def run(self, seconds: float, dt: float = 0.25) -> None:
        """Advances by `seconds` in steps of `dt` (tests and offline use)."""
        for _ in range(max(0, round(seconds / dt))):
            self.tick(self.time + dt)

    def _expire(self, now: float) -> None:
        for key, hold in list(self.kv_holds.items()):
            if hold.expires_at <= now:
                del self.kv_holds[key]
                pod = self.pods.get(hold.holder_uid)
                if pod is not None and isinstance(pod.engine, PrefillEngine):
                    pod.engine.held_tokens -= hold.tokens
                    pod.engine.stats.kv_expired += 1
        for room_key, room in list(self.rooms.items()):
            if room.decode is None and now - room.created > SGLANG_BOOTSTRAP_TIMEOUT_S:
                del self.rooms[room_key]

    # -- reports

    def load_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in sorted(set(self.services) | set(self.loads)):
            service = self.services.get(key)
            name = f"{key[0]}/{key[1]}"
            if service is not None:
                out[name] = {"known": True, "rps_now": round(service.load.rps_at(self.time), 4),
                             **service.load.describe()}
            else:
                out[name] = {"known": False, "spec": self.loads[key].text()}
        return out

    def state(self) -> dict[str, Any]:
        return {
            "time_s": round(self.time, 3),
            "ticks": self.ticks,
            "seed": self.seed,
            "services": [self.services[k].summary() for k in sorted(self.services)],
            "unsupported": {f"{ns}/{n}": reason for (ns, n), reason in sorted(self.unsupported.items())},
            "pods": [p.summary() for p in sorted(self.pods.values(), key=lambda p: (p.pod.namespace, p.pod.name))],
            "kv_holds": len(self.kv_holds),
            "rooms": len(self.rooms),
        }


def engine_metrics(kind: str) -> EngineMetrics:
    return ENGINE_METRICS[kind]
