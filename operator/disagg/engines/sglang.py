"""SGLang (`sglang.launch_server`, SGLang 0.5.9) with sglang-router 0.3 (sgl-model-gateway).

Flags are SGLang's documented ones; tests/unit/test_engine_flags.py checks every flag we render against the
flag lists recorded under tests/data/engine_flags/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagg.engines.base import (
    DIST_PORT,
    KV_DISK_DIR,
    LEADER_ADDRESS,
    MOONCAKE_BOOTSTRAP_PORT,
    WORKER_INDEX,
    EngineCommand,
    Group,
    MetricNames,
    RouterCommand,
)
from disagg.wellknown import Role

if TYPE_CHECKING:
    from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec

BOOTSTRAP_PORT_ANNOTATION = "sglang.ai/bootstrap-port"
"""sglang-router's discovery reads a prefill pod's bootstrap port from it (the operator too, to add one back)."""
METRICS = MetricNames(
    waiting_requests=("sglang:num_queue_reqs",),
    running_requests=("sglang:num_running_reqs",),
    kv_cache_usage=("sglang:token_usage",),
    prompt_tokens_total="sglang:prompt_tokens_total",
    generation_tokens_total="sglang:generation_tokens_total",
    ttft_histogram="sglang:time_to_first_token_seconds",
    itl_histogram=("sglang:inter_token_latency_seconds",),
    e2e_histogram="sglang:e2e_request_latency_seconds",
    prompt_histogram="sglang:prompt_tokens_histogram",
    # SGLang times every transfer it received and counts the requests whose transfer failed (it never
    # recomputes a prompt)
    kv_handed="sglang:kv_transfer_latency_ms_count",
    kv_failed="sglang:num_transfer_failed_reqs_total",
)


def parallel_args(pool: PoolSpec) -> tuple[int, list[str]]:
    """SGLang's TP size (it spans data-parallel attention ranks) and its other parallelism flags."""
    par = pool.parallelism
    tp = par.tensor * par.data
    args: list[str] = []
    if par.pipeline > 1:
        args += ["--pp-size", str(par.pipeline)]
    if par.data > 1:
        args += ["--dp-size", str(par.data), "--enable-dp-attention"]
    if par.expert:
        args += ["--ep-size", str(tp)]
    return tp, args


class SGLang:
    """SGLang: --disaggregation-mode per role, a bootstrap server on prefill, HiCache for offload tiers."""

    kind = "sglang"
    images = {"nvidia": "lmsysorg/sglang:v0.5.9", "amd": "lmsysorg/sglang:v0.5.9-rocm700-mi30x"}
    router_image = "lmsysorg/sgl-model-gateway:v0.3.2"
    vendors = frozenset({"nvidia", "amd"})
    connectors = frozenset({"nixl", "mooncake"})
    weight_schemes: tuple[str, ...] = ("hf://", "pvc://")
    metrics = METRICS
    # the router dispatches to both pools at once: decode's TTFT includes the prefill
    decode_ttft_from_handoff = False
    dotted_flags = False
    owned_flags = {
        "--host": "--ho", "--port": "--po", "--served-model-name": "--se",
        "--tp-size": "--tp", "--tensor-parallel-size": "--te", "--model-path": "--model-p", "--model": "--model",
        "--disaggregation-mode": "--disaggregation-m", "--disaggregation-transfer-backend": "--disaggregation-t",
        "--disaggregation-bootstrap-port": "--disaggregation-b", "--revision": "--rev",
        "--enable-metrics": "--enable-metrics",
    }
    owned_with_object_storage: dict[str, str] = {}
    owned_with_cpu_tier = {"--enable-hierarchical-cache": "--enable-hie", "--hicache-size": "--hicache-si"}
    owned_with_disk_tier = {"--hicache-storage-backend": "--hicache-storage-backend"}
    multinode_flags = {
        "--nnodes": "--nn", "--node-rank": "--nod", "--dist-init-addr": "--dist-i", "--pp-size": "--pp-s",
        "--pipeline-parallel-size": "--pi", "--dp-size": "--dp", "--data-parallel-size": "--da",
        "--enable-dp-attention": "--enable-dp-attention", "--ep-size": "--ep-s",
        "--expert-parallel-size": "--expert-p", "--ep": "--ep",
    }

    def kv_port(self, connector: str, explicit: int | None) -> int:
        return explicit if explicit is not None else MOONCAKE_BOOTSTRAP_PORT

    def kv_listens(self, role: Role) -> bool:
        return role == "prefill"  # the decode side opens no listening KV port of its own

    def pool_annotations(self, role: Role, port_kv: int) -> dict[str, str]:
        return {BOOTSTRAP_PORT_ANNOTATION: str(port_kv)} if role == "prefill" else {}

    def pool_command(
        self, spec: InferenceServiceSpec, role: Role, model: str, model_args: list[str], port_kv: int,
        disk_gib: int | None = None,
    ) -> EngineCommand:
        pool: PoolSpec = getattr(spec, role)
        kv = spec.kv_transfer
        tiers = spec.kv_cache
        tp, parallel = parallel_args(pool)
        args = [
            "--model-path", model,
            "--served-model-name", spec.model.name,
            "--host", "0.0.0.0",
            "--port", str(spec.engine.port),
            "--tp-size", str(tp),
            *parallel,
            "--enable-metrics",
            "--disaggregation-mode", role,
            "--disaggregation-transfer-backend", kv.connector,
        ]
        if role == "prefill":
            args += ["--disaggregation-bootstrap-port", str(port_kv)]
        env: list[dict[str, Any]] = []
        if kv.connector == "nixl" and kv.backend is not None:
            # SGLang's NIXL agent takes its backend plugin (UCX by default) from this variable
            env += [{"name": "SGLANG_DISAGGREGATION_NIXL_BACKEND", "value": kv.backend.upper()}]
        if spec.model.revision:
            args += ["--revision", spec.model.revision]
        if tiers is not None and tiers.cpu_offload_gi_b is not None:
            # --hicache-size is whole decimal GB per TP rank (of the pool's tensor size)
            per_rank_gb = max(1, tiers.cpu_offload_gi_b * 2**30 // (10**9 * pool.parallelism.tensor))
            args += ["--enable-hierarchical-cache", "--hicache-size", str(per_rank_gb)]
            if tiers.disk is not None:
                args += ["--hicache-storage-backend", "file"]
                env += [{"name": "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", "value": KV_DISK_DIR}]
        return EngineCommand(["python3", "-m", "sglang.launch_server"], args, env)

    def group(self, pool: PoolSpec, command: list[str], args: list[str], env: list[dict[str, Any]]) -> Group:
        nodes = pool.worker_nodes
        shared = ["--nnodes", str(nodes), "--node-rank", WORKER_INDEX, "--dist-init-addr",
                  f"{LEADER_ADDRESS}:{DIST_PORT}"]
        return Group(nodes, [*args, *shared], command, [*args, *shared], env)

    def drain_args(self, drain_s: int) -> list[str]:
        return []

    def drain_gauges(self, role: Role) -> list[str]:
        return [METRICS.running_requests[0], METRICS.waiting_requests[0]]

    def router(self, connector: str, common: list[str], shutdown_grace_s: int) -> RouterCommand:
        # its own bound on finishing streams after SIGTERM (default 180 s), inside the pod's grace period
        return RouterCommand(["python3", "-m", "sglang_router.launch_router"],
                             ["--pd-disaggregation", *common, "--shutdown-grace-period-secs", str(shutdown_grace_s)],
                             "sglang-router", "/health")

    def layout_errors(self, field: str, pool: PoolSpec, nodes: int) -> list[tuple[str, str]]:
        par = pool.parallelism
        if par.data > 1 and par.pipeline > 1:
            return [(f"{field}.parallelism", "SGLang runs data-parallel attention inside one pipeline stage: "
                     "use parallelism.pipeline or parallelism.data across nodes, not both")]
        return []
