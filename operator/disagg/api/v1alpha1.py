"""The InferenceService API, version v1alpha1: one schema source for the CRD, validation and rendering.

Every field's docstring becomes its description in the generated CRD (and so `kubectl explain`).
Cross-field rules that the API server can check are CEL rules (`x-kubernetes-validations`), declared
next to the model they guard; rules that need the accelerator catalogue live in `disagg.api.validate`.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from disagg.api.affinity import affinity_errors
from disagg.api.names import LABEL_VALUE, QUALIFIED_NAME, label_value, qualified_name
from disagg.api.quantity import MAX_QUANTITY_TEXT, check_quantity
from disagg.engines import (
    ENGINES,
    MOONCAKE_BOOTSTRAP_PORT,
    NIXL_SIDE_CHANNEL_PORT,
    OWNED_ENV,
    OWNED_FLAGS,
    OWNED_WITH_CPU_TIER,
    OWNED_WITH_DISK_TIER,
    OWNED_WITH_OBJECT_STORAGE,
    ROUTER_METRICS_PORT,
    kv_port,
    owned_flag,
    owned_flag_cel,
)
from disagg.wellknown import ROLES as ROLES  # the pools' roles, where the spec's pools are defined

EngineKind = Literal["vllm", "sglang", "custom"]
KVConnector = Literal["nixl", "mooncake"]
Dtype = Literal["bf16", "fp16", "fp8", "int8", "int4"]
KVDtype = Literal["bf16", "fp16", "fp8"]
Port = Annotated[int, Field(ge=1024, le=65535)]
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Children that are not Deployments, PDBs or router RBAC are named `<name>--<part>` (disagg.render):
# a service's name may not hold the separator, so no two services' children can share a name.
CHILD_SEPARATOR = "--"
# the longest child name is `<name>--prefill-kv`, a Service: a DNS-1035 label of at most 63 characters
MAX_NAME_LENGTH = 63 - len(CHILD_SEPARATOR + "prefill-kv")
NAME_RULES: tuple[dict[str, str], ...] = (
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name may have at most {MAX_NAME_LENGTH} characters, so that every child's name "
        "(the longest is <name>--prefill-kv) is a valid Service name",
    },
    {
        "rule": f"!self.metadata.name.contains('{CHILD_SEPARATOR}')",
        "message": f"metadata.name may not contain '{CHILD_SEPARATOR}': children are named "
        f"<name>{CHILD_SEPARATOR}<part>, and a name holding it could take another service's child's name",
    },
    {
        "rule": "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        "message": "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a "
        "letter), as the names of its Services are",
    },
)
"""CEL rules on the InferenceService's own name, at the root of the CRD's schema."""
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
IMAGE = r"^[^\s]+$"
"""An image reference has no whitespace (the API server refuses it at the ends, the runtime anywhere)."""
NOT_A_FLAG = r"^[^-]"
"""Text the engine gets as a flag's value or its positional argument: one starting with '-' would be
read as a flag (`--served-model-name --trust-remote-code`)."""
EXTENDED_RESOURCE = rf"^{QUALIFIED_NAME}$"
TENSOR_SIZES = (1, 2, 4, 8, 16, 32, 64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# a Kubernetes resource quantity: 100m, 0.5, 16, 128Gi, 1e3, 500M
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$"


def _quantity_field(minimum: str) -> Any:
    """A quantity string within [minimum, 2^63-1 milli-units] as the API server checks it: the pattern
    and a CEL rule (CEL's quantity() is apimachinery's parser). `check_quantity` is the same offline."""
    rule = (f"isQuantity(self) && quantity(self).compareTo(quantity('{minimum}')) >= 0 && "
            f"quantity(self).compareTo(quantity('{MAX_QUANTITY_TEXT}')) <= 0")
    message = f"must be a quantity from {minimum} to {MAX_QUANTITY_TEXT} (2^63-1 milli-units)"
    return Field(pattern=QUANTITY, max_length=64,
                 json_schema_extra={"x-kubernetes-validations": [{"rule": rule, "message": message}]})


Quantity = Annotated[str, _quantity_field("0"), AfterValidator(partial(check_quantity, minimum=Fraction(0)))]
DiskSize = Annotated[
    str, _quantity_field("1Gi"), AfterValidator(partial(check_quantity, minimum=Fraction(2**30), minimum_text="1Gi"))
]


def _cel(rule: str, message: str) -> dict[str, Any]:
    """A field's CEL rule for the CRD (the Python check beside it says the same)."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


def _int64(value: int) -> int:
    """An integer the API server can hold (the CRD's `integer` is an int64; beyond, it is refused)."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{value} does not fit in a 64-bit integer")
    return value


def _extended_resource(value: str) -> str:
    """An extended resource name: a domain, '/', a name (`requests.` names quotas, not resources)."""
    if "/" not in value or value.startswith("requests.") or qualified_name(value) is not None:
        raise ValueError(f"{value!r} is not an extended resource name (a domain, '/', a name, e.g. rdma/ib)")
    return value


def _affinity(value: dict[str, Any]) -> dict[str, Any]:
    errors = affinity_errors(value)
    if errors:
        raise ValueError("\n".join(errors))
    return value


def _cel_label_key(key: str) -> str:
    """CEL: `key` is a label key (Kubernetes' qualified name: prefix <= 253, name <= 63 characters)."""
    return (f"{key}.matches(r'^{QUALIFIED_NAME}$') && ({key}.contains('/') ? {key}.indexOf('/') <= 253 && "
            f"size({key}) - {key}.indexOf('/') <= 64 : size({key}) <= 63)")


def _label_map(value: dict[str, str]) -> dict[str, str]:
    """A node selector: label keys and values as Kubernetes accepts them."""
    problems = [p for key, item in value.items() for p in (qualified_name(key), label_value(item)) if p]
    if problems:
        raise ValueError("; ".join(problems))
    return value


LabelMap = Annotated[
    dict[str, Annotated[str, Field(max_length=63)]],
    Field(max_length=64, json_schema_extra=_cel(
        f"self.all(k, {_cel_label_key('k')} && self[k].matches(r'^{LABEL_VALUE}$'))",
        "keys must be label keys (an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', "
        "'_' or '.', starting and ending alphanumeric) and values label values (the same, or empty)")),
    AfterValidator(_label_map),
]


class CRDModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected, docstrings as docs, and
    types as strict as the CRD's (the string "3" or `true` is no integer to the API server)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
        strict=True,
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
            raise ValueError("\n".join(errors))  # one per line: validate.parse_spec reports each on its own
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
    attention_heads: int | None = Field(default=None, ge=1, le=4096)
    """Number of query attention heads; tensor parallelism must divide it (checked when given)."""
    experts: int | None = Field(default=None, ge=1, le=100_000)
    """Routed experts per MoE layer; expert parallelism must divide them (checked when given)."""


class ModelSpec(CRDModel):
    """The served model."""

    name: str = Field(min_length=1, max_length=256, pattern=NOT_A_FLAG)
    """Model name served on the OpenAI API (the `model` field of requests); not starting with '-'."""
    uri: str = Field(
        pattern=r"^(hf://[^-\s][^\s]*|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^\s]*)?|s3://[^\s]+|gs://[^\s]+)$",
        max_length=1024,
    )
    """Where the weights come from: hf://org/model, pvc://claim/path/in/volume (claim: a DNS subdomain),
    s3://bucket/path, gs://bucket/path; no whitespace, and an hf:// id not starting with '-'."""
    revision: str | None = Field(default=None, max_length=128, pattern=NOT_A_FLAG)
    """Model revision (branch, tag or commit); both pools always load the same one. Not starting with '-'."""
    architecture: ModelArchitecture | None = None
    """Model shape for the capacity model; required for capacity-model-driven autoscaling."""


# names of Secrets, ConfigMaps and ServiceAccounts (DNS-1123 subdomains), and keys of their data
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
DataKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
# what the downward API offers an environment variable
ENV_FIELD_PATHS = (
    "metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName", "spec.serviceAccountName",
    "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs",
)
ENV_FIELD_PATH = r"^(" + "|".join(p.replace(".", "\\.") for p in ENV_FIELD_PATHS) + \
    r"|metadata\.(labels|annotations)\['[^']+'\])$"
ENV_RESOURCES = r"^(limits|requests)\.(cpu|memory|ephemeral-storage|hugepages-[0-9A-Za-z]+)$"


class ObjectRef(CRDModel):
    """A Secret or ConfigMap in the service's namespace."""

    name: ObjectName
    """Its name."""
    optional: bool | None = None
    """Start the pod even when it is missing."""


class KeySelector(CRDModel):
    """One key of a Secret or ConfigMap in the service's namespace."""

    name: ObjectName
    """The Secret's or ConfigMap's name."""
    key: DataKey
    """The key."""
    optional: bool | None = None
    """Start the pod even when the object or key is missing."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "self.key != '.' && !self.key.startsWith('..')",
            "message": "key may not be '.' or start with '..'",
        },
    )

    def cross_field_errors(self) -> list[str]:
        return [self.cel_rules[0]["message"]] if self.key == "." or self.key.startswith("..") else []


class FieldSelector(CRDModel):
    """A field of the engine's own pod (the downward API)."""

    field_path: str = Field(max_length=256, pattern=ENV_FIELD_PATH)
    """E.g. metadata.name, status.podIP, metadata.labels['app']."""
    api_version: Literal["v1"] | None = None
    """v1."""


class ResourceSelector(CRDModel):
    """A request or limit of the engine container (the downward API)."""

    resource: str = Field(max_length=64, pattern=ENV_RESOURCES)
    """E.g. limits.memory, requests.cpu."""
    container_name: Literal["engine"] | None = None
    """The engine container (the only one)."""
    divisor: str | None = Field(default=None, pattern=QUANTITY)
    """Unit of the value (e.g. 1Mi); 1 by default."""


class EnvVarSource(CRDModel):
    """Where a variable's value comes from. The operator never reads it: the kubelet does."""

    secret_key_ref: KeySelector | None = None
    """A key of a Secret (a token, a bucket key)."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: FieldSelector | None = None
    """A field of the pod."""
    resource_field_ref: ResourceSelector | None = None
    """A resource of the engine container."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + "
            "(has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0) == 1",
            "message": "valueFrom takes exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef",
        },
    )

    def cross_field_errors(self) -> list[str]:
        sources = (self.secret_key_ref, self.config_map_key_ref, self.field_ref, self.resource_field_ref)
        return [self.cel_rules[0]["message"]] if sum(s is not None for s in sources) != 1 else []


class EnvVar(CRDModel):
    """An environment variable for the engine container: a value, or one from a Secret, a ConfigMap or
    the pod (valueFrom), so that tokens never sit in the spec or the pod template."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    """Variable name."""
    value: str = ""
    """Variable value (leave it out with valueFrom)."""
    value_from: EnvVarSource | None = None
    """Where the value comes from instead."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "!has(self.valueFrom) || !has(self.value) || size(self.value) == 0",
            "message": "env: set value or valueFrom, not both",
        },
    )

    def cross_field_errors(self) -> list[str]:
        return [self.cel_rules[0]["message"]] if self.value and self.value_from is not None else []

    def manifest(self) -> dict[str, Any]:
        """The variable as a container takes it."""
        if self.value_from is not None:
            return {"name": self.name, "valueFrom": self.value_from.model_dump(by_alias=True, exclude_none=True)}
        return {"name": self.name, "value": self.value}


class EnvFromSource(CRDModel):
    """Every key of a Secret or ConfigMap as environment variables."""

    prefix: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    """Put before each key's name."""
    secret_ref: ObjectRef | None = None
    """A Secret."""
    config_map_ref: ObjectRef | None = None
    """A ConfigMap."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "has(self.secretRef) != has(self.configMapRef)",
            "message": "envFrom takes exactly one of secretRef and configMapRef",
        },
    )

    def cross_field_errors(self) -> list[str]:
        return [self.cel_rules[0]["message"]] if (self.secret_ref is None) == (self.config_map_ref is None) else []

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


METRIC_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
# The signals each pool's autoscaling reads (scaling/signals.py): without them the policy is blind and would
# hold the pool forever, so an autoscaled pool of a custom engine needs these names.
NEEDED_FOR_AUTOSCALING = {
    "prefill": ("runningRequests", "waitingRequests", "promptTokensTotal", "ttftHistogram"),
    "decode": ("runningRequests", "kvCacheUsage", "generationTokensTotal", "itlHistogram", "ttftHistogram"),
}
TEMPLATE_VALUES = ("port", "role", "kvPort", "model", "servedModelName", "tensorParallel")
"""The operator's values a custom engine's command and args may name as {{value}}."""


class CustomMetrics(CRDModel):
    """A custom engine's own Prometheus metric names behind the autoscaler's signals (histograms without
    their _bucket/_count suffix). The autoscaler needs some of them per pool (see docs/validation.md)."""

    waiting_requests: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Gauge: requests queued, not yet running (prefill's queue)."""
    running_requests: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Gauge: requests running."""
    kv_cache_usage: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Gauge: the fraction of the KV cache in use (0 to 1)."""
    prompt_tokens_total: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Counter: prompt tokens processed."""
    generation_tokens_total: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Counter: tokens generated."""
    ttft_histogram: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Histogram (seconds): time to first token."""
    itl_histogram: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Histogram (seconds): time between output tokens."""
    e2e_histogram: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME, alias="e2eHistogram")
    """Histogram (seconds): request latency, start to end."""
    prompt_histogram: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Histogram: prompt tokens per request."""
    kv_handed_off_total: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Counter (decode): prompts whose KV cache a prefill worker handed off (the KV-path check)."""
    kv_recomputed_total: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Counter (decode): prompts the decode worker computed itself for lack of a usable hand-off."""
    kv_transfer_failures_total: str | None = Field(default=None, max_length=253, pattern=METRIC_NAME)
    """Counter (decode): KV transfers that failed."""


class CustomEngineSpec(CRDModel):
    """A specialised engine the operator does not know: its command, how it speaks to the router, and its
    metric names. {{port}}, {{role}}, {{kvPort}}, {{model}}, {{servedModelName}} and {{tensorParallel}} in
    command and args are replaced by the operator's values for each pool."""

    command: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=64)
    """The container's command."""
    args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=128)
    """The container's arguments."""
    protocol: Literal["vllm", "sglang"] = "vllm"
    """The P/D protocol the engine speaks: which router runs in front of it and how KV ports are used."""
    metrics: CustomMetrics = Field(default_factory=CustomMetrics)
    """The engine's metric names behind the autoscaler's signals."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = tuple(
        {
            "rule": f"!has(self.{part}) || self.{part}.all(a, !a"
            + "".join(f".replace('{{{{{value}}}}}', '')" for value in TEMPLATE_VALUES) + ".contains('{{'))",
            "message": f"custom.{part} may use only the template values "
            + ", ".join("{{" + value + "}}" for value in TEMPLATE_VALUES),
            "fieldPath": f".{part}",
        }
        for part in ("command", "args")
    )

    def cross_field_errors(self) -> list[str]:
        errors = []
        for rule, (field, values) in zip(self.cel_rules, (("command", self.command), ("args", self.args)),
                                         strict=True):
            for index, text in enumerate(values):
                for value in TEMPLATE_VALUES:
                    text = text.replace("{{" + value + "}}", "")
                if "{{" in text:
                    errors.append(f".{field}[{index}]: {values[index]!r}: {rule['message']}")
        return errors


class EngineSpec(CRDModel):
    """The inference engine both pools run."""

    kind: EngineKind = "vllm"
    """Engine: vllm, sglang, or custom (an engine of your own: set custom and image)."""
    custom: CustomEngineSpec | None = None
    """The command, router protocol and metric names of a custom engine (kind custom only)."""
    image: str | None = Field(default=None, max_length=512, pattern=IMAGE)
    """Container image; defaults to the engine's image for each pool's accelerator vendor."""
    port: Port = 8000
    """HTTP port of the engine's OpenAI server (also serves /metrics and /health)."""
    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    """Extra command-line arguments appended to both pools' engine command (not the flags the operator
    sets, in any spelling the engine reads: see docs/validation.md)."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    """Extra environment variables for both pools' engine containers (e.g. HF_TOKEN from a Secret; each
    name once, and none of those the operator sets)."""
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16)
    """Secrets and ConfigMaps whose every key becomes a variable of both pools' engine containers."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": f"!has(self.env) || self.env.all(e, !(e.name in {list(OWNED_ENV)!r}))".replace('"', "'"),
            "message": f"engine.env must not set a variable the operator sets ({', '.join(OWNED_ENV)})",
        },
        {
            # engine's default ({}) is checked before its own defaults: kind may be absent
            "rule": "(has(self.kind) && self.kind == 'custom') == has(self.custom)",
            "message": "engine.custom is set exactly when engine.kind is custom",
        },
        {
            "rule": "!has(self.kind) || self.kind != 'custom' || has(self.image)",
            "message": "engine.kind custom needs engine.image (the operator has no default image for it)",
            "fieldPath": ".image",
        },
    )

    @property
    def protocol(self) -> str:
        """The P/D protocol the engine speaks (a custom engine's is vLLM's or SGLang's)."""
        return self.custom.protocol if self.kind == "custom" and self.custom is not None else self.kind

    def cross_field_errors(self) -> list[str]:
        errors = []
        if (self.kind == "custom") != (self.custom is not None):
            errors.append(self.cel_rules[1]["message"])
        if self.kind == "custom" and self.image is None:
            errors.append(f"{self.cel_rules[2]['fieldPath']}: {self.cel_rules[2]['message']}")
        names = [var.name for var in self.env]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            errors.append(f"engine.env sets {', '.join(duplicates)} more than once")
        if any(name in OWNED_ENV for name in names):
            errors.append(self.cel_rules[0]["message"])
        return errors


class RDMASpec(CRDModel):
    """An RDMA device for KV transfer."""

    resource: Annotated[str, AfterValidator(_extended_resource)] = Field(
        min_length=1, max_length=253, pattern=EXTENDED_RESOURCE,
        json_schema_extra=_cel("self.contains('/') && !self.startsWith('requests.')",
                               "must be an extended resource name: a domain, '/', a name"))
    """Extended resource name of the RDMA device (e.g. rdma/ib, rdma/hca_shared_devices_a)."""
    count: int = Field(default=1, ge=1, le=64)
    """Devices per pod."""


class KVTransferSpec(CRDModel):
    """How the KV cache moves from prefill to decode."""

    connector: KVConnector = "nixl"
    """Transfer library: nixl (vLLM NixlConnector / SGLang nixl backend) or mooncake."""
    backend: Literal["ucx", "libfabric"] | None = None
    """NIXL backend; ucx by default (vLLM: the NixlConnector's `backends`, SGLang:
    SGLANG_DISAGGREGATION_NIXL_BACKEND). Only with connector nixl."""
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

    size: DiskSize
    """Volume size (a Kubernetes quantity, e.g. 500Gi; at least 1Gi, as the KV caches size their disk
    tiers in whole GiB)."""
    storage_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN)
    """Storage class of a generic ephemeral volume (e.g. local NVMe); an emptyDir when omitted."""


class KVCacheSpec(CRDModel):
    """Optional KV-cache offload tiers below accelerator memory (prefix reuse across requests)."""

    cpu_offload_gi_b: int | None = Field(default=None, ge=1, le=4096, alias="cpuOffloadGiB")
    """Host memory for offloaded KV blocks, in GiB per pod."""
    disk: DiskTier | None = None
    """A local disk tier below the CPU tier."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {"rule": "has(self.cpuOffloadGiB) || has(self.disk)",
         "message": "kvCache: set cpuOffloadGiB, disk, or both (or remove kvCache)"},
        {"rule": "!has(self.disk) || has(self.cpuOffloadGiB)",
         "message": "a disk tier needs a CPU tier above it: set kvCache.cpuOffloadGiB too",
         "fieldPath": ".cpuOffloadGiB"},
    )

    def cross_field_errors(self) -> list[str]:
        if self.cpu_offload_gi_b is None and self.disk is None:
            return [self.cel_rules[0]["message"]]
        if self.disk is not None and self.cpu_offload_gi_b is None:
            return [f".cpuOffloadGiB: {self.cel_rules[1]['message']}"]
        return []


class RouterSpec(CRDModel):
    """The router: the one OpenAI endpoint, sending each request to a prefill and then a decode worker."""

    replicas: int = Field(default=1, ge=1, le=64)
    """Router replicas."""
    port: Port = 8000
    """Port of the Service `<name>`."""
    policy: Literal["round_robin", "random", "cache_aware", "power_of_two"] = "round_robin"
    """Load-balancing policy across workers of a pool."""
    image: str | None = Field(default=None, max_length=512, pattern=IMAGE)
    """Router image; defaults to the engine's router image."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {"rule": f"!has(self.port) || self.port != {ROUTER_METRICS_PORT}",
         "message": f"router.port must differ from {ROUTER_METRICS_PORT}, the router's metrics port"},
    )

    def cross_field_errors(self) -> list[str]:
        return [self.cel_rules[0]["message"]] if self.port == ROUTER_METRICS_PORT else []


class SLOSpec(CRDModel):
    """Latency targets the autoscaler keeps."""

    ttft_ms: int = Field(default=500, ge=1, le=600_000)
    """Time to first token target, in milliseconds."""
    itl_ms: int = Field(default=50, ge=1, le=60_000)
    """Inter-token latency target, in milliseconds."""
    percentile: float = Field(default=90, ge=50, le=99.9)
    """Percentile at which the targets must hold."""


class DrainSpec(CRDModel):
    """How a worker leaves (scale-down, rollout, node drain, eviction): it leaves the routers' rotation, finishes
    what it holds within a bound, then exits. The bound of a decode worker is the time to first token plus the
    longest allowed output at the inter-token target (`slo`); of a prefill worker, ten times the time to first
    token plus the time its decodes take to pull the KV caches it holds."""

    max_output_tokens: int = Field(default=2048, ge=1, le=1_000_000)
    """The longest output a request may ask for (what decode drains for at slo.itlMs a token)."""
    timeout_seconds: int | None = Field(default=None, ge=1, le=86_400)
    """Bound of the drain of both pools, instead of the one derived from the SLO and maxOutputTokens."""


class AcceleratorRequest(CRDModel):
    """The accelerators one pod of the pool gets: a catalogue type, or an explicit resource and nodes."""

    type: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL)
    """Accelerator type from the catalogue (e.g. nvidia-h100, amd-mi300x, aws-trainium2)."""
    count: int = Field(default=1, ge=1, le=64)
    """Accelerators per pod."""
    resource_name: Annotated[str, AfterValidator(_extended_resource)] | None = Field(
        default=None, max_length=253, pattern=EXTENDED_RESOURCE,
        json_schema_extra=_cel("self.contains('/') && !self.startsWith('requests.')",
                               "must be an extended resource name: a domain, '/', a name"))
    """Explicit extended resource name (instead of `type`), e.g. nvidia.com/gpu."""
    node_selector: LabelMap | None = None
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
    """How one engine instance spreads over its accelerators: tensor x pipeline x data accelerators,
    over several nodes when that is more than one pod's `accelerator.count`."""

    tensor: int = Field(default=1, ge=1, le=64, json_schema_extra=_cel(
        f"self in {list(TENSOR_SIZES)}", "must be a power of two: engines shard attention heads by it"))
    """Tensor-parallel size (a power of two, inside one node)."""
    pipeline: int = Field(default=1, ge=1, le=64)
    """Pipeline-parallel size: stages of layers, one or more per node."""
    data: int = Field(default=1, ge=1, le=1024)
    """Data-parallel attention ranks of one engine instance (vLLM --data-parallel-size, SGLang --dp-size)."""
    expert: bool = False
    """Expert parallelism over all the worker's accelerators (mixture-of-experts models)."""

    @property
    def accelerators(self) -> int:
        """Accelerators of one worker: tensor x pipeline x data."""
        return self.tensor * self.pipeline * self.data

    @model_validator(mode="after")
    def _power_of_two(self) -> Parallelism:
        if self.tensor not in TENSOR_SIZES:
            raise ValueError(f".tensor: {self.tensor} is not a power of two; engines shard attention heads by it")
        return self


class Toleration(CRDModel):
    """A Kubernetes toleration."""

    key: str | None = Field(default=None, max_length=317)
    """Taint key (a label key; empty with Exists matches all)."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = Field(default=None, max_length=63)
    """Taint value (a label value; empty with Exists)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; all when empty."""
    toleration_seconds: Annotated[int, AfterValidator(_int64)] | None = None
    """How long a NoExecute taint is tolerated (with effect NoExecute only)."""

    # the API server's own rules for a pod's tolerations (core/validation ValidateTolerations)
    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {"rule": f"!has(self.key) || self.key == '' || ({_cel_label_key('self.key')})",
         "message": "tolerations[].key must be a label key"},
        {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
         "message": "tolerations[]: operator must be Exists when key is empty (which matches every taint)"},
        {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
         "message": "tolerations[].value must be empty when operator is Exists"},
        {"rule": f"(has(self.operator) && self.operator == 'Exists') || !has(self.value) || "
                 f"self.value.matches(r'^{LABEL_VALUE}$')",
         "message": "tolerations[].value must be a label value"},
        {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
         "message": "tolerations[].tolerationSeconds needs effect NoExecute"},
    )

    def cross_field_errors(self) -> list[str]:
        broken = [
            self.key is not None and self.key != "" and qualified_name(self.key) is not None,
            not self.key and self.operator != "Exists",
            self.operator == "Exists" and bool(self.value),
            self.operator != "Exists" and self.value is not None and label_value(self.value) is not None,
            self.toleration_seconds is not None and self.effect != "NoExecute",
        ]
        return [rule["message"] for rule, bad in zip(self.cel_rules, broken, strict=True) if bad]


class ResourceRequirements(CRDModel):
    """CPU and memory of the engine container (the accelerators come from `accelerator`)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Requested resources (e.g. cpu, memory)."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
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


_WORLD = "(self.parallelism.tensor * self.parallelism.pipeline * self.parallelism.data)"


class PoolSpec(CRDModel):
    """One pool of engine workers (prefill or decode)."""

    replicas: int = Field(default=1, ge=0, le=1000)
    """Worker replicas; with autoscaling, only the initial count."""
    accelerator: AcceleratorRequest
    """Accelerators per pod (per node of a worker)."""
    parallelism: Parallelism = Field(default_factory=Parallelism)
    """Parallelism of one worker."""
    nodes: int | None = Field(default=None, ge=1, le=64)
    """Nodes (pods) one worker spans; derived when omitted: parallelism's tensor x pipeline x data over
    accelerator.count. A worker over several nodes is a LeaderWorkerSet group (leader plus workers)."""
    image: str | None = Field(default=None, max_length=512, pattern=IMAGE)
    """Engine image for this pool only (cross-vendor pools need vendor-specific builds)."""
    extra_args: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    """Extra engine arguments for this pool only, after engine.extraArgs."""
    node_selector: LabelMap = Field(default_factory=dict)
    """Extra node labels, merged with the accelerator's."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations of the worker pods."""
    affinity: Annotated[dict[str, Any], AfterValidator(_affinity)] | None = None
    """A Kubernetes affinity for the worker pods (passed through as written; checked as the API server
    checks it in the pool's Deployment)."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of the engine container."""
    autoscaling: Autoscaling | None = None
    """Autoscaling bounds; omit for a fixed replica count."""
    service_account_name: ObjectName | None = None
    """The pool's ServiceAccount, e.g. one bound to a cloud identity that may read the model's bucket
    (EKS IRSA or Pod Identity, GKE or AKS workload identity). Its API token is not mounted: the engines
    never call the API server, and those identity mechanisms project their own token."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "self.parallelism.tensor <= self.accelerator.count",
            "message": "parallelism.tensor must not exceed accelerator.count (accelerators per worker)",
        },
        {
            "rule": "!has(self.nodes) || (self.nodes == 1 ? " + _WORLD + " <= self.accelerator.count : "
            + _WORLD + " == self.accelerator.count * self.nodes)",
            "message": "parallelism tensor x pipeline x data must equal accelerator.count x nodes (at most "
            "accelerator.count with nodes 1)",
        },
        {
            "rule": _WORLD + " <= self.accelerator.count || " + _WORLD + " % self.accelerator.count == 0",
            "message": "parallelism tensor x pipeline x data must fill whole nodes: at most accelerator.count, "
            "or a multiple of it",
        },
    )

    @property
    def worker_nodes(self) -> int:
        """Nodes one worker spans: `nodes`, or the parallelism's accelerators over accelerator.count."""
        if self.nodes is not None:
            return self.nodes
        return max(1, -(-self.parallelism.accelerators // self.accelerator.count))

    @property
    def worker_accelerators(self) -> int:
        """Accelerators one worker holds (what acceleratorBudget counts per replica)."""
        return self.accelerator.count * self.worker_nodes

    @property
    def multi_node(self) -> bool:
        return self.worker_nodes > 1

    def cross_field_errors(self) -> list[str]:
        errors = []
        world, count = self.parallelism.accelerators, self.accelerator.count
        if self.parallelism.tensor > count:
            errors.append(self.cel_rules[0]["message"])
        if self.nodes is not None and (world > count if self.nodes == 1 else world != count * self.nodes):
            errors.append(self.cel_rules[1]["message"])
        if world > count and world % count:
            errors.append(self.cel_rules[2]["message"])
        return errors


class TopologySpec(CRDModel):
    """Placement by network domain: the nodes that share a value of one node label (an EFA leaf, an
    NVLink domain, a GKE sub-block) reach each other fastest."""

    key: str | None = Field(default=None, max_length=316, pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9_.-]+$")
    """Node label naming a network domain; default: the first topology label the accelerator catalogue
    names for the pool's accelerator type (e.g. topology.k8s.aws/network-node-layer-3)."""
    packing: Literal["Required", "Preferred"] = "Required"
    """The pods of one multi-node worker in one domain: always (Required) or when possible (Preferred)."""
    pairing: Literal["Required", "Preferred"] | None = None
    """Each decode worker in a domain that holds a prefill worker of the service (KV hand-offs stay
    inside the domain); omit for no pairing."""


# label keys (an optional DNS-subdomain prefix and a name) and values, as the API server checks them
LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
             r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
SELECTOR_VALUE = rf"^{LABEL_VALUE}$"
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY)]
LabelValue = Annotated[str, Field(max_length=63, pattern=SELECTOR_VALUE)]


class LabelSelectorRequirement(CRDModel):
    """One expression of a label selector."""

    key: LabelKey
    """The label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In, NotIn, Exists or DoesNotExist."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Values for In and NotIn (at least one); none for Exists and DoesNotExist."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            "message": "values: In and NotIn need at least one value, Exists and DoesNotExist take none",
        },
    )

    def cross_field_errors(self) -> list[str]:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            return [self.cel_rules[0]["message"]]
        return []


class LabelSelector(CRDModel):
    """A Kubernetes label selector; empty selects everything."""

    match_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    """Labels that must all be present with these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)
    """Expressions that must all hold."""

    # a CRD schema cannot constrain map keys (no propertyNames): a CEL rule checks them
    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "!has(self.matchLabels) || self.matchLabels.all(k, size(k) <= 317 && k.matches('"
            + LABEL_KEY.replace("\\", "\\\\") + "'))",
            "message": "matchLabels: every key must be a label key (an optional DNS-subdomain prefix and '/', "
            "then at most 63 characters of letters, digits, '-', '_' and '.', starting and ending alphanumeric)",
        },
    )

    def cross_field_errors(self) -> list[str]:
        if any(len(k) > 317 or not re.match(LABEL_KEY, k) for k in self.match_labels):
            return [self.cel_rules[0]["message"]]
        return []


class IPBlock(CRDModel):
    """A CIDR range (e.g. a scraper outside the cluster)."""

    cidr: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")
    """The range, e.g. 10.0.0.0/8."""
    except_: list[Annotated[str, Field(max_length=64, pattern=r"^[0-9a-fA-F:.]+/[0-9]{1,3}$")]] = Field(
        default_factory=list, alias="except", max_length=32)
    """Ranges inside `cidr` to leave out."""


class NetworkPolicyPeer(CRDModel):
    """Where traffic may come from, as a Kubernetes NetworkPolicy peer: pods (in the service's namespace,
    or with `namespaceSelector` in the namespaces it selects; both set: both must match), or an ipBlock."""

    pod_selector: LabelSelector | None = None
    """Pods by label."""
    namespace_selector: LabelSelector | None = None
    """Namespaces by label (`{}`: every namespace)."""
    ip_block: IPBlock | None = None
    """A CIDR range, instead of the selectors."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "has(self.ipBlock) != (has(self.podSelector) || has(self.namespaceSelector))",
            "message": "a peer is either ipBlock or podSelector/namespaceSelector",
        },
    )

    def cross_field_errors(self) -> list[str]:
        if (self.ip_block is not None) == (self.pod_selector is not None or self.namespace_selector is not None):
            return [self.cel_rules[0]["message"]]
        return []

    def manifest(self) -> dict[str, Any]:
        """The peer as a NetworkPolicy takes it (empty lists and maps left out, as the API server does)."""
        peer = self.model_dump(by_alias=True, exclude_none=True)
        return {key: {k: v for k, v in value.items() if v} for key, value in peer.items()}


class NetworkPolicySpec(CRDModel):
    """Who may reach the engines' HTTP port besides this service's router."""

    metrics_scrapers: list[NetworkPolicyPeer] | None = Field(default=None, max_length=16)
    """The pods that scrape the engines' /metrics; they reach the whole HTTP port (the OpenAI API too).
    Unset: the operator's default (`disagg run --metrics-scrapers`; the chart's
    networkPolicy.metricsScrapers). Empty: no scraper."""


WEIGHT_SCHEMES = ("hf://", "pvc://", "s3://", "gs://")
"""Where model.uri may point (its pattern); an engine may load from fewer (`weight_schemes`)."""


def _weights_rule() -> dict[str, str]:
    """CEL: the model's weights are where the engine loads them from."""
    clauses, messages = [], []
    for kind, adapter in ENGINES.items():
        refused = [scheme for scheme in WEIGHT_SCHEMES if scheme not in adapter.weight_schemes]
        if refused:
            uri = " || ".join(f"self.model.uri.startsWith('{scheme}')" for scheme in refused)
            clauses.append(f"(self.engine.kind != '{kind}' || !({uri}))")
            messages.append(f"{kind} loads weights from {' or '.join(adapter.weight_schemes)} only")
    rule = " && ".join(clauses) if len(clauses) != 1 else clauses[0][1:-1]
    return {"rule": rule or "true", "message": "; ".join(messages), "fieldPath": ".model.uri"}


def _speaks(protocol: str) -> str:
    """CEL: the service's engine speaks `protocol` (itself, or a custom engine of that protocol)."""
    return (f"(self.engine.kind == '{protocol}' || (self.engine.kind == 'custom' && has(self.engine.custom) && "
            f"self.engine.custom.protocol == '{protocol}'))")


def _worker_accelerators(role: str) -> str:
    """CEL: the accelerators of one worker of the pool (`PoolSpec.worker_accelerators`): accelerator.count
    x `nodes`, or, without it, the parallelism's accelerators when they fill more than one pod."""
    pool = f"self.{role}"
    world = f"({pool}.parallelism.tensor * {pool}.parallelism.pipeline * {pool}.parallelism.data)"
    count = f"{pool}.accelerator.count"
    return f"(has({pool}.nodes) ? {count} * {pool}.nodes : ({world} <= {count} ? {count} : {world}))"


def _owned_flag_rules() -> tuple[dict[str, str], ...]:
    """CEL rules refusing, in every pool's extraArgs, the flags the operator sets: one rule per engine
    and per condition under which the operator sets them (`owned_flag_cel`)."""
    conditions = (
        ("", OWNED_FLAGS),
        ("self.model.uri.startsWith('s3://') || self.model.uri.startsWith('gs://')", OWNED_WITH_OBJECT_STORAGE),
        ("has(self.kvCache) && has(self.kvCache.cpuOffloadGiB)", OWNED_WITH_CPU_TIER),
        ("has(self.kvCache) && has(self.kvCache.disk)", OWNED_WITH_DISK_TIER),
    )
    rules = []
    for engine in OWNED_FLAGS:
        for condition, table in conditions:
            owned = table[engine]
            if not owned:
                continue
            when = f" || !({condition})" if condition else ""
            spelling = "with '_' for '-' or as --flag.key" if ENGINES[engine].dotted_flags else "or as --flag=value"
            each = " && ".join(f"(!has(self.{part}.extraArgs) || self.{part}.extraArgs.all(a, "
                               f"!{owned_flag_cel(engine, owned, 'a')}))" for part in ("engine", "prefill", "decode"))
            rules.append({
                "rule": f"self.engine.kind != '{engine}'{when} || ({each})",
                "message": f"extraArgs must not set {', '.join(sorted(owned))}: the operator sets them for "
                f"{engine} (refused in any spelling {engine} reads: abbreviated, {spelling})",
            })
    return tuple(rules)


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
    drain: DrainSpec = Field(default_factory=DrainSpec)
    """How long a leaving worker may take to finish its requests."""
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    """Who may reach the engines (the router, the KV peers and the metrics scrapers)."""
    accelerator_budget: int | None = Field(default=None, ge=1, le=100_000)
    """Most accelerators both pools may hold together; the autoscaler stays within it."""
    prefill: PoolSpec
    """The prefill pool (compute-bound; sets TTFT)."""
    decode: PoolSpec
    """The decode pool (memory-bandwidth-bound; sets ITL)."""
    topology: TopologySpec | None = None
    """Network-topology placement of multi-node workers and of decode next to prefill."""

    cel_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {
            "rule": "!has(self.kvTransfer) || self.kvTransfer.connector != 'mooncake' || "
            "self.prefill.parallelism.tensor == self.decode.parallelism.tensor",
            "message": "kvTransfer.connector mooncake needs equal prefill.parallelism.tensor and "
            "decode.parallelism.tensor (use nixl for different TP per pool)",
        },
        {
            "rule": "self.engine.port != (has(self.kvTransfer.port) ? self.kvTransfer.port : "
            f"({_speaks('sglang')} || self.kvTransfer.connector == 'mooncake' ? {MOONCAKE_BOOTSTRAP_PORT} "
            f": {NIXL_SIDE_CHANNEL_PORT}))",
            "message": "engine.port must differ from the KV-transfer port (kvTransfer.port; by default "
            f"{NIXL_SIDE_CHANNEL_PORT} for vLLM with NIXL, {MOONCAKE_BOOTSTRAP_PORT} with Mooncake or SGLang)",
            "fieldPath": ".engine.port",
        },
        {
            "rule": f"!{_speaks('vllm')} || self.kvTransfer.connector != 'mooncake'",
            "message": "mooncake with engine vllm (or a custom engine of protocol vllm) is not supported: "
            "vllm-router does not hand Mooncake bootstrap data to pods it discovers; use connector nixl with "
            "vllm, or engine sglang with mooncake",
            "fieldPath": ".kvTransfer.connector",
        },
        _weights_rule(),
        *(
            {
                "rule": f"!has(self.model.architecture) || has(self.model.architecture.kvLoraRank) || "
                f"self.{role}.parallelism.tensor % self.model.architecture.kvHeads == 0 || "
                f"self.model.architecture.kvHeads % self.{role}.parallelism.tensor == 0",
                "message": f"{role}.parallelism.tensor must divide or be a multiple of model.architecture.kvHeads",
                "fieldPath": f".{role}.parallelism.tensor",
            }
            for role in ("prefill", "decode")
        ),
        *(
            {
                "rule": f"!has(self.acceleratorBudget) || !has(self.{role}.autoscaling) || "
                f"self.{role}.autoscaling.minReplicas * {_worker_accelerators(role)} <= self.acceleratorBudget",
                "message": f"{role}.autoscaling.minReplicas x the accelerators of a {role} worker (accelerator.count "
                "x its nodes) must not exceed acceleratorBudget",
                "fieldPath": f".{role}.autoscaling.minReplicas",
            }
            for role in ("prefill", "decode")
        ),
        {
            # the autoscaler shares the budget out over what the fixed pools leave: they must fit in it
            "rule": "!has(self.acceleratorBudget) || (has(self.prefill.autoscaling) && has(self.decode.autoscaling)) "
            + "".join(f"|| (has(self.{r}.autoscaling) && self.{r}.autoscaling.minReplicas * {_worker_accelerators(r)} "
                      "> self.acceleratorBudget) " for r in ("prefill", "decode"))
            + "|| " + " + ".join(f"(has(self.{r}.autoscaling) ? self.{r}.autoscaling.minReplicas : self.{r}.replicas) "
                                 f"* {_worker_accelerators(r)}" for r in ("prefill", "decode"))
            + " <= self.acceleratorBudget",
            "message": "acceleratorBudget is less than the accelerators the pools hold at least (a fixed pool its "
            "replicas, an autoscaled one minReplicas, times the accelerators of a worker: accelerator.count x its "
            "nodes)",
            "fieldPath": ".acceleratorBudget",
        },
        *_owned_flag_rules(),
        *(
            {
                "rule": f"self.engine.kind != 'custom' || !has(self.{role}.autoscaling) || ("
                + " && ".join(f"has(self.engine.custom.metrics.{name})" for name in NEEDED_FOR_AUTOSCALING[role])
                + ")",
                "message": f"{role}.autoscaling with engine.kind custom needs the metric names the autoscaler reads "
                f"for {role}: engine.custom.metrics {', '.join(NEEDED_FOR_AUTOSCALING[role])} (or set "
                f"{role}.replicas without autoscaling)",
                "fieldPath": f".{role}.autoscaling",
            }
            for role in ("prefill", "decode")
        ),
    )

    def owned_flags(self) -> dict[str, str]:
        """The flags the operator sets for this spec (option string -> shortest accepted prefix)."""
        kind = self.engine.kind
        if kind not in OWNED_FLAGS:  # a custom engine's flags are its own template
            return {}
        owned = dict(OWNED_FLAGS[kind])
        if self.model.uri.startswith(("s3://", "gs://")):
            owned.update(OWNED_WITH_OBJECT_STORAGE[kind])
        if self.kv_cache is not None and self.kv_cache.cpu_offload_gi_b is not None:
            owned.update(OWNED_WITH_CPU_TIER[kind])
        if self.kv_cache is not None and self.kv_cache.disk is not None:
            owned.update(OWNED_WITH_DISK_TIER[kind])
        return owned

    def cross_field_errors(self) -> list[str]:
        return (self._engine_rule_errors() + self._tensor_errors() + self._budget_errors()
                + self._custom_metrics_errors() + self._owned_flag_errors())

    def _engine_rule_errors(self) -> list[str]:
        """The connector against the pools' tensor parallelism, the engine's port and protocol, and the
        model's storage."""
        rules = self.cel_rules
        errors = []
        tensor = (self.prefill.parallelism.tensor, self.decode.parallelism.tensor)
        if self.kv_transfer.connector == "mooncake" and tensor[0] != tensor[1]:
            errors.append(rules[0]["message"])
        if self.engine.port == kv_port(self.kv_transfer.connector, self.engine.protocol, self.kv_transfer.port):
            errors.append(f"{rules[1]['fieldPath']}: {rules[1]['message']}")
        if self.engine.protocol == "vllm" and self.kv_transfer.connector == "mooncake":
            errors.append(f"{rules[2]['fieldPath']}: {rules[2]['message']}")
        schemes = ENGINES[self.engine.kind].weight_schemes if self.engine.kind in ENGINES else WEIGHT_SCHEMES
        if not self.model.uri.startswith(schemes):
            errors.append(f"{rules[3]['fieldPath']}: {self.engine.kind} loads weights from "
                          f"{' or '.join(schemes)} only")
        return errors

    def _tensor_errors(self) -> list[str]:
        """Each pool's tensor parallelism divides the model's KV heads, or they divide it."""
        errors = []
        arch = self.model.architecture
        for rule, pool in zip(self.cel_rules[4:6], (self.prefill, self.decode), strict=True):
            size = pool.parallelism.tensor
            if arch is not None and arch.kv_lora_rank is None and size % arch.kv_heads and arch.kv_heads % size:
                errors.append(f"{rule['fieldPath']}: {rule['message']} ({arch.kv_heads}), not {size}")
        return errors

    def _budget_errors(self) -> list[str]:
        """The accelerator budget holds each autoscaled pool's floor, and every pool's least size."""
        rules = self.cel_rules
        errors = []
        pools = (self.prefill, self.decode)
        budget = self.accelerator_budget
        floors = [pool.autoscaling.min_replicas * pool.worker_accelerators if pool.autoscaling else None
                  for pool in pools]
        for rule, floor in zip(rules[6:8], floors, strict=True):
            if budget is not None and floor is not None and floor > budget:
                errors.append(f"{rule['fieldPath']}: {rule['message']} ({floor} > {budget})")
        need = sum(pool.worker_accelerators * (pool.autoscaling.min_replicas if pool.autoscaling else pool.replicas)
                   for pool in pools)
        if (budget is not None and None in floors and not any(f is not None and f > budget for f in floors)
                and need > budget):
            errors.append(f"{rules[8]['fieldPath']}: {budget} is less than the {need} accelerators the pools hold "
                          "at least (a fixed pool its replicas, an autoscaled one minReplicas, times the "
                          "accelerators of a worker: accelerator.count x its nodes)")
        return errors

    def _custom_metrics_errors(self) -> list[str]:
        """An autoscaled pool of a custom engine needs the metric names the autoscaler reads for it."""
        errors = []
        custom = self.engine.custom
        for role in ("prefill", "decode"):
            missing = [name for name in NEEDED_FOR_AUTOSCALING[role]
                       if custom is not None and custom.metrics.model_dump(by_alias=True).get(name) is None]
            if self.engine.kind == "custom" and getattr(self, role).autoscaling is not None and missing:
                errors.append(f".{role}.autoscaling: the custom engine cannot autoscale {role}: set "
                              f"engine.custom.metrics {', '.join(missing)} (the metric names the autoscaler reads "
                              f"for {role}), or remove {role}.autoscaling and set {role}.replicas")
        return errors

    def _owned_flag_errors(self) -> list[str]:
        """extraArgs may not set a flag the operator sets from the spec."""
        errors = []
        owned = self.owned_flags()
        for field, args in (("engine", self.engine.extra_args), ("prefill", self.prefill.extra_args),
                            ("decode", self.decode.extra_args)):
            for index, arg in enumerate(args):
                flag = owned_flag(self.engine.kind, arg, owned)
                if flag is not None:
                    errors.append(f".{field}.extraArgs[{index}]: {arg!r} is {flag} as {self.engine.kind} reads it, "
                                  "which is set by the operator from the spec; remove it from extraArgs")
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
    workload: str | None = None
    """The Deployment (or LeaderWorkerSet) that serves the pool: `<name>-<role>`, or `<name>--<role>-b` after
    a rollout to the other slot (the autoscaler scales this one)."""


class RolloutStatus(CRDModel):
    """A rollout to a new revision under way: the new pools next to the serving ones."""

    from_revision: str = Field(alias="from")
    """The revision that serves."""
    to_revision: str = Field(alias="to")
    """The revision coming up."""
    phase: Literal["Starting", "Switching", "Draining", "Blocked"]
    """Starting: the new pools come up; Switching: the routers move to them; Draining: the old routers finish
    their streams, then the old pools go; Blocked: it cannot go on (see message)."""
    prefill: str | None = None
    """Ready/desired workers of the new revision's prefill pool."""
    decode: str | None = None
    """Ready/desired workers of the new revision's decode pool."""
    message: str = ""
    """What happens, or why it cannot."""
    started_at: str | None = None
    """When it started (RFC 3339)."""


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
    revision: str | None = None
    """The revision that serves: a hash of what both pools' engines run (the routers select its workers)."""
    rollout: RolloutStatus | None = None
    """A rollout to a new revision, while one is under way."""
