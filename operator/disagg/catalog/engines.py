"""The engine catalogue: how vLLM and SGLang are started per role, and what metrics they export.

Flags are the engines' documented ones (vLLM 0.32 `vllm serve`, SGLang `sglang.launch_server`,
vllm-router 0.1.17, sglang-router 0.3); tests/unit/test_engine_flags.py checks every flag we render
against the flag lists recorded under tests/data/engine_flags/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from disagg.wellknown import Role as Role  # where engine flags and metrics are looked up by role

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
    A decode whose KV cannot be loaded (its prefill restarted, a transfer failed) prefills the prompt itself
    (`kv_load_failure_policy: recompute`) rather than failing the request (vLLM's default, `fail`).
    """
    name = "NixlConnector" if connector == "nixl" else "MooncakeConnector"
    kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
    transfer: dict[str, object] = {"kv_connector": name, "kv_role": kv_role}
    if connector == "nixl" and backend is not None:
        transfer["kv_connector_extra_config"] = {"backends": [backend.upper()]}
    failure = {"kv_load_failure_policy": "recompute"} if role == "decode" else {}
    if offload is None:
        return json.dumps({**transfer, **failure}, separators=(",", ":"))
    lmcache = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    multi = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"connectors": [transfer, lmcache]},
        **failure,
    }
    return json.dumps(multi, separators=(",", ":"))


# --- flags and environment variables the operator owns ------------------------------------------
#
# The engines read their command line more loosely than it looks: vLLM's FlexibleArgumentParser turns
# `_` into `-` in a flag's name and reads `--flag.key=value` as a key of the JSON flag `--flag` (set
# after everything else); both parsers are argparse with abbreviations allowed, so a unique prefix of a
# flag (`--disaggregation-mod`) is that flag, and `--flag=value` is `--flag value`. A flag the operator
# sets is refused in extraArgs however it is spelled.

OWNED_FLAGS: dict[str, dict[str, str]] = {
    # every option string of the actions the operator sets -> the shortest prefix the engine's parser
    # takes for it (unique among the engine's option strings, tests/data/engine_flags/*.txt; a unit test
    # recomputes them)
    "vllm": {
        "--host": "--ho", "--port": "--por", "--served-model-name": "--ser",
        "--tensor-parallel-size": "--te", "-tp": "-t", "--kv-transfer-config": "--kv-t",
        "--model": "--model", "--revision": "--rev", "--shutdown-timeout": "--shu",
    },
    "sglang": {
        "--host": "--ho", "--port": "--po", "--served-model-name": "--se",
        "--tp-size": "--tp", "--tensor-parallel-size": "--te", "--model-path": "--model-p", "--model": "--model",
        "--disaggregation-mode": "--disaggregation-m", "--disaggregation-transfer-backend": "--disaggregation-t",
        "--disaggregation-bootstrap-port": "--disaggregation-b", "--revision": "--rev",
        "--enable-metrics": "--enable-metrics",
    },
}
OWNED_WITH_OBJECT_STORAGE = {"vllm": {"--load-format": "--loa"}, "sglang": {}}
"""Owned when the weights stream from s3:// or gs:// (the operator sets --load-format runai_streamer)."""
OWNED_WITH_CPU_TIER = {"vllm": {}, "sglang": {"--enable-hierarchical-cache": "--enable-hie",
                                              "--hicache-size": "--hicache-si"}}
OWNED_WITH_DISK_TIER = {"vllm": {}, "sglang": {"--hicache-storage-backend": "--hicache-storage-backend"}}

MULTINODE_FLAGS: dict[str, dict[str, str]] = {
    # set for workers that run several ranks or span nodes, from parallelism and nodes (option string ->
    # shortest prefix, as OWNED_FLAGS; tests/unit/test_owned_flags.py recomputes them)
    "vllm": {
        "--pipeline-parallel-size": "--pi", "-pp": "-pp", "--data-parallel-size": "--data-parallel-size",
        "-dp": "-dp", "--data-parallel-size-local": "--data-parallel-size-", "-dpl": "-dpl",
        "--data-parallel-address": "--data-parallel-a", "-dpa": "-dpa",
        "--data-parallel-rpc-port": "--data-parallel-rp", "-dpp": "-dpp",
        "--data-parallel-start-rank": "--data-parallel-st", "-dpr": "-dpr", "--headless": "--hea",
        "--nnodes": "--nn", "-n": "-n", "--node-rank": "--nod", "-r": "-r", "--master-addr": "--master-a",
        "--master-port": "--master-p", "--enable-expert-parallel": "--enable-ex", "-ep": "-e",
        "--distributed-executor-backend": "--distributed-e",
    },
    "sglang": {
        "--nnodes": "--nn", "--node-rank": "--nod", "--dist-init-addr": "--dist-i", "--pp-size": "--pp-s",
        "--pipeline-parallel-size": "--pi", "--dp-size": "--dp", "--data-parallel-size": "--da",
        "--enable-dp-attention": "--enable-dp-attention", "--ep-size": "--ep-s",
        "--expert-parallel-size": "--expert-p", "--ep": "--ep",
    },
}
"""Owned when a pool's workers run several ranks or span nodes (pipeline, data or expert parallelism)."""

OWNED_ENV = (
    "POD_IP", "HF_HOME", "VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT",
    "VLLM_MOONCAKE_BOOTSTRAP_PORT", "LMCACHE_LOCAL_CPU", "LMCACHE_MAX_LOCAL_CPU_SIZE", "LMCACHE_CHUNK_SIZE",
    "LMCACHE_LOCAL_DISK", "LMCACHE_MAX_LOCAL_DISK_SIZE", "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR",
    "SGLANG_DISAGGREGATION_NIXL_BACKEND",
)
"""Environment variables the operator sets in engine containers (a second entry would clash with its
own: the API server refuses the duplicate, or the user's value would silently lose)."""


def flag_key(engine: str, arg: str) -> tuple[str, bool] | None:
    """The option string `arg` names as the engine's parser reads it, and whether it may be a prefix
    (an abbreviation); None for an argument that is no flag."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    if arg.startswith("--"):
        key = arg.split("=", 1)[0]
        if engine == "vllm":  # the part before a '.' is the flag (JSON key path after); '_' reads as '-'
            key = key.split(".", 1)[0].replace("_", "-")
        return key, True
    # a single dash: `-tp=8` is -tp; `-t` alone may abbreviate -tp; vLLM reads `-t.x=1` as `-t '{"x": 1}'`,
    # an abbreviation again
    key = arg.split("=", 1)[0]
    dotted = engine == "vllm" and "." in key
    if dotted:
        key = key.split(".", 1)[0]
    return key, key == arg or dotted


def owned_flag(engine: str, arg: str, owned: dict[str, str]) -> str | None:
    """The flag of `owned` (option string -> shortest prefix) that `arg` sets in the engine, or None."""
    found = flag_key(engine, arg)
    if found is None:
        return None
    key, may_abbreviate = found
    for option, shortest in owned.items():
        if key == option or (may_abbreviate and key.startswith(shortest) and option.startswith(key)):
            return option
    return None


def owned_flag_cel(engine: str, owned: dict[str, str], arg: str) -> str:
    """A CEL expression true when the string `arg` sets a flag of `owned` (what `owned_flag` finds):
    its name, read as the engine reads it, is among the spellings of an owned flag."""
    long_forms: list[str] = []
    short_forms: list[str] = []
    abbreviations: list[str] = []
    for option, shortest in sorted(owned.items()):
        prefixes = [option[:end] for end in range(len(shortest), len(option) + 1)]
        if option.startswith("--"):
            long_forms += prefixes
        else:
            short_forms.append(option)
            abbreviations += prefixes[:-1]
    key = f"{arg}.split('=')[0]" + (".split('.')[0]" if engine == "vllm" else "")
    long_key = f"{key}.replace('_', '-')" if engine == "vllm" else key
    terms = [f"({arg}.startsWith('--') && {long_key} in {long_forms!r})"]
    if short_forms:
        dotted = f" || ({arg}.split('=')[0].contains('.') && {key} in {abbreviations!r})" if engine == "vllm" else ""
        terms.append(f"(!{arg}.startsWith('--') && ({key} in {short_forms!r} || {arg} in {abbreviations!r}{dotted}))")
    return "(" + " || ".join(terms) + ")"
