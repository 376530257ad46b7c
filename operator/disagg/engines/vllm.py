"""vLLM (`vllm serve`, vLLM 0.32) with vllm-router 0.1.17.

Flags are vLLM's documented ones; tests/unit/test_engine_flags.py checks every flag we render against the
flag lists recorded under tests/data/engine_flags/.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from disagg.engines.base import (
    DIST_PORT,
    DP_RPC_PORT,
    DP_SIZE_LOCAL_ENV,
    KV_DISK_DIR,
    LEADER_ADDRESS,
    MOONCAKE_BOOTSTRAP_PORT,
    NIXL_SIDE_CHANNEL_PORT,
    START_RANK_SCRIPT,
    WORKER_INDEX,
    EngineCommand,
    Group,
    MetricNames,
    RouterCommand,
)
from disagg.wellknown import Role

if TYPE_CHECKING:
    from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec

METRICS = MetricNames(
    waiting_requests=("vllm:num_requests_waiting",),
    running_requests=("vllm:num_requests_running",),
    kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    prompt_tokens_total="vllm:prompt_tokens_total",
    generation_tokens_total="vllm:generation_tokens_total",
    ttft_histogram="vllm:time_to_first_token_seconds",
    itl_histogram=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    e2e_histogram="vllm:e2e_request_latency_seconds",
    prompt_histogram="vllm:request_prompt_tokens",
    # vLLM counts prompt tokens by where their KV came from, and its NIXL connector's failed transfers
    kv_handed='vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}',
    kv_recomputed='vllm:prompt_tokens_by_source_total{source="local_compute"}',
    kv_failed="vllm:nixl_num_failed_transfers_total",
)


def kv_transfer_config(connector: str, role: Role, backend: str | None, offload: dict[str, object] | None) -> str:
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


def parallel_args(pool: PoolSpec) -> list[str]:
    """vLLM's parallelism flags beyond --tensor-parallel-size (single- and multi-node)."""
    par = pool.parallelism
    args: list[str] = []
    if par.pipeline > 1:
        args += ["--pipeline-parallel-size", str(par.pipeline)]
    if par.data > 1 and not pool.multi_node:
        args += ["--data-parallel-size", str(par.data)]
    if par.expert:
        args += ["--enable-expert-parallel"]
    return args


def _per_rank_gib(total_gib: int, tp: int) -> str:
    """A pod's GiB split over its TP ranks, as the float text LMCache parses."""
    return f"{total_gib / tp:g}"


class VLLM:
    """vLLM: NIXL or Mooncake through --kv-transfer-config, LMCache for offload tiers."""

    kind = "vllm"
    images = {
        "nvidia": "vllm/vllm-openai:v0.32.0",
        "amd": "vllm/vllm-openai-rocm:v0.32.0",
        "google": "vllm/vllm-tpu:v0.32.0",
    }
    router_image = "vllm/vllm-router:v0.1.17"
    vendors = frozenset({"nvidia", "amd", "aws", "google"})
    connectors = frozenset({"nixl", "mooncake"})
    weight_schemes: tuple[str, ...] = ("hf://", "pvc://", "s3://", "gs://")
    metrics = METRICS
    # the router sends a request to decode with the prefill's answer, so decode's TTFT histogram holds the KV
    # hand-off, admission and first step only
    decode_ttft_from_handoff = True
    # FlexibleArgumentParser: `_` reads as `-`, `--flag.key=value` is a key of the JSON flag `--flag`
    dotted_flags = True
    owned_flags = {
        "--host": "--ho", "--port": "--por", "--served-model-name": "--ser",
        "--tensor-parallel-size": "--te", "-tp": "-t", "--kv-transfer-config": "--kv-t",
        "--model": "--model", "--revision": "--rev", "--shutdown-timeout": "--shu",
    }
    owned_with_object_storage = {"--load-format": "--loa"}
    owned_with_cpu_tier: dict[str, str] = {}
    owned_with_disk_tier: dict[str, str] = {}
    multinode_flags = {
        "--pipeline-parallel-size": "--pi", "-pp": "-pp", "--data-parallel-size": "--data-parallel-size",
        "-dp": "-dp", "--data-parallel-size-local": "--data-parallel-size-", "-dpl": "-dpl",
        "--data-parallel-address": "--data-parallel-a", "-dpa": "-dpa",
        "--data-parallel-rpc-port": "--data-parallel-rp", "-dpp": "-dpp",
        "--data-parallel-start-rank": "--data-parallel-st", "-dpr": "-dpr", "--headless": "--hea",
        "--nnodes": "--nn", "-n": "-n", "--node-rank": "--nod", "-r": "-r", "--master-addr": "--master-a",
        "--master-port": "--master-p", "--enable-expert-parallel": "--enable-ex", "-ep": "-e",
        "--distributed-executor-backend": "--distributed-e",
    }

    def kv_port(self, connector: str, explicit: int | None) -> int:
        if explicit is not None:
            return explicit
        return MOONCAKE_BOOTSTRAP_PORT if connector == "mooncake" else NIXL_SIDE_CHANNEL_PORT

    def kv_listens(self, role: Role) -> bool:
        return True

    def pool_annotations(self, role: Role, port_kv: int) -> dict[str, str]:
        return {}

    def pool_command(
        self, spec: InferenceServiceSpec, role: Role, model: str, model_args: list[str], port_kv: int,
        disk_gib: int | None = None,
    ) -> EngineCommand:
        pool: PoolSpec = getattr(spec, role)
        kv = spec.kv_transfer
        tiers = spec.kv_cache
        tp = pool.parallelism.tensor
        args = [
            "--host", "0.0.0.0",
            "--port", str(spec.engine.port),
            "--served-model-name", spec.model.name,
            "--tensor-parallel-size", str(tp),
            *parallel_args(pool),
        ]
        if spec.model.revision:
            args += ["--revision", spec.model.revision]
        args += model_args
        cpu_gib = tiers.cpu_offload_gi_b if tiers is not None else None
        offload: dict[str, object] | None = {"cpu_gib": cpu_gib} if cpu_gib is not None else None
        args += ["--kv-transfer-config", kv_transfer_config(kv.connector, role, kv.backend, offload)]
        env: list[dict[str, Any]]
        if kv.connector == "nixl":
            # NIXL's side channel defaults to localhost: the peer must be told the pod's own address.
            env = [
                {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "value": "$(POD_IP)"},
                {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(port_kv)},
            ]
        else:
            env = [{"name": "VLLM_MOONCAKE_BOOTSTRAP_PORT", "value": str(port_kv)}]
        if cpu_gib is not None:
            # LMCache sizes its tiers per TP-rank process in GiB: split the pod's budget
            env += [
                {"name": "LMCACHE_LOCAL_CPU", "value": "True"},
                {"name": "LMCACHE_MAX_LOCAL_CPU_SIZE", "value": _per_rank_gib(cpu_gib, tp)},
                {"name": "LMCACHE_CHUNK_SIZE", "value": "256"},
            ]
            if disk_gib is not None:
                env += [
                    {"name": "LMCACHE_LOCAL_DISK", "value": f"file://{KV_DISK_DIR}/"},
                    {"name": "LMCACHE_MAX_LOCAL_DISK_SIZE", "value": _per_rank_gib(disk_gib, tp)},
                ]
        return EngineCommand(["vllm", "serve", model], args, env)

    def group(self, pool: PoolSpec, command: list[str], args: list[str], env: list[dict[str, Any]]) -> Group:
        par = pool.parallelism
        nodes = pool.worker_nodes
        if par.data > 1:
            local = par.data // nodes
            shared = [
                "--data-parallel-size", str(par.data), "--data-parallel-size-local", str(local),
                "--data-parallel-address", LEADER_ADDRESS, "--data-parallel-rpc-port", str(DP_RPC_PORT),
            ]
            worker_env = [*env, {"name": DP_SIZE_LOCAL_ENV, "value": str(local)}]
            return Group(nodes, [*args, *shared], ["/bin/sh", "-c", START_RANK_SCRIPT, *command],
                         [*args, *shared, "--headless"], worker_env)
        shared = ["--nnodes", str(nodes), "--node-rank", WORKER_INDEX, "--master-addr", LEADER_ADDRESS,
                  "--master-port", str(DIST_PORT)]
        return Group(nodes, [*args, *shared], command, [*args, *shared, "--headless"], env)

    def drain_args(self, drain_s: int) -> list[str]:
        return ["--shutdown-timeout", str(drain_s)]

    def drain_gauges(self, role: Role) -> list[str]:
        gauges = [METRICS.running_requests[0], METRICS.waiting_requests[0]]
        if role == "prefill":
            gauges.append(METRICS.kv_cache_usage[0])  # KV caches held until their decode pulls them
        return gauges

    def router(self, connector: str, common: list[str], shutdown_grace_s: int) -> RouterCommand:
        return RouterCommand(["vllm-router"], ["--vllm-pd-disaggregation", "--kv-connector", connector, *common],
                             "vllm-router", "/liveness")

    def layout_errors(self, field: str, pool: PoolSpec, nodes: int) -> list[tuple[str, str]]:
        par = pool.parallelism
        count = pool.accelerator.count
        if par.pipeline > 1 and par.data > 1:
            return [(f"{field}.parallelism", "vLLM runs a worker across nodes either by pipeline stages "
                     "(--nnodes) or by data-parallel ranks (--data-parallel-size), not both")]
        if par.pipeline > 1 and par.pipeline % nodes:
            return [(f"{field}.parallelism.pipeline", f"{par.pipeline} stages do not split evenly over {nodes} nodes")]
        if par.data > 1 and count != par.tensor * (par.data // nodes):
            return [(f"{field}.parallelism.data", f"{par.data} data-parallel ranks of TP{par.tensor} over "
                     f"{nodes} nodes need {par.tensor * par.data // nodes} accelerators per pod, "
                     f"accelerator.count is {count}")]
        return []
