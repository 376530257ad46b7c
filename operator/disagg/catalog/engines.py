"""The engine catalogue: how vLLM and SGLang are started per role, and what metrics they export.

Flags are the engines' documented ones (vLLM 0.32 `vllm serve`, SGLang `sglang.launch_server`,
vllm-router 0.1.17, sglang-router 0.3); tests/unit/test_engine_flags.py checks every flag we render
against the flag lists recorded under tests/data/engine_flags/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode"]

NIXL_SIDE_CHANNEL_PORT = 5600
MOONCAKE_BOOTSTRAP_PORT = 8998
ROUTER_METRICS_PORT = 29000


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


@dataclass(frozen=True)
class Engine:
    """One inference engine."""

    kind: str
    images: dict[str, str]
    """Default image per accelerator vendor; vendors missing here need an explicit image."""
    router_image: str
    vendors: frozenset[str]
    """Accelerator vendors the engine runs on."""
    connectors: frozenset[str]
    metrics: MetricNames
    decode_ttft_from_handoff: bool
    """Whether a decode engine's TTFT starts when prefill hands the request over (vLLM: the router
    sends it to decode with the prefill's answer, so the histogram holds the KV hand-off, admission
    and first step only) rather than when the router received it (SGLang: the router dispatches to
    both pools at once, and decode's TTFT includes the prefill)."""


VLLM_METRICS = MetricNames(
    waiting_requests=("vllm:num_requests_waiting",),
    running_requests=("vllm:num_requests_running",),
    kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prompt_tokens_total="vllm:prompt_tokens_total",
    generation_tokens_total="vllm:generation_tokens_total",
    ttft_histogram="vllm:time_to_first_token_seconds",
    itl_histogram=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    e2e_histogram="vllm:e2e_request_latency_seconds",
    prompt_histogram="vllm:request_prompt_tokens",
)

SGLANG_METRICS = MetricNames(
    waiting_requests=("sglang:num_queue_reqs",),
    running_requests=("sglang:num_running_reqs",),
    kv_cache_usage=("sglang:token_usage",),
    prompt_tokens_total="sglang:prompt_tokens_total",
    generation_tokens_total="sglang:generation_tokens_total",
    ttft_histogram="sglang:time_to_first_token_seconds",
    itl_histogram=("sglang:inter_token_latency_seconds",),
    e2e_histogram="sglang:e2e_request_latency_seconds",
    prompt_histogram="sglang:prompt_tokens_histogram",
)

ENGINES: dict[str, Engine] = {
    "vllm": Engine(
        kind="vllm",
        images={
            "nvidia": "vllm/vllm-openai:v0.32.0",
            "amd": "vllm/vllm-openai-rocm:v0.32.0",
            "google": "vllm/vllm-tpu:v0.32.0",
        },
        router_image="vllm/vllm-router:v0.1.17",
        vendors=frozenset({"nvidia", "amd", "aws", "google"}),
        connectors=frozenset({"nixl", "mooncake"}),
        metrics=VLLM_METRICS,
        decode_ttft_from_handoff=True,
    ),
    "sglang": Engine(
        kind="sglang",
        images={"nvidia": "lmsysorg/sglang:v0.5.9", "amd": "lmsysorg/sglang:v0.5.9-rocm700-mi30x"},
        router_image="lmsysorg/sgl-model-gateway:v0.3.2",
        vendors=frozenset({"nvidia", "amd"}),
        connectors=frozenset({"nixl", "mooncake"}),
        metrics=SGLANG_METRICS,
        decode_ttft_from_handoff=False,
    ),
}

# Which (prefill vendor, decode vendor) pairs a connector can bridge. Same-vendor pairs always work;
# across vendors only NIXL over UCX/libfabric (host-staged or dmabuf RDMA) moves KV between the two
# memory systems. Mooncake's transfer engine registers CUDA memory only for GPU-direct paths, so we
# refuse it across vendors rather than let transfers fail silently at run time.
CROSS_VENDOR_CONNECTORS = frozenset({"nixl"})


def kv_port(connector: str, engine: str, explicit: int | None) -> int:
    """The side-channel/bootstrap port for a connector: the explicit one or the engine's default."""
    if explicit is not None:
        return explicit
    if engine == "sglang" or connector == "mooncake":
        return MOONCAKE_BOOTSTRAP_PORT
    return NIXL_SIDE_CHANNEL_PORT


def vllm_kv_transfer_config(
    connector: str, role: Role, backend: str | None, offload: dict[str, object] | None
) -> str:
    """The JSON of vLLM's --kv-transfer-config for one role.

    Prefill produces KV, decode consumes it; NIXL supports explicit producer/consumer roles.
    With an offload tier (LMCache), the P/D connector and LMCache are combined by MultiConnector.
    """
    name = "NixlConnector" if connector == "nixl" else "MooncakeConnector"
    kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
    transfer: dict[str, object] = {"kv_connector": name, "kv_role": kv_role}
    if connector == "nixl" and backend is not None:
        transfer["kv_connector_extra_config"] = {"backends": [backend.upper()]}
    if offload is None:
        return json.dumps(transfer, separators=(",", ":"))
    lmcache = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    multi = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"connectors": [transfer, lmcache]},
    }
    return json.dumps(multi, separators=(",", ":"))
