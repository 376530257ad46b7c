"""A custom engine: the user's image, command and argument templates, and metric names.

The operator fills {{port}}, {{role}}, {{kvPort}}, {{model}}, {{servedModelName}} and {{tensorParallel}}
in the templates. The engine speaks the P/D protocol of vLLM or SGLang (`custom.protocol`): that adapter's
router runs in front of it and decides which pods open the KV port.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from disagg.engines import sglang, vllm
from disagg.engines.base import (
    EngineAdapter,
    EngineCommand,
    Group,
    MetricNames,
    RouterCommand,
)
from disagg.wellknown import Role

if TYPE_CHECKING:
    from disagg.api.v1alpha1 import CustomEngineSpec, CustomMetrics, InferenceServiceSpec, PoolSpec

_TEMPLATE = re.compile(r"\{\{(\w+)\}\}")

UNSET = ""
"""A signal the engine does not export: no query matches the empty name."""


def metric_names(metrics: CustomMetrics) -> MetricNames:
    """The spec's names as the autoscaler's signals (an unset one matches nothing)."""
    def one(field: str) -> str:
        value: str | None = getattr(metrics, field)
        return value or UNSET

    def several(field: str) -> tuple[str, ...]:
        value: str | None = getattr(metrics, field)
        return (value,) if value else ()

    return MetricNames(
        waiting_requests=several("waiting_requests"), running_requests=several("running_requests"),
        kv_cache_usage=several("kv_cache_usage"), prompt_tokens_total=one("prompt_tokens_total"),
        generation_tokens_total=one("generation_tokens_total"), ttft_histogram=one("ttft_histogram"),
        itl_histogram=several("itl_histogram"), e2e_histogram=one("e2e_histogram"),
        prompt_histogram=one("prompt_histogram"), kv_handed=one("kv_handed_off_total"),
        kv_recomputed=one("kv_recomputed_total"), kv_failed=one("kv_transfer_failures_total"),
    )


def fill(template: str, values: dict[str, str]) -> str:
    """The template with every {{value}} replaced (validation refuses unknown names)."""
    return _TEMPLATE.sub(lambda match: values.get(match.group(1), match.group(0)), template)


class Custom:
    """An engine the operator knows only through the spec."""

    kind = "custom"
    images: dict[str, str] = {}  # engine.image is required
    vendors = frozenset({"nvidia", "amd", "aws", "google"})
    connectors = frozenset({"nixl", "mooncake"})
    weight_schemes: tuple[str, ...] = ("hf://", "pvc://", "s3://", "gs://")
    dotted_flags = False
    owned_flags: dict[str, str] = {}
    owned_with_object_storage: dict[str, str] = {}
    owned_with_cpu_tier: dict[str, str] = {}
    owned_with_disk_tier: dict[str, str] = {}
    multinode_flags: dict[str, str] = {}

    def __init__(self, spec: CustomEngineSpec) -> None:
        self.spec = spec
        self.protocol: EngineAdapter = vllm.VLLM() if spec.protocol == "vllm" else sglang.SGLang()
        self.router_image = self.protocol.router_image
        self.decode_ttft_from_handoff = self.protocol.decode_ttft_from_handoff
        self.metrics = metric_names(spec.metrics)

    def kv_port(self, connector: str, explicit: int | None) -> int:
        return self.protocol.kv_port(connector, explicit)

    def kv_listens(self, role: Role) -> bool:
        return self.protocol.kv_listens(role)

    def pool_annotations(self, role: Role, port_kv: int) -> dict[str, str]:
        return self.protocol.pool_annotations(role, port_kv)

    def pool_command(
        self, spec: InferenceServiceSpec, role: Role, model: str, model_args: list[str], port_kv: int,
        disk_gib: int | None = None,
    ) -> EngineCommand:
        pool: PoolSpec = getattr(spec, role)
        values = {
            "port": str(spec.engine.port), "role": role, "kvPort": str(port_kv), "model": model,
            "servedModelName": spec.model.name, "tensorParallel": str(pool.parallelism.tensor),
        }
        return EngineCommand([fill(part, values) for part in self.spec.command],
                             [fill(part, values) for part in self.spec.args], [])

    def group(self, pool: PoolSpec, command: list[str], args: list[str], env: list[dict[str, Any]]) -> Group:
        # every pod of the group has LWS_LEADER_ADDRESS and LWS_WORKER_INDEX: the engine reads them itself
        return Group(pool.worker_nodes, args, command, args, env)

    def drain_args(self, drain_s: int) -> list[str]:
        return []

    def drain_gauges(self, role: Role) -> list[str]:
        return [*self.metrics.running_requests[:1], *self.metrics.waiting_requests[:1]]

    def router(self, connector: str, common: list[str], shutdown_grace_s: int) -> RouterCommand:
        return self.protocol.router(connector, common, shutdown_grace_s)

    def layout_errors(self, field: str, pool: PoolSpec, nodes: int) -> list[tuple[str, str]]:
        return []
