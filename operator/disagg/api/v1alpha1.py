"""The InferenceService API, version v1alpha1: one schema source for the CRD, validation and rendering.

Every field's docstring becomes its description in the generated CRD (and so `kubectl explain`).
Cross-field rules that the API server can check are CEL rules (`x-kubernetes-validations`), declared
next to the model they guard; rules that need the accelerator catalogue live in `disagg.api.validate`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from disagg.catalog.engines import Role

EngineKind = Literal["vllm", "sglang"]
KVConnector = Literal["nixl", "mooncake"]
Dtype = Literal["bf16", "fp16", "fp8", "int8", "int4"]
KVDtype = Literal["bf16", "fp16", "fp8"]
Port = Annotated[int, Field(ge=1024, le=65535)]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# a Kubernetes resource quantity: 100m, 0.5, 16, 128Gi, 1e3, 500M
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"


class CRDModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected, docstrings as docs."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )
    # CEL rules ({"rule": ..., "message": ...}) attached to this object's schema in the CRD.
    cel_rules: ClassVar[tuple[dict[str, str], ...]] = ()

    def cross_field_errors(self) -> list[str]:
        """The same checks as `cel_rules`, in Python, so offline validation agrees with the API server."""
        return []

    @model_validator(mode="after")
    def _check_cross_fields(self) -> CRDModel:
        errors = self.cross_field_errors()
        if errors:
            raise ValueError("; ".join(errors))
        return self


class ModelArchitecture(CRDModel):
    """Shape of the model, used by the capacity model to size pools and explain scaling decisions."""

    parameters: float = Field(gt=0)
    """Total parameter count (e.g. 70.6e9)."""
    active_parameters: float | None = Field(default=None, gt=0)
    """Parameters active per token (mixture-of-experts models); defaults to `parameters`."""
    layers: int = Field(ge=1, le=1000)
    """Number of transformer layers."""
    kv_heads: int = Field(ge=1, le=1024)
    """Number of key/value attention heads (grouped-query attention)."""
    head_dim: int = Field(ge=1, le=4096)
    """Dimension of one attention head."""
    kv_lora_rank: int | None = Field(default=None, ge=1)
    """Compressed KV width for multi-head latent attention (DeepSeek); replaces kvHeads x headDim."""
    weight_dtype: Dtype = "bf16"
    """Data type the weights are served in."""
    kv_dtype: KVDtype = "bf16"
    """Data type of the KV cache; prefill and decode must agree on it."""


class ModelSpec(CRDModel):
    """The served model."""

    name: str = Field(min_length=1, max_length=256)
    """Model name served on the OpenAI API (the `model` field of requests)."""
    uri: str = Field(pattern=r"^(hf|pvc|s3|gs)://[^\s]+$", max_length=1024)
    """Where the weights come from: hf://org/model, pvc://claim/path/in/volume, s3://bucket/path, gs://bucket/path."""
    revision: str | None = Field(default=None, max_length=128)
    """Model revision (branch, tag or commit); both pools always load the same one."""
    architecture: ModelArchitecture | None = None
    """Model shape for the capacity model; required for capacity-model-driven autoscaling."""


class EnvVar(CRDModel):
    """An environment variable for the engine container."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    """Variable name."""
    value: str = ""
    """Variable value."""


class EngineSpec(CRDModel):
    """The inference engine both pools run."""

    kind: EngineKind = "vllm"
    """Engine: vllm or sglang."""
    image: str | None = Field(default=None, max_length=512)
    """Container image; defaults to the engine's image for each pool's accelerator vendor."""
    port: Port = 8000
    """HTTP port of the engine's OpenAI server (also serves /metrics and /health)."""
    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    """Extra command-line arguments appended to both pools' engine command."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables for both pools' engine containers."""


class RDMASpec(CRDModel):
    """An RDMA device for KV transfer."""

    resource: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9.-]+/[a-zA-Z0-9_.-]+$")
    """Extended resource name of the RDMA device (e.g. rdma/ib, rdma/hca_shared_devices_a)."""
    count: int = Field(default=1, ge=1, le=64)
    """Devices per pod."""


class KVTransferSpec(CRDModel):
    """How the KV cache moves from prefill to decode."""

    connector: KVConnector = "nixl"
    """Transfer library: nixl (vLLM NixlConnector / SGLang nixl backend) or mooncake."""
    backend: Literal["ucx", "libfabric"] | None = None
    """NIXL backend; ucx by default. Not used by mooncake."""
    port: Port | None = None
    """Side-channel (nixl, default 5600) or bootstrap (mooncake and SGLang, default 8998) port."""
    rdma: RDMASpec | None = None
    """Request an RDMA device per pod; without it the transfer runs over TCP."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "!has(self.backend) || self.connector == 'nixl'",
            "message": "kvTransfer.backend is only meaningful with connector nixl",
        },
    )

    def cross_field_errors(self) -> list[str]:
        if self.backend is not None and self.connector != "nixl":
            return [self.cel_rules[0]["message"]]
        return []


class DiskTier(CRDModel):
    """A local disk tier for offloaded KV blocks."""

    size: str = Field(pattern=QUANTITY)
    """Volume size (a Kubernetes quantity, e.g. 500Gi)."""
    storage_class_name: str | None = Field(default=None, max_length=253)
    """Storage class of a generic ephemeral volume (e.g. local NVMe); an emptyDir when omitted."""


class KVCacheSpec(CRDModel):
    """Optional KV-cache offload tiers below accelerator memory (prefix reuse across requests)."""

    cpu_offload_gi_b: int | None = Field(default=None, ge=1, le=4096, alias="cpuOffloadGiB")
    """Host memory for offloaded KV blocks, in GiB per pod."""
    disk: DiskTier | None = None
    """A local disk tier below the CPU tier."""


class RouterSpec(CRDModel):
    """The router: the one OpenAI endpoint, sending each request to a prefill and then a decode worker."""

    replicas: int = Field(default=1, ge=1, le=64)
    """Router replicas."""
    port: Port = 8000
    """Port of the Service `<name>`."""
    policy: Literal["round_robin", "random", "cache_aware", "power_of_two"] = "round_robin"
    """Load-balancing policy across workers of a pool."""
    image: str | None = Field(default=None, max_length=512)
    """Router image; defaults to the engine's router image."""


class SLOSpec(CRDModel):
    """Latency targets the autoscaler keeps."""

    ttft_ms: int = Field(default=500, ge=1, le=600_000)
    """Time to first token target, in milliseconds."""
    itl_ms: int = Field(default=50, ge=1, le=60_000)
    """Inter-token latency target, in milliseconds."""
    percentile: float = Field(default=90, ge=50, le=99.9)
    """Percentile at which the targets must hold."""


class AcceleratorRequest(CRDModel):
    """The accelerators one pod of the pool gets: a catalogue type, or an explicit resource and nodes."""

    type: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL)
    """Accelerator type from the catalogue (e.g. nvidia-h100, amd-mi300x, aws-trainium2)."""
    count: int = Field(default=1, ge=1, le=64)
    """Accelerators per pod."""
    resource_name: str | None = Field(default=None, max_length=253, pattern=r"^[a-z0-9.-]+/[a-zA-Z0-9_.-]+$")
    """Explicit extended resource name (instead of `type`), e.g. nvidia.com/gpu."""
    node_selector: dict[str, str] | None = None
    """Node labels selecting nodes with this accelerator (with `resourceName`)."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "has(self.type) != has(self.resourceName)",
            "message": "set exactly one of accelerator.type or accelerator.resourceName",
        },
        {
            "rule": "!has(self.resourceName) || (has(self.nodeSelector) && size(self.nodeSelector) > 0)",
            "message": "accelerator.resourceName needs accelerator.nodeSelector naming the nodes that have it",
        },
    )

    def cross_field_errors(self) -> list[str]:
        errors = []
        if (self.type is None) == (self.resource_name is None):
            errors.append(self.cel_rules[0]["message"])
        if self.resource_name is not None and not self.node_selector:
            errors.append(self.cel_rules[1]["message"])
        return errors


class Parallelism(CRDModel):
    """How one engine instance spreads over its accelerators."""

    tensor: int = Field(default=1, ge=1, le=64)
    """Tensor-parallel size."""


class Toleration(CRDModel):
    """A Kubernetes toleration."""

    key: str | None = None
    """Taint key (empty with Exists matches all)."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: str | None = None
    """Taint value."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; all when empty."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class ResourceRequirements(CRDModel):
    """CPU and memory of the engine container (the accelerators come from `accelerator`)."""

    requests: dict[str, Annotated[str, Field(pattern=QUANTITY)]] = Field(default_factory=dict)
    """Requested resources (e.g. cpu, memory)."""
    limits: dict[str, Annotated[str, Field(pattern=QUANTITY)]] = Field(default_factory=dict)
    """Resource limits."""


class Autoscaling(CRDModel):
    """Autoscaling of one pool from its own Prometheus metrics; the autoscaler then owns `replicas`."""

    min_replicas: int = Field(default=1, ge=1, le=1000)
    """Lower bound; the autoscaler never scales below it (and never to zero)."""
    max_replicas: int = Field(ge=1, le=1000)
    """Upper bound."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "self.minReplicas <= self.maxReplicas",
            "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
        },
    )

    def cross_field_errors(self) -> list[str]:
        return [self.cel_rules[0]["message"]] if self.min_replicas > self.max_replicas else []


class PoolSpec(CRDModel):
    """One pool of engine workers (prefill or decode)."""

    replicas: int = Field(default=1, ge=0, le=1000)
    """Worker replicas; with autoscaling, only the initial count."""
    accelerator: AcceleratorRequest
    """Accelerators per worker."""
    parallelism: Parallelism = Field(default_factory=Parallelism)
    """Parallelism of one worker."""
    image: str | None = Field(default=None, max_length=512)
    """Engine image for this pool only (cross-vendor pools need vendor-specific builds)."""
    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    """Extra engine arguments for this pool only, after engine.extraArgs."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Extra node labels, merged with the accelerator's."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations of the worker pods."""
    affinity: dict[str, Any] | None = None
    """A Kubernetes affinity for the worker pods (passed through as written)."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of the engine container."""
    autoscaling: Autoscaling | None = None
    """Autoscaling bounds; omit for a fixed replica count."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "self.parallelism.tensor <= self.accelerator.count",
            "message": "parallelism.tensor must not exceed accelerator.count (accelerators per worker)",
        },
    )

    def cross_field_errors(self) -> list[str]:
        return [self.cel_rules[0]["message"]] if self.parallelism.tensor > self.accelerator.count else []


class InferenceServiceSpec(CRDModel):
    """A model served by disaggregated prefill and decode pools."""

    model: ModelSpec
    """The served model."""
    engine: EngineSpec = Field(default_factory=EngineSpec)
    """The inference engine."""
    kv_transfer: KVTransferSpec = Field(default_factory=KVTransferSpec)
    """KV-cache transfer from prefill to decode."""
    kv_cache: KVCacheSpec | None = None
    """Optional KV offload tiers."""
    router: RouterSpec = Field(default_factory=RouterSpec)
    """The request router and the service's endpoint."""
    slo: SLOSpec = Field(default_factory=SLOSpec)
    """Latency targets."""
    accelerator_budget: int | None = Field(default=None, ge=1, le=100_000)
    """Most accelerators both pools may hold together; the autoscaler stays within it."""
    prefill: PoolSpec
    """The prefill pool (compute-bound; sets TTFT)."""
    decode: PoolSpec
    """The decode pool (memory-bandwidth-bound; sets ITL)."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "!has(self.kvTransfer) || self.kvTransfer.connector != 'mooncake' || "
            "self.prefill.parallelism.tensor == self.decode.parallelism.tensor",
            "message": "kvTransfer.connector mooncake needs equal prefill.parallelism.tensor and "
            "decode.parallelism.tensor (use nixl for different TP per pool)",
        },
        {
            "rule": "!has(self.kvTransfer) || !has(self.kvTransfer.port) || !has(self.engine) || "
            "self.kvTransfer.port != self.engine.port",
            "message": "kvTransfer.port must differ from engine.port",
        },
    )

    def cross_field_errors(self) -> list[str]:
        errors = []
        tensor = (self.prefill.parallelism.tensor, self.decode.parallelism.tensor)
        if self.kv_transfer.connector == "mooncake" and tensor[0] != tensor[1]:
            errors.append(self.cel_rules[0]["message"])
        if self.kv_transfer.port is not None and self.kv_transfer.port == self.engine.port:
            errors.append(self.cel_rules[1]["message"])
        return errors


# --- status -------------------------------------------------------------------------------------


class Condition(CRDModel):
    """A condition, as the Kubernetes API conventions define it."""

    type: str
    """Condition type (Ready, PrefillReady, DecodeReady, RouterReady, KVTransferReady, ScalingActive)."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    reason: str
    """CamelCase reason."""
    message: str = ""
    """Human-readable details."""
    observed_generation: int | None = None
    """Generation of the spec this condition was computed from."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""


class ScaleRecord(CRDModel):
    """The last scaling decision that changed a pool."""

    time: str
    """When (RFC 3339)."""
    from_replicas: int = Field(alias="from")
    """Replicas before."""
    to_replicas: int = Field(alias="to")
    """Replicas after."""
    reason: str
    """Why, with the numbers that drove it."""


class OutOfReach(CRDModel):
    """Requests no replica count serves within the SLO: the autoscaler does not size the pool for them."""

    percent: float
    """Share of the pool's requests in the last rate window that are out of reach, in percent."""
    reason: str
    """Why they are out of reach (e.g. prompts whose prefill alone exceeds the TTFT target)."""


class PoolStatus(CRDModel):
    """Observed state of one pool."""

    replicas: int = 0
    """Replicas of the pool's Deployment."""
    ready_replicas: int = 0
    """Ready replicas."""
    desired_replicas: int | None = None
    """Replicas the autoscaler wants."""
    last_scale: ScaleRecord | None = None
    """The last scaling change."""
    out_of_reach: OutOfReach | None = None
    """Requests out of reach lately, when there are any (prefill: prompts too long for the TTFT target)."""
    summary: str | None = None
    """Ready/desired replicas as text (e.g. "2/3"), for `kubectl get`."""


class InferenceServiceStatus(CRDModel):
    """Observed state of an InferenceService."""

    observed_generation: int | None = None
    """Generation of the spec last reconciled."""
    endpoint: str | None = None
    """The OpenAI-compatible endpoint inside the cluster."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions (Ready, PrefillReady, DecodeReady, RouterReady, KVTransferReady, ScalingActive)."""
    prefill: PoolStatus | None = None
    """The prefill pool."""
    decode: PoolStatus | None = None
    """The decode pool."""


ROLES: tuple[Role, Role] = ("prefill", "decode")
