"""Pools whose workers span nodes: validation naming the field, LeaderWorkerSet rendering wired as each
engine needs (flags checked against the engines' recorded flag lists), the router discovering leaders
only, topology placement, and the autoscaler counting whole groups against the accelerator budget."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import render_service
from disagg.scaling.policy import LoadPicture, PolicySettings, PolicyState, PoolSignals, decide
from support.paths import REPO

FLAGS = {name: set((REPO / "tests" / "data" / "engine_flags" / f"{name}.txt").read_text().split())
         for name in ("vllm", "sglang", "vllm-router")}
DEEPSEEK = yaml.safe_load((REPO / "tests" / "golden" / "input" / "multinode-vllm-deepseek.yaml").read_text())
SGLANG = yaml.safe_load((REPO / "tests" / "golden" / "input" / "multinode-sglang-pipeline-pairing.yaml").read_text())
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"


def changed(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def errors_of(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    return [(e.field, e.message) for e in caught.value.errors]


def docs_of(body: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render_service(body, DEFAULT_CATALOG)}


def container(template: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = template["spec"]["containers"]
    (engine,) = containers
    return engine


def flags(tokens: list[str]) -> set[str]:
    found = {t.split("=", 1)[0] for t in tokens if t.startswith("--")}
    for token in tokens:  # flags inside the workers' fixed shell line
        found |= set(re.findall(r"(--[a-z0-9-]+)", token)) if " " in token else set()
    return found


# (what is wrong, path, value, the field the message names, a word it contains)
BAD_LAYOUTS = [
    ("ranks that do not fill whole nodes", "spec.decode.parallelism", {"data": 12, "expert": True}, "spec.decode",
     "fill whole nodes"),
    ("nodes that disagree with the parallelism", "spec.decode.nodes", 3, "spec.decode", "accelerator.count x nodes"),
    # a budget for the 512 accelerators, else the schema's budget rule refuses the spec before the layout is read
    ("more stages than layers", "spec", {**DEEPSEEK["spec"], "acceleratorBudget": 600,
                                         "prefill": {**DEEPSEEK["spec"]["prefill"],
                                                     "parallelism": {"tensor": 8, "pipeline": 64}}},
     "spec.prefill.parallelism.pipeline", "layers"),
    ("experts the group does not divide", "spec.model.architecture.experts", 250, "spec.decode.parallelism.expert",
     "250"),
    ("heads the tensor size does not divide", "spec.model.architecture.attentionHeads", 100,
     "spec.prefill.parallelism.tensor", "attentionHeads"),
    ("vLLM pipeline and data across nodes", "spec.decode.parallelism", {"data": 8, "pipeline": 2}, "spec.decode"
     ".parallelism", "not both"),
    ("a wiring flag in extraArgs", "spec.decode.extraArgs", ["--data-parallel-size-local=4"],
     "spec.decode.extraArgs[0]", "set by the operator"),
    # spelled as vLLM's parser also reads it: '_' for '-', a unique prefix, a single-dash prefix
    ("a wiring flag with underscores", "spec.decode.extraArgs", ["--enforce-eager", "--data_parallel_size_local=4"],
     "spec.decode.extraArgs[1]", "set by the operator"),
    ("a wiring flag abbreviated", "spec.decode.extraArgs", ["--data-parallel-a=10.0.0.1"],
     "spec.decode.extraArgs[0]", "--data-parallel-address as vllm reads it"),
    ("a short wiring flag abbreviated", "spec.decode.extraArgs", ["-e"], "spec.decode.extraArgs[0]", "-ep as vllm"),
    ("a budget below one group", "spec.acceleratorBudget", 12, "spec.decode.autoscaling.minReplicas",
     "(16 > 12)"),
    ("a budget below the pools' floor", "spec.acceleratorBudget", 20, "spec.acceleratorBudget", "24 accelerators"),
]


@pytest.mark.parametrize(("what", "path", "value", "field", "word"), BAD_LAYOUTS, ids=[b[0] for b in BAD_LAYOUTS])
def test_a_layout_the_engine_cannot_run_names_the_field(what: str, path: str, value: Any, field: str,
                                                        word: str) -> None:
    found = errors_of(changed(DEEPSEEK, path, value))
    assert any(f == field and word in message for f, message in found), found


def test_expert_parallelism_needs_a_mixture_of_experts_model() -> None:
    body = changed(DEEPSEEK, "spec.model.architecture", {"parameters": 70.6e9, "layers": 80, "kvHeads": 8,
                                                         "headDim": 128})
    assert ("spec.decode.parallelism.expert", "expert parallelism needs a mixture-of-experts model (set "
            "model.architecture.experts or activeParameters)") in errors_of(body)


def test_a_multi_node_pool_without_a_topology_label_asks_for_one() -> None:
    body = changed(DEEPSEEK, "spec.decode.accelerator", {"resourceName": "example.com/gpu", "count": 8,
                                                         "nodeSelector": {"pool": "gpu"}})
    assert any(f == "spec.topology.key" for f, _ in errors_of(body))
    assert validate_service(changed(body, "spec.topology", {"key": "example.com/rack"}), DEFAULT_CATALOG)


def test_vllm_data_parallel_decode_is_a_leaderworkerset_wired_from_the_lws_environment() -> None:
    docs = docs_of(DEEPSEEK)
    assert ("Deployment", "deepseek-decode") not in docs and ("Deployment", "deepseek-prefill") in docs
    lws = docs[("LeaderWorkerSet", "deepseek-decode")]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert "replicas" not in lws["spec"]  # autoscaled: the autoscaler owns the group count
    assert lws["metadata"]["annotations"]["disagg.dev/initial-replicas"] == "1"
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = container(group["leaderTemplate"]), container(group["workerTemplate"])
    for engine in (leader, worker):
        args = engine["args"]
        assert args[args.index("--data-parallel-size") + 1] == "16"
        assert args[args.index("--data-parallel-size-local") + 1] == "8"
        assert args[args.index("--data-parallel-address") + 1] == "$(LWS_LEADER_ADDRESS)"
        assert "--enable-expert-parallel" in args and args[args.index("--tensor-parallel-size") + 1] == "1"
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert flags(engine["command"] + args) <= FLAGS["vllm"], flags(engine["command"] + args) - FLAGS["vllm"]
    assert "--headless" not in leader["args"] and "--headless" in worker["args"]
    assert leader["command"] == ["vllm", "serve", "deepseek-ai/DeepSeek-V3"]
    # the worker's first rank: its LWS index times the ranks per node, by a fixed shell line
    assert worker["command"][:2] == ["/bin/sh", "-c"] and worker["command"][3:] == leader["command"]
    assert "$((LWS_WORKER_INDEX * DISAGG_DP_SIZE_LOCAL))" in worker["command"][2]
    assert {"name": "DISAGG_DP_SIZE_LOCAL", "value": "8"} in worker["env"]
    # HTTP, probes and metrics on the leader only
    assert "readinessProbe" in leader and "readinessProbe" not in worker
    assert "prometheus.io/scrape" not in (group["workerTemplate"]["metadata"].get("annotations") or {})


def test_sglang_pipeline_prefill_spans_nodes_with_its_own_flags() -> None:
    docs = docs_of(SGLANG)
    group = docs[("LeaderWorkerSet", "big-dense-prefill")]["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and docs[("LeaderWorkerSet", "big-dense-prefill")]["spec"]["replicas"] == 1
    for template in (group["leaderTemplate"], group["workerTemplate"]):
        engine = container(template)
        args = engine["args"]
        assert args[args.index("--nnodes") + 1] == "2"
        assert args[args.index("--node-rank") + 1] == "$(LWS_WORKER_INDEX)"
        assert args[args.index("--dist-init-addr") + 1] == "$(LWS_LEADER_ADDRESS):29500"
        assert args[args.index("--pp-size") + 1] == "2" and args[args.index("--tp-size") + 1] == "8"
        assert flags(engine["command"] + args) <= FLAGS["sglang"]
    wide = changed(SGLANG, "spec.prefill.parallelism", {"tensor": 1, "data": 16, "expert": True})
    wide = changed(wide, "spec.model.architecture.experts", 256)
    args = container(docs_of(wide)[("LeaderWorkerSet", "big-dense-prefill")]["spec"]["leaderWorkerTemplate"]
                     ["leaderTemplate"])["args"]
    assert args[args.index("--tp-size") + 1] == "16" and args[args.index("--dp-size") + 1] == "16"
    assert "--enable-dp-attention" in args and args[args.index("--ep-size") + 1] == "16"


def test_the_router_discovers_leaders_of_multi_node_pools_only() -> None:
    router = docs_of(DEEPSEEK)[("Deployment", "deepseek-router")]
    args = container(router["spec"]["template"])["args"]
    decode = args[args.index("--decode-selector") + 1: args.index("--service-discovery-port")]
    prefill = args[args.index("--prefill-selector") + 1: args.index("--decode-selector")]
    assert f"{WORKER_INDEX}=0" in decode and f"{WORKER_INDEX}=0" not in prefill
    assert flags(args) <= FLAGS["vllm-router"]


def test_kv_services_disruption_budgets_and_the_network_policy_cover_whole_groups() -> None:
    docs = docs_of(DEEPSEEK)
    selector = {"disagg.dev/service": "deepseek", "disagg.dev/role": "decode"}
    pod_labels = docs[("LeaderWorkerSet", "deepseek-decode")]["spec"]["leaderWorkerTemplate"]["workerTemplate"][
        "metadata"]["labels"]
    assert docs[("Service", "deepseek--decode-kv")]["spec"]["selector"] == selector
    assert docs[("PodDisruptionBudget", "deepseek-decode")]["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= pod_labels.items()  # workers are selected too, not only leaders
    policy = docs[("NetworkPolicy", "deepseek-engines")]["spec"]["podSelector"]
    assert policy["matchLabels"]["disagg.dev/service"] == pod_labels["disagg.dev/service"]


def test_a_group_is_packed_into_one_domain_and_decode_can_be_paired_with_prefill() -> None:
    group = docs_of(DEEPSEEK)[("LeaderWorkerSet", "deepseek-decode")]["spec"]["leaderWorkerTemplate"]
    for template in (group["leaderTemplate"], group["workerTemplate"]):
        (term,) = template["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "topology.k8s.aws/network-node-layer-3"  # the catalogue's first label
        assert term["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
    decode = docs_of(SGLANG)[("Deployment", "big-dense-decode")]["spec"]["template"]["spec"]
    (pairing,) = decode["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert pairing["labelSelector"]["matchLabels"] == {"disagg.dev/service": "big-dense", "disagg.dev/role": "prefill"}
    preferred = changed(SGLANG, "spec.topology", {"packing": "Preferred", "pairing": "Preferred", "key": "rack"})
    zone = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {"matchExpressions": [
        {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a"]}]}}]}
    preferred = changed(preferred, "spec.decode.affinity", {"nodeAffinity": zone})
    decode = docs_of(preferred)[("Deployment", "big-dense-decode")]["spec"]["template"]["spec"]["affinity"]
    assert decode["nodeAffinity"] == zone  # the user's own affinity is kept
    (term,) = decode["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["weight"] == 100 and term["podAffinityTerm"]["topologyKey"] == "rack"
    prefill = docs_of(preferred)[("LeaderWorkerSet", "big-dense-prefill")]["spec"]["leaderWorkerTemplate"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in prefill["leaderTemplate"]["spec"]["affinity"][
        "podAffinity"]


def test_the_autoscaler_counts_a_group_s_accelerators_against_the_budget() -> None:
    # budget 40: prefill 8 fixed + 2 groups of 16, though maxReplicas would allow 4
    service = validate_service(changed(DEEPSEEK, "spec.decode.autoscaling.maxReplicas", 4), DEFAULT_CATALOG)
    now = 100.0
    decode = PoolSignals(ready_replicas=1, sampled_at=now - 15, generation_tokens_per_s=400_000.0,
                         request_rate=2000.0, running_requests=20_000.0, mean_prompt_tokens=2000,
                         mean_output_tokens=200)
    decisions, _ = decide(LoadPicture(None, decode), service, {"prefill": 1, "decode": 1}, PolicyState(), now,
                          PolicySettings(), DEFAULT_CATALOG)
    assert decisions["decode"].desired == 2
    assert "budget 40" in decisions["decode"].reason


def test_the_simulated_engines_serve_a_group_s_leader_only() -> None:
    from kubernetes import client as kclient

    from disagg_lab.kube import pod_observation

    def pod(index: str) -> kclient.V1Pod:
        labels = {"disagg.dev/role": "decode", "disagg.dev/service": "svc", WORKER_INDEX: index}
        return kclient.V1Pod(metadata=kclient.V1ObjectMeta(uid=index, namespace="ns", name=f"p{index}", labels=labels),
                             status=kclient.V1PodStatus(phase="Running", pod_ip=f"127.100.0.{int(index) + 1}"))

    assert pod_observation(pod("0")) is not None
    assert pod_observation(pod("1")) is None
