"""Typed helpers that turn a validated spec into the values the templates print.

Everything here is pure: no client, no clock, no environment. The same spec always gives the same
values, which is what makes `disagg render` and the golden tests exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from disagg import GROUP, KIND, VERSION
from disagg.api.quantity import quantity_bytes
from disagg.api.v1alpha1 import CHILD_SEPARATOR, InferenceServiceSpec, NetworkPolicyPeer, PoolSpec
from disagg.catalog.accelerators import Accelerator, AcceleratorCatalog
from disagg.engines import ROUTER_METRICS_PORT, Role, engine_adapter, kv_port
from disagg.engines.base import KV_DISK_DIR
from disagg.render import multinode
from disagg.render.drain import ROUTER_DEREGISTER_S, pool_drain, router_grace_seconds
from disagg.wellknown import (
    LWS_WORKER_INDEX_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    ROLE_LABEL,
    ROUTER,
    SERVICE_LABEL,
)

MODEL_DIR = "/models"
CACHE_DIR = "/model-cache"
ENGINE_HOME = "/home/engine"
# The engines run as this uid (vLLM's images ship it as the user `vllm`; SGLang's have no user of that
# uid, so HOME and USER come from the environment): HOME is a writable emptyDir, where HF, vLLM, Triton,
# Inductor and FlashInfer keep their caches, and USER lets Python's getpass name a uid /etc/passwd lacks.
ENGINE_UID = 2000
RDMA_POD_SECURITY = (
    "privileged: kvTransfer.rdma pins KV buffers for the NIC, which needs CAP_IPC_LOCK; Kubernetes grants an "
    "added capability only to root (no ambient capabilities), so these engine pods run as uid 0 with "
    "IPC_LOCK added and every other capability dropped. They fail Pod Security baseline (IPC_LOCK) and "
    "restricted (root): a namespace enforcing either refuses them."
)
# A child that is not a Deployment, a PDB or the router's RBAC is named `<name>--<part>`: an
# InferenceService's name may not contain "--" (a CEL rule on metadata.name), so no service's
# children can take another's name (`a` and `a-metrics` once both rendered Service/a-metrics).
# Deployments, PDBs and the router's RBAC objects keep `<name>-<role>`: one word after the last dash,
# which no other service of the same kind can produce (and renaming a Deployment restarts its pods).
# Prometheus pods (kube-prometheus-stack and the Prometheus operator label them so) in the namespace
# `monitoring`: who may scrape the engines when neither the spec nor `disagg run --metrics-scrapers`
# says otherwise (the chart passes its networkPolicy.metricsScrapers, the same by default)
DEFAULT_METRICS_SCRAPERS: tuple[NetworkPolicyPeer, ...] = (
    NetworkPolicyPeer.model_validate({
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }),
)
# Startup can take tens of minutes for large models (weights download, compilation, CUDA graphs).
STARTUP_FAILURE_THRESHOLD = 240
STARTUP_PERIOD_S = 10


@dataclass(frozen=True)
class Owner:
    """The InferenceService that owns the children (for owner references)."""

    name: str
    namespace: str | None
    uid: str | None = None

    def reference(self) -> list[dict[str, Any]]:
        if self.uid is None:
            return []
        return [{
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }]


def part_name(service: str, part: str) -> str:
    """The name of a child of `service` that is not its endpoint, a Deployment, a PDB or router RBAC."""
    return f"{service}{CHILD_SEPARATOR}{part}"


def kv_service_name(service: str, role: str) -> str:
    """The headless KV-transfer Service of one pool."""
    return part_name(service, f"{role}-kv")


def labels(owner: Owner, role: str, app: str) -> dict[str, str]:
    """The labels every child of the service carries."""
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": role,
        "app.kubernetes.io/part-of": "disagg",
        MANAGED_BY_LABEL: MANAGED_BY,
        SERVICE_LABEL: owner.name,
        ROLE_LABEL: role,
    }


def selector(owner: Owner, role: str) -> dict[str, str]:
    """Selector labels: only the two stable ones, since a Deployment's selector is immutable."""
    return {SERVICE_LABEL: owner.name, ROLE_LABEL: role}


@dataclass(frozen=True)
class ModelSource:
    """How the engine finds the weights, and the volume that holds them."""

    argument: str
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    extra_args: list[str] = field(default_factory=list)


def model_source(spec: InferenceServiceSpec) -> ModelSource:
    uri = spec.model.uri
    scheme, rest = uri.split("://", 1)
    cache_volume = {"name": "model-cache", "emptyDir": {}}
    cache_mount = {"name": "model-cache", "mountPath": CACHE_DIR}
    if scheme == "hf":
        return ModelSource(rest, [cache_volume], [cache_mount])
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": "model", "mountPath": MODEL_DIR, "readOnly": True}
        return ModelSource(f"{MODEL_DIR}/{path}".rstrip("/"), [volume], [mount])
    # s3:// and gs:// stream straight from object storage (vLLM's Run:ai model streamer)
    return ModelSource(uri, [cache_volume], [cache_mount], ["--load-format", "runai_streamer"])


@dataclass(frozen=True)
class Pool:
    """Everything the pool templates print for one role."""

    role: Role
    name: str
    kv_service: str
    replicas: int | None
    initial_replicas: int
    labels: dict[str, str]
    selector: dict[str, str]
    image: str
    command: list[str]
    args: list[str]
    env: list[dict[str, Any]]
    env_from: list[dict[str, Any]]
    service_account: str | None
    ports: list[dict[str, Any]]
    kv_ports: list[int]
    resources: dict[str, Any]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any] | None
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    annotations: dict[str, str]
    pod_security_context: dict[str, Any]
    security_context: dict[str, Any]
    pod_security: str
    """The Pod Security level the pods meet and why (an annotation: the rendered object's comment)."""
    termination_grace_s: int
    prestop: list[str]
    """The engine container's preStop command: wait for the routers, then for the requests in flight."""
    group: multinode.Group | None = None
    """A worker over several nodes: the LeaderWorkerSet group's leader and workers (None: a Deployment)."""
    min_ready_s: int = 10
    """minReadySeconds of a Deployment pool: a new worker counts as available (and an old one may leave) once
    Ready this long: both routers add a worker they discovered after checking its health, and drop a leaving
    one at once."""


def _resources(pool: PoolSpec, resource_name: str, spec: InferenceServiceSpec) -> dict[str, Any]:
    requests: dict[str, Any] = dict(pool.resources.requests)
    limits: dict[str, Any] = dict(pool.resources.limits)
    # Extended resources cannot be overcommitted: request and limit must be equal.
    requests[resource_name] = str(pool.accelerator.count)
    limits[resource_name] = str(pool.accelerator.count)
    rdma = spec.kv_transfer.rdma
    if rdma is not None:
        requests[rdma.resource] = str(rdma.count)
        limits[rdma.resource] = str(rdma.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = dict(sorted(requests.items()))
    if limits:
        out["limits"] = dict(sorted(limits.items()))
    return out


def _engine_command(
    spec: InferenceServiceSpec, role: Role, source: ModelSource, port_kv: int
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    pool: PoolSpec = getattr(spec, role)
    engine = spec.engine
    tiers = spec.kv_cache
    disk_gib = _gib(tiers.disk.size) if tiers is not None and tiers.disk is not None else None
    rendered = engine_adapter(engine).pool_command(spec, role, source.argument, source.extra_args, port_kv, disk_gib)
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HF_HOME", "value": CACHE_DIR},
        {"name": "HOME", "value": ENGINE_HOME},
        {"name": "USER", "value": "engine"},
        *rendered.env,
    ]
    args = [*rendered.args, *pool_drain(spec, role).engine_args, *engine.extra_args, *pool.extra_args]
    env += [var.manifest() for var in engine.env]
    return rendered.command, args, env


def _gib(quantity: str) -> int:
    """A Kubernetes quantity (validated: at least 1Gi) in whole GiB."""
    return int(quantity_bytes(quantity) // 2**30)


@dataclass(frozen=True)
class _Placement:
    """Where a pool's pods go and what they request: the accelerator's resource and node labels."""

    accelerator: Accelerator | None
    resource_name: str
    node_selector: dict[str, str]
    default_image: str


def _placement(spec: InferenceServiceSpec, pool: PoolSpec, catalog: AcceleratorCatalog) -> _Placement:
    engine = engine_adapter(spec.engine)
    acc = pool.accelerator
    if acc.type is not None:
        accelerator = catalog[acc.type]
        node_selector = {**accelerator.node_labels, **pool.node_selector}
        return _Placement(accelerator, accelerator.resource_name, dict(sorted(node_selector.items())),
                          engine.images.get(accelerator.vendor, ""))
    assert acc.resource_name is not None
    node_selector = {**(acc.node_selector or {}), **pool.node_selector}
    return _Placement(None, acc.resource_name, dict(sorted(node_selector.items())), engine.images.get("nvidia", ""))


def _storage(spec: InferenceServiceSpec, source: ModelSource) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the engine's mounts: the weights, shared memory, a writable home, the KV disk tier."""
    volumes = [*source.volumes, {"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "home", "emptyDir": {}}]
    mounts = [*source.mounts, {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "home", "mountPath": ENGINE_HOME}]
    tiers = spec.kv_cache
    if tiers is not None and tiers.disk is not None:
        if tiers.disk.storage_class_name:
            volumes.append({"name": "kv-disk", "ephemeral": {"volumeClaimTemplate": {"spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": tiers.disk.storage_class_name,
                "resources": {"requests": {"storage": tiers.disk.size}},
            }}}})
        else:
            volumes.append({"name": "kv-disk", "emptyDir": {"sizeLimit": tiers.disk.size}})
        mounts.append({"name": "kv-disk", "mountPath": KV_DISK_DIR})
    return volumes, mounts


def _initial_replicas(pool: PoolSpec) -> int:
    """The count a new pool starts at (an autoscaled one: `replicas` within its bounds)."""
    if pool.autoscaling is None:
        return pool.replicas
    return min(max(pool.replicas, pool.autoscaling.min_replicas), pool.autoscaling.max_replicas)


def pool_values(
    owner: Owner, spec: InferenceServiceSpec, role: Role, catalog: AcceleratorCatalog
) -> Pool:
    """The values of one pool's Deployment."""
    pool: PoolSpec = getattr(spec, role)
    engine = engine_adapter(spec.engine)
    place = _placement(spec, pool, catalog)
    source = model_source(spec)
    port_kv = kv_port(spec.kv_transfer.connector, spec.engine.protocol, spec.kv_transfer.port)
    # One listener per pod serves every TP rank's handshake (vLLM's NIXL side channel, the bootstrap servers)
    kv_ports = [port_kv] if engine.kv_listens(role) else []
    command, args, env = _engine_command(spec, role, source, port_kv)
    drain = pool_drain(spec, role)
    ports = [{"name": "http", "containerPort": spec.engine.port, "protocol": "TCP"}]
    ports += [{"name": f"kv-{i}", "containerPort": p, "protocol": "TCP"} for i, p in enumerate(kv_ports)]
    volumes, mounts = _storage(spec, source)
    tolerations = [{"key": place.resource_name, "operator": "Exists", "effect": "NoSchedule"}]
    tolerations += [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    return Pool(
        role=role,
        name=f"{owner.name}-{role}",
        kv_service=kv_service_name(owner.name, role),
        replicas=None if pool.autoscaling is not None else pool.replicas,
        initial_replicas=_initial_replicas(pool),
        labels=labels(owner, role, spec.engine.kind),
        selector=selector(owner, role),
        image=pool.image or spec.engine.image or place.default_image,
        command=command,
        args=args,
        env=env,
        env_from=[source.manifest() for source in spec.engine.env_from],
        service_account=pool.service_account_name,
        ports=ports,
        kv_ports=kv_ports,
        resources=_resources(pool, place.resource_name, spec),
        node_selector=place.node_selector,
        tolerations=tolerations,
        affinity=multinode.placement(owner.name, role, spec, pool, place.accelerator, pool.affinity),
        volumes=volumes,
        mounts=mounts,
        annotations=engine.pool_annotations(role, port_kv),
        **_pod_security(spec),
        # a leaving worker finishes what it holds first (render/drain.py)
        termination_grace_s=drain.grace_s,
        prestop=drain.prestop,
        group=engine.group(pool, command, args, env) if pool.multi_node else None,
    )


def _pod_security(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Pod Security `restricted` (non-root, no capability, no privilege escalation, RuntimeDefault
    seccomp), except what RDMA needs (see RDMA_POD_SECURITY)."""
    seccomp = {"type": "RuntimeDefault"}
    if spec.kv_transfer.rdma is not None:
        return {
            "pod_security_context": {"runAsUser": 0, "seccompProfile": seccomp},
            "security_context": {"allowPrivilegeEscalation": False,
                                 "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}},
            "pod_security": RDMA_POD_SECURITY,
        }
    return {
        # fsGroup: the KV disk of a storage class is writable; OnRootMismatch: a volume already right is
        # not walked again on every start
        "pod_security_context": {"runAsNonRoot": True, "runAsUser": ENGINE_UID, "runAsGroup": ENGINE_UID,
                                 "fsGroup": ENGINE_UID, "fsGroupChangePolicy": "OnRootMismatch",
                                 "seccompProfile": seccomp},
        "security_context": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "pod_security": "restricted",
    }


@dataclass(frozen=True)
class Router:
    """Everything the router templates print."""

    name: str
    replicas: int
    labels: dict[str, str]
    selector: dict[str, str]
    image: str
    command: list[str]
    args: list[str]
    port: int
    metrics_port: int
    readiness_path: str
    """Ready when the router can serve: it has a healthy worker of each role (both routers' /readiness)."""
    liveness_path: str
    """Alive while the process answers (vllm-router /liveness, sglang-router /health): a worker going
    down must not restart the router nor take it out of its Service."""
    grace_s: int
    """terminationGracePeriodSeconds: the preStop sleep, then the longest request's stream."""
    prestop_sleep_s: int
    """The preStop hook's sleep: clients stop picking the endpoint before the router stops accepting."""
    min_ready_s: int
    """minReadySeconds of the router Deployment: how long a new router is Ready before an old one leaves."""
    metrics_service: str
    """Headless Service `<name>--metrics` (was `<name>-metrics`, and before that `<name>-router` with a
    cluster IP: the reconcile of a service made before creates the new one and deletes the old)."""


ROUTER_MIN_READY_S = 5
ROUTER_HEALTH_CHECK_INTERVAL_S = 2
ROUTER_HEALTH_CHECK_TIMEOUT_S = 2
ROUTER_HEALTH_FAILURE_THRESHOLD = 2


def router_values(owner: Owner, spec: InferenceServiceSpec) -> Router:
    engine = engine_adapter(spec.engine)
    namespace = owner.namespace or "default"
    prefill_selector = [f"{SERVICE_LABEL}={owner.name}", f"{ROLE_LABEL}=prefill"]
    decode_selector = [f"{SERVICE_LABEL}={owner.name}", f"{ROLE_LABEL}=decode"]
    # a multi-node worker serves HTTP on its leader only: the router discovers leaders
    if spec.prefill.multi_node:
        prefill_selector.append(f"{LWS_WORKER_INDEX_LABEL}=0")
    if spec.decode.multi_node:
        decode_selector.append(f"{LWS_WORKER_INDEX_LABEL}=0")
    common = [
        "--host", "0.0.0.0",
        "--port", str(spec.router.port),
        "--policy", spec.router.policy,
        "--service-discovery",
        "--prefill-selector", *prefill_selector,
        "--decode-selector", *decode_selector,
        "--service-discovery-port", str(spec.engine.port),
        "--service-discovery-namespace", namespace,
        "--prometheus-port", str(ROUTER_METRICS_PORT),
        # explicit for both (vllm-router's default is 127.0.0.1, sglang-router's all interfaces)
        "--prometheus-host", "0.0.0.0",
        # a worker that stops answering leaves the rotation within ~5 s (the routers' defaults, a check
        # every 60 s and 3 failures, keep sending it every other request for up to 3 minutes; vllm-router
        # does not retry a prefill/decode pair, so each of those requests fails)
        "--health-check-interval-secs", str(ROUTER_HEALTH_CHECK_INTERVAL_S),
        "--health-check-timeout-secs", str(ROUTER_HEALTH_CHECK_TIMEOUT_S),
        "--health-failure-threshold", str(ROUTER_HEALTH_FAILURE_THRESHOLD),
    ]
    router = engine.router(spec.kv_transfer.connector, common, router_grace_seconds(spec) - ROUTER_DEREGISTER_S)
    return Router(
        name=f"{owner.name}-router",
        replicas=spec.router.replicas,
        labels=labels(owner, ROUTER, router.app),
        selector=selector(owner, ROUTER),
        image=spec.router.image or engine.router_image,
        command=router.command,
        args=router.args,
        port=spec.router.port,
        metrics_port=ROUTER_METRICS_PORT,
        readiness_path="/readiness",
        liveness_path=router.liveness_path,
        grace_s=router_grace_seconds(spec),
        prestop_sleep_s=ROUTER_DEREGISTER_S,
        min_ready_s=ROUTER_MIN_READY_S,
        metrics_service=part_name(owner.name, "metrics"),
    )
