"""Workers over several nodes as LeaderWorkerSet groups, and placement by network topology. Pure.

A multi-node pool becomes one LeaderWorkerSet (sigs.k8s.io/lws): each replica is a group of `nodes` pods,
a leader (worker index 0, which serves HTTP) and workers. The LWS pod webhook gives every pod of a group
`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE` and `LWS_WORKER_INDEX`; the engine flags below take them through
Kubernetes' `$(VAR)` expansion:

- vLLM, pipeline stages across nodes: `--nnodes N --node-rank $(LWS_WORKER_INDEX) --master-addr
  $(LWS_LEADER_ADDRESS) --master-port P`, `--headless` on the workers (vLLM's multiprocessing multi-node
  executor, no Ray).
- vLLM, data-parallel ranks across nodes: `--data-parallel-size D --data-parallel-size-local L
  --data-parallel-address $(LWS_LEADER_ADDRESS) --data-parallel-rpc-port P`; workers add `--headless` and
  `--data-parallel-start-rank` = worker index x L, computed by a fixed shell line (Kubernetes expands
  variables but does no arithmetic; every other value stays an argument of its own).
- SGLang: `--nnodes N --node-rank $(LWS_WORKER_INDEX) --dist-init-addr $(LWS_LEADER_ADDRESS):P`, TP size
  over the group's accelerators, `--dp-size D --enable-dp-attention` for data-parallel attention,
  `--ep-size` for expert parallelism, `--pp-size` for pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec
from disagg.catalog.accelerators import Accelerator
from disagg.wellknown import ROLE_LABEL, SERVICE_LABEL

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
GROUP_KEY_LABEL = "leaderworkerset.sigs.k8s.io/group-key"
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
class Group:
    """What differs between a multi-node pool's leader and worker pods."""

    nodes: int
    leader_args: list[str]
    worker_command: list[str]
    worker_args: list[str]
    worker_env: list[dict[str, Any]]


def group(
    spec: InferenceServiceSpec, pool: PoolSpec, command: list[str], args: list[str], env: list[dict[str, Any]]
) -> Group:
    """The leader's and workers' commands of a multi-node pool, from the single-node ones."""
    par = pool.parallelism
    nodes = pool.worker_nodes
    if spec.engine.kind == "vllm":
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
    shared = ["--nnodes", str(nodes), "--node-rank", WORKER_INDEX, "--dist-init-addr", f"{LEADER_ADDRESS}:{DIST_PORT}"]
    return Group(nodes, [*args, *shared], command, [*args, *shared], env)


def vllm_parallel_args(pool: PoolSpec) -> list[str]:
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


def sglang_parallel_args(pool: PoolSpec) -> tuple[int, list[str]]:
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


def topology_key(spec: InferenceServiceSpec, accelerator: Accelerator | None) -> str | None:
    if spec.topology is not None and spec.topology.key is not None:
        return spec.topology.key
    if accelerator is not None and accelerator.topology_labels:
        return accelerator.topology_labels[0]
    return None


def placement(
    service: str, role: str, spec: InferenceServiceSpec, pool: PoolSpec, accelerator: Accelerator | None,
    user_affinity: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The pool's affinity: the user's, plus packing a group into one domain and pairing decode with prefill."""
    key = topology_key(spec, accelerator)
    topology = spec.topology
    terms: list[tuple[str, dict[str, Any]]] = []  # (Required|Preferred, podAffinityTerm)
    if pool.multi_node and key is not None:
        mode = topology.packing if topology is not None else "Required"
        terms.append((mode, {
            "labelSelector": {"matchLabels": {SERVICE_LABEL: service, ROLE_LABEL: role}},
            # the LWS webhook labels every pod of a group with its group key: the term then selects the
            # pod's own group (the leader, first of its group, satisfies it anywhere)
            "matchLabelKeys": [GROUP_KEY_LABEL],
            "topologyKey": key,
        }))
    if role == "decode" and topology is not None and topology.pairing is not None and key is not None:
        terms.append((topology.pairing, {
            "labelSelector": {"matchLabels": {SERVICE_LABEL: service, ROLE_LABEL: "prefill"}},
            "topologyKey": key,
        }))
    if not terms:
        return user_affinity
    affinity: dict[str, Any] = {k: v for k, v in (user_affinity or {}).items()}
    pod_affinity: dict[str, Any] = dict(affinity.get("podAffinity") or {})
    required = list(pod_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or [])
    preferred = list(pod_affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or [])
    for how, term in terms:
        if how == "Required":
            required.append(term)
        else:
            preferred.append({"weight": 100, "podAffinityTerm": term})
    if required:
        pod_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    if preferred:
        pod_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    affinity["podAffinity"] = pod_affinity
    return affinity
