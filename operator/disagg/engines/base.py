"""What the operator asks of an inference engine: one protocol, one module per engine beside it.

An adapter holds everything engine-specific: images, the command and arguments per role, the environment,
the KV ports and connector configuration, the router's command, the metric names behind the autoscaler's
signals, the flags the operator owns and the layout rules. Everything outside `disagg.engines` looks an
engine up by `spec.engine.kind` and never branches on it.

The spec types are imported for type checking only: adapters sit below `disagg.api` in the layers (the API
models read the flag tables) and read the spec they are given by attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from disagg.wellknown import Role

if TYPE_CHECKING:
    from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec

NIXL_SIDE_CHANNEL_PORT = 5600
MOONCAKE_BOOTSTRAP_PORT = 8998
ROUTER_METRICS_PORT = 29000
KV_DISK_DIR = "/kv-cache"

# A multi-node worker is a LeaderWorkerSet group (render/multinode.py); the LWS pod webhook gives every pod
# these variables, which Kubernetes expands in the engine's arguments.
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"
WORKER_INDEX = "$(LWS_WORKER_INDEX)"
DIST_PORT = 29500
"""torch.distributed rendezvous of vLLM's --master-port and SGLang's --dist-init-addr."""
DP_RPC_PORT = 13345
"""vLLM's data-parallel coordination (--data-parallel-rpc-port), vLLM's documented example port."""
DP_SIZE_LOCAL_ENV = "DISAGG_DP_SIZE_LOCAL"
START_RANK_SCRIPT = 'exec "$0" "$@" --data-parallel-start-rank "$((LWS_WORKER_INDEX * DISAGG_DP_SIZE_LOCAL))"'
"""A worker's first data-parallel rank: its index times the ranks per node. Constant text: the engine
command and every argument follow as positional parameters, never inside the script."""


@dataclass(frozen=True)
class MetricNames:
    """An engine's Prometheus metric names behind the phase signals the autoscaler uses.

    Gauges may have a legacy name (older releases); queries accept either.
    """

    waiting_requests: tuple[str, ...]
    running_requests: tuple[str, ...]
    kv_cache_usage: tuple[str, ...]
    prompt_tokens_total: str
    generation_tokens_total: str
    ttft_histogram: str
    itl_histogram: tuple[str, ...]
    e2e_histogram: str
    prompt_histogram: str
    """Prompt tokens per request: which requests are too long for any replica count to serve in time."""
    kv_handed: str = ""
    """Counter on the decode side: prompts (or their tokens) whose KV a prefill worker handed off."""
    kv_recomputed: str = ""
    """Counter on the decode side: prompts (or tokens) the decode worker computed itself, lacking a hand-off."""
    kv_failed: str = ""
    """Counter on the decode side: KV transfers that failed."""


@dataclass(frozen=True)
class EngineCommand:
    """An engine container's command, arguments and the environment it needs beyond the common one."""

    command: list[str]
    args: list[str]
    env: list[dict[str, Any]]


@dataclass(frozen=True)
class Group:
    """What differs between a multi-node pool's leader and worker pods."""

    nodes: int
    leader_args: list[str]
    worker_command: list[str]
    worker_args: list[str]
    worker_env: list[dict[str, Any]]


@dataclass(frozen=True)
class RouterCommand:
    """The router's command and arguments, the app label its pods carry and its liveness path."""

    command: list[str]
    args: list[str]
    app: str
    liveness_path: str


class EngineAdapter(Protocol):
    """One inference engine, as the renderer, the validation and the autoscaler see it."""

    kind: str
    images: dict[str, str]
    """Default image per accelerator vendor; vendors missing here need an explicit image."""
    router_image: str
    vendors: frozenset[str]
    """Accelerator vendors the engine runs on."""
    connectors: frozenset[str]
    weight_schemes: tuple[str, ...]
    """The model.uri schemes the engine loads weights from."""
    metrics: MetricNames
    decode_ttft_from_handoff: bool
    """Whether a decode engine's TTFT starts when prefill hands the request over rather than when the router
    received it."""
    dotted_flags: bool
    """Whether the parser reads `_` as `-` in a flag's name and `--flag.key=value` as a key of `--flag`."""
    owned_flags: dict[str, str]
    """Every option string of the actions the operator sets -> the shortest prefix the engine's parser takes."""
    owned_with_object_storage: dict[str, str]
    owned_with_cpu_tier: dict[str, str]
    owned_with_disk_tier: dict[str, str]
    multinode_flags: dict[str, str]

    def kv_port(self, connector: str, explicit: int | None) -> int:
        """The side-channel/bootstrap port: the explicit one or the engine's default."""
        ...

    def kv_listens(self, role: Role) -> bool:
        """Whether a pod of this role opens the KV port (one listener serves every TP rank)."""
        ...

    def pool_annotations(self, role: Role, port_kv: int) -> dict[str, str]:
        """Annotations on a pool's pods that its router reads."""
        ...

    def pool_command(
        self, spec: InferenceServiceSpec, role: Role, model: str, model_args: list[str], port_kv: int,
        disk_gib: int | None = None,
    ) -> EngineCommand:
        """The engine's command for one role, before drain flags and the user's extraArgs and env: `model` is
        the weights' argument (a path or a repository), `disk_gib` the pod's KV disk tier in GiB."""
        ...

    def group(self, pool: PoolSpec, command: list[str], args: list[str], env: list[dict[str, Any]]) -> Group:
        """The leader's and workers' commands of a multi-node pool, from the single-node ones."""
        ...

    def drain_args(self, drain_s: int) -> list[str]:
        """Flags bounding the engine's own shutdown to the drain time."""
        ...

    def drain_gauges(self, role: Role) -> list[str]:
        """The gauges the preStop hook waits to see at zero."""
        ...

    def router(self, connector: str, common: list[str], shutdown_grace_s: int) -> RouterCommand:
        """The P/D router's command around the arguments both routers share."""
        ...

    def layout_errors(self, field: str, pool: PoolSpec, nodes: int) -> list[tuple[str, str]]:
        """(field, message) for a worker layout this engine cannot run."""
        ...
