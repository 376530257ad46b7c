"""`disagg validate` agrees with the real API server, both ways (issue 18, item 6).

The same manifests, valid and invalid, go through `disagg validate` (one run of the CLI over one
file) and through the API server: a server-side dry-run create of the InferenceService (strict field
validation, the YAML sent as written, as kubectl would), and, when the API server accepts it, a
server-side dry-run apply of every child the operator would apply for the object as stored (defaults
applied, nulls pruned). A manifest is valid to the API server when all of those are accepted.
Every manifest must get the same verdict from both. The accelerator catalogue is the operator's
alone: manifests invalid only by it are a separate, small list, which the API server must accept and
`disagg validate` refuse, naming only catalogue fields.

Lean: one namespace, dry runs only (nothing is stored), eight requests at a time.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient

from disagg.api.validate import InvalidSpec, catalog_errors, parse_spec
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.kube.client import ApiError, Kube, kind_of
from disagg.render import Owner, render_children
from disagg.yamlio import yaml_flow
from support.operators import Kubectl, bin_dir, disagg_cli, install_crd

pytestmark = pytest.mark.e2e

ISVC_PATH = "/apis/disagg.dev/v1alpha1/namespaces/{namespace}/inferenceservices"
DRY_RUN = [("dryRun", "All"), ("fieldValidation", "Strict")]

BASE: dict[str, Any] = {
    "model": {"name": "m", "uri": "hf://org/m"},
    "prefill": {"accelerator": {"type": "nvidia-h100", "count": 2}, "parallelism": {"tensor": 2}},
    "decode": {"accelerator": {"type": "nvidia-h200", "count": 1}},
}
ARCHITECTURE = {"parameters": 70.6e9, "layers": 80, "kvHeads": 8, "headDim": 128}


@dataclass
class Case:
    label: str
    text: str
    """The whole manifest, as a user writes it."""
    name: str | None
    """metadata.name, when the manifest has a usable one (else it gets a file of its own)."""
    validate_errors: list[str] = field(default_factory=list)
    validate_ok: bool | None = None
    api_refusal: str | None = None
    """What the API server refused (the object or a child), or None when it took everything."""


def manifest(name: str, spec: Any, metadata: dict[str, Any] | None = None, **top: Any) -> str:
    body = {"apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, **(metadata or {})}, "spec": spec, **top}
    return yaml.safe_dump(body, sort_keys=False)


def changed(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        node = spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return change


def both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(spec: dict[str, Any]) -> None:
        for one in changes:
            one(spec)
    return change


SGLANG = changed("engine.kind", "sglang")
CUSTOM = both(changed("engine.kind", "custom"), changed("engine.image", "registry.example.com/mk:1"),
              changed("engine.custom", {"command": ["/opt/mk/serve"], "metrics": {"runningRequests": "mk_running"},
                                        "args": ["--port", "{{port}}", "--role", "{{role}}"]}))
CUSTOM_METRICS = {"runningRequests": "mk_running", "waitingRequests": "mk_waiting", "promptTokensTotal": "mk_prompt",
                  "ttftHistogram": "mk_ttft"}
WITH_ARCH = changed("model.architecture", ARCHITECTURE)
CPU_TIER = changed("kvCache", {"cpuOffloadGiB": 64})

# (label, change of BASE): valid and invalid specs, each a separate InferenceService
SPECS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("base", lambda spec: None),
    ("with architecture", WITH_ARCH),
    ("sglang", SGLANG),
    ("custom", CUSTOM),
    ("custom without image", both(CUSTOM, lambda spec: spec["engine"].pop("image"))),
    ("custom without custom", both(CUSTOM, lambda spec: spec["engine"].pop("custom"))),
    ("custom set with vllm", both(CUSTOM, changed("engine.kind", "vllm"))),
    ("custom unknown template", both(CUSTOM, changed("engine.custom.args", ["--rank", "{{nodeRank}}"]))),
    ("custom autoscaled without metrics", both(CUSTOM, changed("prefill.autoscaling", {"maxReplicas": 4}))),
    ("custom vllm protocol with mooncake", both(CUSTOM, changed("kvTransfer.connector", "mooncake"))),
    ("custom sglang protocol on the bootstrap port", both(CUSTOM, changed("engine.custom.protocol", "sglang"),
                                                         changed("engine.port", 8998))),
    ("custom sglang protocol with mooncake", both(CUSTOM, changed("engine.custom.protocol", "sglang"),
                                                 changed("kvTransfer.connector", "mooncake"))),
    ("custom autoscaled with metrics", both(CUSTOM, changed("prefill.autoscaling", {"maxReplicas": 4}),
                                            changed("engine.custom.metrics", CUSTOM_METRICS))),
    # types as the CRD reads them
    ("replicas string", changed("prefill.replicas", "3")),
    ("replicas boolean", changed("prefill.replicas", True)),
    ("replicas fraction", changed("prefill.replicas", 2.5)),
    ("replicas negative", changed("prefill.replicas", -1)),
    ("replicas above max", changed("decode.replicas", 1001)),
    ("count zero", changed("decode.accelerator.count", 0)),
    ("port string", changed("engine.port", "8000")),
    ("port low", changed("router.port", 80)),
    ("port high", changed("kvTransfer.port", 70000)),
    ("args not a list", changed("engine.extraArgs", "--foo")),
    ("args null item", changed("engine.extraArgs", [None])),
    ("too many args", changed("engine.extraArgs", ["--enforce-eager"] * 65)),
    ("unknown field", changed("prefill.gpus", 4)),
    ("unknown engine", changed("engine.kind", "trtllm")),
    ("unknown policy", changed("router.policy", "fastest")),
    ("percentile high", changed("slo.percentile", 100)),
    ("percentile int", changed("slo.percentile", 95)),
    ("ttft float", changed("slo.ttftMs", 500.5)),
    ("parameters string", both(WITH_ARCH, changed("model.architecture.parameters", "7e9"))),
    ("kvLoraRank huge", both(WITH_ARCH, changed("model.architecture.kvLoraRank", 2**63))),
    ("toleration seconds int64 overflow", changed("prefill.tolerations", [
        {"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2**63}])),
    ("toleration seconds int64 max", changed("prefill.tolerations", [
        {"key": "a", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2**63 - 1}])),
    ("null fields are pruned", both(changed("model.revision", None), changed("decode.replicas", None),
                                    changed("prefill.nodeSelector", {"a": None}))),
    ("null in a list", changed("decode.tolerations", [None])),
    # ports the children would share
    ("engine port is the NIXL side channel", changed("engine.port", 5600)),
    ("engine port is SGLang's bootstrap port", both(SGLANG, changed("engine.port", 8998))),
    ("engine port 8998 with vLLM NIXL", changed("engine.port", 8998)),
    ("engine port 5600 with SGLang", both(SGLANG, changed("engine.port", 5600))),
    ("engine port is kvTransfer.port", both(changed("engine.port", 9000), changed("kvTransfer.port", 9000))),
    ("router port is the metrics port", changed("router.port", 29000)),
    ("router port is the engine port", changed("router.port", 8000)),
    # environment
    ("duplicate env", changed("engine.env", [{"name": "X", "value": "1"}, {"name": "X", "value": "2"}])),
    ("env the operator sets (HF_HOME)", changed("engine.env", [{"name": "HF_HOME", "value": "/x"}])),
    ("env the operator sets (POD_IP)", changed("engine.env", [{"name": "POD_IP", "value": "x"}])),
    ("env the operator may set (LMCACHE_CHUNK_SIZE)", changed("engine.env", [{"name": "LMCACHE_CHUNK_SIZE",
                                                                             "value": "1"}])),
    ("env bad name", changed("engine.env", [{"name": "1BAD", "value": "x"}])),
    ("env dotted name", changed("engine.env", [{"name": "a.b-c", "value": "x"}])),
    ("env number value", changed("engine.env", [{"name": "A", "value": 1}])),
    ("env without value", changed("engine.env", [{"name": "A"}])),
    # images
    ("image with a space", changed("engine.image", "registry.example/engine: 1")),
    ("image with spaces around", changed("engine.image", " registry.example/engine:1 ")),
    ("image with a tab", changed("router.image", "a\tb")),
    ("image empty", changed("prefill.image", "")),
    ("image with digest", changed("decode.image", "registry.example/e@sha256:" + "a" * 64)),
    # names the engine would read as flags
    ("model name like a flag", changed("model.name", "--trust-remote-code")),
    ("model name dash", changed("model.name", "-")),
    ("model name with a dash inside", changed("model.name", "org/model-x")),
    ("hf id like a flag", changed("model.uri", "hf://--trust-remote-code")),
    ("revision like a flag", changed("model.revision", "-x")),
    ("revision a number", changed("model.revision", 123)),
    ("uri ftp", changed("model.uri", "ftp://x/y")),
    ("pvc bad claim", changed("model.uri", "pvc://Bad_Claim/x")),
    ("pvc claim", changed("model.uri", "pvc://weights/llama")),
    ("s3 with vllm", changed("model.uri", "s3://bucket/llama")),
    ("s3 with sglang", both(SGLANG, changed("model.uri", "s3://bucket/llama"))),
    # flags the operator owns, in the engines' spellings
    *[(f"vllm arg {arg}", changed("engine.extraArgs", [arg])) for arg in (
        "--tensor_parallel_size=8", "--kv-transfer-config.kv_role=kv_both", "--kv_transfer_config.kv_connector",
        "--served=x", "-t", "-tp=2", "--te=2", "--por=9000", "--ho=0.0.0.0", "--model=x", "--revision=main",
        "--port", "-tp", "-t.x=2", "-tp.x=1",
        # not owned: valid
        "-t=2", "--po=1", "--max-model-len=4096", "--enable-prefix-caching", "--max_model_len", "-O3",
        "--disaggregation-mode=decode", "--load-format=safetensors", "-x")],
    ("vllm --load-format with s3", both(changed("model.uri", "s3://b/m"), changed("decode.extraArgs",
                                                                                ["--load_format=auto"]))),
    *[(f"sglang arg {arg}", both(SGLANG, changed("prefill.extraArgs", [arg]))) for arg in (
        "--disaggregation-mod=decode", "--disaggregation-m", "--tp=8", "--tp-size", "--model-p=x", "--enable-metrics",
        "--se=x", "--po=1", "--host=x", "--tensor-parallel-size=2",
        # not owned: valid
        "--disaggregation_mode=decode", "--tensor_parallel_size=2", "--kv-transfer-config.kv_role=x",
        "--enable-metrics-for-all-schedulers", "--disaggregation-decode-polling-interval=5", "--hicache-size=4",
        "-tp=2", "--mem-fraction-static=0.8")],
    ("sglang --hicache-size with a CPU tier", both(SGLANG, CPU_TIER, changed("engine.extraArgs", ["--hicache-si=4"]))),
    ("sglang --hicache-storage-backend with a disk tier", both(SGLANG, changed(
        "kvCache", {"cpuOffloadGiB": 64, "disk": {"size": "100Gi"}}), changed("decode.extraArgs",
                                                                          ["--hicache-storage-backend=file"]))),
    # KV transfer
    ("vllm mooncake", both(changed("kvTransfer.connector", "mooncake"),
                           changed("prefill.parallelism.tensor", 1))),
    ("sglang mooncake unequal TP", both(SGLANG, changed("kvTransfer.connector", "mooncake"))),
    ("sglang mooncake", both(SGLANG, changed("kvTransfer.connector", "mooncake"),
                             changed("prefill.parallelism.tensor", 1))),
    ("backend with mooncake", both(SGLANG, changed("kvTransfer", {"connector": "mooncake", "backend": "ucx"}))),
    ("sglang libfabric", both(SGLANG, changed("kvTransfer.backend", "libfabric"))),
    ("vllm ucx", changed("kvTransfer.backend", "ucx")),
    ("rdma", changed("kvTransfer.rdma", {"resource": "rdma/ib", "count": 1})),
    ("rdma not an extended resource", changed("kvTransfer.rdma", {"resource": "requests.foo/bar"})),
    # parallelism and budgets
    ("tensor not a power of two", both(changed("prefill.accelerator.count", 4), changed("prefill.parallelism.tensor",
                                                                                        3))),
    ("tensor above count", changed("prefill.parallelism.tensor", 4)),
    ("tensor and kv heads", both(WITH_ARCH, changed("model.architecture.kvHeads", 6))),
    ("tensor a multiple of kv heads", both(WITH_ARCH, changed("model.architecture.kvHeads", 1))),
    ("MLA ignores kv heads", both(WITH_ARCH, changed("model.architecture.kvHeads", 6),
                                  changed("model.architecture.kvLoraRank", 512))),
    ("budget below the floor", both(changed("acceleratorBudget", 3),
                                    changed("prefill.autoscaling", {"minReplicas": 2, "maxReplicas": 4}))),
    ("budget below the fixed pools", changed("acceleratorBudget", 2)),
    ("budget enough", both(changed("acceleratorBudget", 6),
                           changed("decode.autoscaling", {"minReplicas": 1, "maxReplicas": 4}))),
    ("min above max", changed("prefill.autoscaling", {"minReplicas": 5, "maxReplicas": 2})),
    # KV offload
    ("kvCache empty", changed("kvCache", {})),
    ("disk without cpu", changed("kvCache", {"disk": {"size": "1Ti"}})),
    *[(f"disk {size}", changed("kvCache", {"cpuOffloadGiB": 4, "disk": {"size": size}}))
      for size in ("1e400", "1e19", "10Mi", "1Gi", "1.5Gi", "500Gi", "8Ei", "1e4294967296", "1e9223372036854775808",
                   "lots")],
    ("disk storage class", changed("kvCache", {"cpuOffloadGiB": 4, "disk": {"size": "1Ti",
                                                                              "storageClassName": "local-nvme"}})),
    ("disk bad storage class", changed("kvCache", {"cpuOffloadGiB": 4, "disk": {"size": "1Ti",
                                                                                  "storageClassName": "A B"}})),
    # resources
    *[(f"cpu {q}", changed("prefill.resources", {"requests": {"cpu": q}}))
      for q in ("1e400", "1e30", "9223372036854775807m", "9223372036854775808m", "1 core", "0.5", "100m", "1e3")],
    ("memory 8Ei", changed("decode.resources", {"requests": {"memory": "8Ei"}})),
    ("memory 8Pi", changed("decode.resources", {"limits": {"memory": "8Pi"}})),
    ("requests above limits", changed("prefill.resources", {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}})),
    ("requests equal limits", changed("prefill.resources", {"requests": {"cpu": "1"}, "limits": {"cpu": "1000m"}})),
    ("limits only", changed("prefill.resources", {"limits": {"memory": "1Gi"}})),
    ("bad resource name", changed("decode.resources", {"requests": {"foo": "1"}})),
    ("not a resource name", changed("decode.resources", {"requests": {"not a resource!": "1"}})),
    ("extended fraction", changed("decode.resources", {"requests": {"example.com/foo": "0.5"},
                                                       "limits": {"example.com/foo": "0.5"}})),
    ("extended request without limit", changed("decode.resources", {"requests": {"example.com/foo": "1"}})),
    ("extended request above limit", changed("decode.resources", {"requests": {"example.com/foo": "2"},
                                                                  "limits": {"example.com/foo": "3"}})),
    ("extended equal", changed("decode.resources", {"requests": {"example.com/foo": "2"},
                                                    "limits": {"example.com/foo": "2"}})),
    ("native with a domain", changed("decode.resources", {"requests": {"kubernetes.io/foo": "1"}})),
    ("hugepages", changed("decode.resources", {"requests": {"hugepages-2Mi": "4Mi", "memory": "1Gi"},
                                               "limits": {"hugepages-2Mi": "4Mi", "memory": "1Gi"}})),
    ("hugepages alone", changed("decode.resources", {"requests": {"hugepages-2Mi": "4Mi"},
                                                     "limits": {"hugepages-2Mi": "4Mi"}})),
    ("hugepages not a multiple", changed("decode.resources", {"requests": {"hugepages-2Mi": "3Mi", "memory": "1Gi"},
                                                              "limits": {"hugepages-2Mi": "3Mi", "memory": "1Gi"}})),
    ("too many resources", changed("decode.resources", {"requests": {f"example.com/r{i}": "1" for i in range(17)}})),
    # scheduling
    ("node selector bad key", changed("decode.nodeSelector", {"bad key!": "x"})),
    ("node selector bad value", changed("decode.nodeSelector", {"a": "has space"})),
    ("node selector long value", changed("decode.nodeSelector", {"a": "x" * 64})),
    ("node selector prefixed key", changed("decode.nodeSelector", {"example.com/zone": "a", "b": ""})),
    ("node selector long name", changed("decode.nodeSelector", {"example.com/" + "y" * 64: "a"})),
    ("node selector number value", changed("decode.nodeSelector", {"a": 1})),
    ("resourceName with a bad node selector", changed("prefill.accelerator", {
        "resourceName": "example.com/gpu", "nodeSelector": {"a b": "c"}})),
    ("resourceName", changed("prefill.accelerator", {"resourceName": "example.com/gpu", "count": 2,
                                                     "nodeSelector": {"example.com/gpu": "true"}})),
    ("resourceName native", changed("prefill.accelerator", {"resourceName": "kubernetes.io/gpu", "count": 2,
                                                            "nodeSelector": {"a": "b"}})),
    ("toleration bad key", changed("prefill.tolerations", [{"key": "bad key!", "operator": "Exists"}])),
    ("toleration Exists with a value", changed("prefill.tolerations", [{"key": "a", "operator": "Exists",
                                                                        "value": "v"}])),
    ("toleration seconds without NoExecute", changed("prefill.tolerations", [
        {"key": "a", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5}])),
    ("toleration without key", changed("prefill.tolerations", [{"operator": "Equal", "value": "v"}])),
    ("toleration without key or operator", changed("prefill.tolerations", [{"value": "v"}])),
    ("toleration all", changed("prefill.tolerations", [{"operator": "Exists"}])),
    ("toleration bad value", changed("prefill.tolerations", [{"key": "a", "value": "b c"}])),
    ("toleration NoExecute", changed("prefill.tolerations", [{"key": "a", "operator": "Equal", "value": "b",
                                                              "effect": "NoExecute", "tolerationSeconds": 60}])),
    ("affinity unknown field", changed("decode.affinity", {"foo": 1})),
    ("affinity wrong type", changed("decode.affinity", {"nodeAffinity": 1})),
    ("affinity null", changed("decode.affinity", {"nodeAffinity": None})),
    ("affinity node", changed("decode.affinity", {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}})),
    ("affinity no terms", changed("decode.affinity", {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}})),
    ("affinity In without values", changed("decode.affinity", {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In"}]}]}}})),
    ("affinity Exists with values", changed("decode.affinity", {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 5, "preference": {
            "matchExpressions": [{"key": "zone", "operator": "Exists", "values": ["a"]}]}}]}})),
    ("affinity weight 0", changed("decode.affinity", {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": {}}]}})),
    ("affinity pods", changed("decode.affinity", {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"disagg.dev/role": "decode"}},
            "topologyKey": "kubernetes.io/hostname"}}]}})),
    ("affinity pods without topology key", changed("decode.affinity", {"podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}})),
    ("affinity bad operator", changed("decode.affinity", {"podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone", "labelSelector": {
            "matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}}]}})),
    ("affinity match fields", changed("decode.affinity", {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1", "node-2"]}]}]}}})),
]
# (label, change, the catalogue fields the errors must be on): invalid only by the catalogue
CATALOGUE_ONLY: list[tuple[str, Callable[[dict[str, Any]], None], set[str]]] = [
    ("unknown accelerator", changed("decode.accelerator.type", "nvidia-h999"), {"spec.decode.accelerator.type"}),
    ("count above a node", changed("decode.accelerator.count", 16), {"spec.decode.accelerator.count"}),
    ("sglang on trainium", both(SGLANG, changed("prefill.accelerator.type", "aws-trainium2")),
     {"spec.prefill.accelerator.type"}),
    ("mooncake across vendors", both(SGLANG, changed("kvTransfer.connector", "mooncake"), changed(
        "prefill", {"accelerator": {"type": "amd-mi300x"}})), {"spec.kvTransfer.connector"}),
    ("the accelerator in resources", changed("prefill.resources", {"requests": {"nvidia.com/gpu": "8"}}),
     {"spec.prefill.resources.requests.nvidia.com/gpu"}),
]

ISVC_HEAD = "apiVersion: disagg.dev/v1alpha1\nkind: InferenceService\n"
# whole manifests, as written: YAML and the document around the spec
SPEC_YAML = "  model: {name: m, uri: hf://org/m}\n  prefill: {accelerator: {type: nvidia-h100}}\n" \
            "  decode: {accelerator: {type: nvidia-h200}}\n"
RAW: list[tuple[str, str, str]] = [
    ("yaml replicas 3.0", "raw-float-int", "  prefill: {replicas: 3.0, accelerator: {type: nvidia-h100}}\n"),
    ("yaml replicas 1e2", "raw-exponent-int", "  prefill: {replicas: 1e2, accelerator: {type: nvidia-h100}}\n"),
    ("yaml replicas 0x10", "raw-hex-int", "  prefill: {replicas: 0x10, accelerator: {type: nvidia-h100}}\n"),
    ("yaml replicas 08", "raw-08", "  prefill: {replicas: 08, accelerator: {type: nvidia-h100}}\n"),
    ("yaml replicas 1_0", "raw-underscore", "  prefill: {replicas: 1_0, accelerator: {type: nvidia-h100}}\n"),
    ("yaml replicas yes", "raw-yes", "  prefill: {replicas: yes, accelerator: {type: nvidia-h100}}\n"),
    ("yaml replicas !!str", "raw-str-tag", "  prefill: {replicas: !!str 3, accelerator: {type: nvidia-h100}}\n"),
    ("yaml percentile 1e400", "raw-1e400", "  slo: {percentile: 1e400}\n"),
    ("yaml percentile .inf", "raw-inf", "  slo: {percentile: .inf}\n"),
    ("yaml parameters 70.6e9", "raw-yaml12-float",
     "  model: {name: m, uri: hf://org/m, architecture: {parameters: 70.6e9, layers: 80, kvHeads: 8, headDim: 128}}\n"),
    ("yaml model name a date", "raw-date", "  model: {name: 2024-01-01, uri: hf://org/m}\n"),
    ("yaml model name no", "raw-no", "  model: {name: no, uri: hf://org/m}\n"),
    ("yaml env value on", "raw-on", "  engine: {env: [{name: A, value: on}]}\n"),
    ("yaml nodeSelector int key", "raw-int-key",
     "  decode: {accelerator: {type: nvidia-h200}, nodeSelector: {1: a}}\n"),
    ("yaml anchors and merge", "raw-anchors",
     "  prefill: &p {accelerator: {type: nvidia-h100}}\n  decode: {<<: *p, replicas: 2}\n"),
    ("yaml duplicate key", "raw-duplicate", "  decode: {accelerator: {type: nvidia-h200}}\n"),
    ("yaml duplicate key by merge", "raw-merge-duplicate",
     "  prefill: &p {accelerator: {type: nvidia-h100}}\n  decode: {<<: *p, accelerator: {type: nvidia-h200}}\n"),
]


def raw_manifest(name: str, extra: str) -> str:
    """The spec of SPEC_YAML with `extra` lines replacing its own of the same key (or added)."""
    lines = {line.split(":", 1)[0]: line for line in SPEC_YAML.splitlines(keepends=True)}
    for line in extra.splitlines(keepends=True):
        key = line.split(":", 1)[0]
        if key in lines and name != "raw-duplicate":
            lines[key] = line
        else:
            lines[key + f"#{len(lines)}"] = line
    return f"{ISVC_HEAD}metadata: {{name: {name}}}\nspec:\n" + "".join(lines.values())


DOCUMENT_CASES: list[tuple[str, str]] = [
    ("another version", "apiVersion: disagg.dev/v1beta1\nkind: InferenceService\nmetadata: {name: doc-v1beta1}\n"
                        "spec:\n" + SPEC_YAML),
    ("another kind", "apiVersion: disagg.dev/v1alpha1\nkind: InferenceServce\nmetadata: {name: doc-kind}\n"
                     "spec:\n" + SPEC_YAML),
    ("unknown top field", ISVC_HEAD + "metadata: {name: doc-top}\nreplicas: 2\nspec:\n" + SPEC_YAML),
    ("metadata a list", ISVC_HEAD + "metadata: [doc-list]\nspec:\n" + SPEC_YAML),
    ("no name", ISVC_HEAD + "metadata: {labels: {a: b}}\nspec:\n" + SPEC_YAML),
    ("generateName", ISVC_HEAD + "metadata: {generateName: doc-gen-}\nspec:\n" + SPEC_YAML),
    ("bad label", ISVC_HEAD + "metadata: {name: doc-label, labels: {'a b': c}}\nspec:\n" + SPEC_YAML),
    ("label number", ISVC_HEAD + "metadata: {name: doc-label-int, labels: {a: 1}}\nspec:\n" + SPEC_YAML),
    ("bad annotation", ISVC_HEAD + "metadata: {name: doc-annotation, annotations: {'a b': c}}\nspec:\n" + SPEC_YAML),
    ("bad finalizer", ISVC_HEAD + "metadata: {name: doc-finalizer, finalizers: ['a b']}\nspec:\n" + SPEC_YAML),
    ("unknown metadata field", ISVC_HEAD + "metadata: {name: doc-meta, foo: bar}\nspec:\n" + SPEC_YAML),
    ("bad creation time", ISVC_HEAD + "metadata: {name: doc-time, creationTimestamp: soon}\nspec:\n" + SPEC_YAML),
    ("unknown status field", ISVC_HEAD + "metadata: {name: doc-status}\nspec:\n" + SPEC_YAML + "status: {foo: 1}\n"),
    ("status of another type", ISVC_HEAD + "metadata: {name: doc-status-type}\nspec:\n" + SPEC_YAML
     + "status: {observedGeneration: x}\n"),
    ("no spec", ISVC_HEAD + "metadata: {name: doc-no-spec}\n"),
    ("spec a list", ISVC_HEAD + "metadata: {name: doc-spec-list}\nspec: []\n"),
    ("name dotted", ISVC_HEAD + "metadata: {name: doc.dotted}\nspec:\n" + SPEC_YAML),
    ("name uppercase", ISVC_HEAD + "metadata: {name: Doc-Upper}\nspec:\n" + SPEC_YAML),
    ("name too long for the children", ISVC_HEAD + "metadata: {name: " + "d" * 53 + "}\nspec:\n" + SPEC_YAML),
    ("name longest", ISVC_HEAD + "metadata: {name: " + "e" * 52 + "}\nspec:\n" + SPEC_YAML),
    ("alias bomb", ISVC_HEAD + "metadata: {name: doc-bomb, annotations: {x0: &a '1'}}\nspec:\n" + SPEC_YAML
     + "  engine: {extraArgs: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]}\n"
     + "".join(f"  x{level}: &l{level} [{', '.join([f'*l{level - 1}' if level > 1 else '*b'] * 9)}]\n"
               for level in range(1, 9))),
    ("a few aliases", ISVC_HEAD + "metadata: {name: doc-aliases, labels: {team: &t infra}}\nspec:\n"
     + "  model: {name: *t, uri: hf://org/m}\n  prefill: &p {accelerator: {type: nvidia-h100}}\n  decode: *p\n"),
]


def build_cases() -> tuple[list[Case], list[tuple[Case, set[str]]]]:
    cases: list[Case] = []
    for index, (label, change) in enumerate(SPECS):
        spec = copy.deepcopy(BASE)
        change(spec)
        name = f"spec-{index:03d}"
        cases.append(Case(label, manifest(name, spec), name))
    for label, name, extra in RAW:
        cases.append(Case(label, raw_manifest(name, extra), name))
    for label, text in DOCUMENT_CASES:
        cases.append(Case(label, text, None))
    catalogue = []
    for index, (label, change, fields) in enumerate(CATALOGUE_ONLY):
        spec = copy.deepcopy(BASE)
        change(spec)
        name = f"catalogue-{index:02d}"
        catalogue.append((Case(label, manifest(name, spec), name), fields))
    return cases, catalogue


def run_validate(cases: list[Case], workdir: Path) -> None:
    """`disagg validate` over one file of the named manifests (and a file each for the others)."""
    named = [c for c in cases if c.name is not None]
    path = workdir / "manifests.yaml"
    path.write_text("---\n".join(c.text for c in named))
    proc = disagg_cli("validate", "-f", str(path), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    valid = set(re.findall(r"^InferenceService (\S+): valid$", proc.stdout, re.MULTILINE))
    for case in named:
        case.validate_ok = case.name in valid
        case.validate_errors = [line for line in proc.stderr.splitlines() if f"InferenceService {case.name}:" in line]
        if not case.validate_ok and not case.validate_errors:  # refused as a document: errors carry a line
            case.validate_errors = [line for line in proc.stderr.splitlines() if ": line " in line]
    for index, case in enumerate(c for c in cases if c.name is None):
        own = workdir / f"document-{index}.yaml"
        own.write_text(case.text)
        proc = disagg_cli("validate", "-f", str(own), timeout=60)
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        case.validate_ok = proc.returncode == 0
        case.validate_errors = proc.stderr.splitlines()


def api_verdict(kube: Kube, namespace: str, case: Case) -> str | None:
    """What the API server refuses of the manifest and of the children the operator would apply for it
    (None: it accepts all)."""
    try:
        stored = kube.request("POST", ISVC_PATH.format(namespace=namespace), query=DRY_RUN,
                              body=case.text.encode(), content_type="application/yaml")
    except ApiError as error:
        return f"the object: {error.status} {error.message}"
    # the pools' affinity goes into their Deployments as written: checked offline against what the API
    # server checks there, so here it is left out of the spec and put back into the rendered Deployments
    raw = copy.deepcopy(stored["spec"])
    affinity = {role: raw.get(role, {}).pop("affinity", None) for role in ("prefill", "decode")}
    try:
        spec = parse_spec(raw)
    except InvalidSpec:  # stored by the API server, unreadable offline: the verdicts will differ
        return None
    owner = Owner(stored["metadata"]["name"], namespace)
    for child in render_children(owner, spec, DEFAULT_CATALOG):
        meta = child["metadata"]
        role = meta.get("labels", {}).get("disagg.dev/role")
        if child["kind"] == "Deployment" and affinity.get(role) is not None:
            child["spec"]["template"]["spec"]["affinity"] = affinity[role]
        try:
            kube.request("PATCH", kind_of(child).path(namespace, meta["name"]),
                         query=[*DRY_RUN, ("fieldManager", "disagg"), ("force", "true")],
                         body=yaml_flow(child).encode(), content_type="application/apply-patch+yaml")
        except ApiError as error:
            return f"{child['kind']}/{meta['name']}: {error.status} {error.message}"
    return None


def test_validate_and_the_api_server_agree_on_every_manifest(
    kube_api: kclient.ApiClient, cluster: Any, e2e_namespace: str, tmp_path: Path
) -> None:
    install_crd(Kubectl(bin_dir() / "kubectl", cluster.kubeconfig))
    cases, catalogue = build_cases()
    run_validate(cases + [c for c, _ in catalogue], tmp_path)
    kube = Kube(kube_api)
    with ThreadPoolExecutor(8) as pool:
        refusals = list(pool.map(lambda c: api_verdict(kube, e2e_namespace, c), cases))
    disagreements = []
    for case, refusal in zip(cases, refusals, strict=True):
        case.api_refusal = refusal
        if case.validate_ok != (refusal is None):
            validate = "valid" if case.validate_ok else "; ".join(case.validate_errors)[:400]
            disagreements.append(f"{case.label} ({case.name}): validate: {validate}\n    API server: "
                                 f"{(refusal or 'accepted')[:400]}")
    refused = sum(c.api_refusal is not None for c in cases)
    print(f"\n{len(cases)} manifests: {len(cases) - refused} valid, {refused} refused by both "
          f"({sum(c.api_refusal is not None and c.api_refusal.startswith('the object') for c in cases)} as "
          "the object, the rest in a child)" if not disagreements else "")
    assert not disagreements, f"{len(disagreements)} of {len(cases)} disagree:\n" + "\n".join(disagreements)
    assert sum(c.validate_ok is True for c in cases) >= 40 and refused >= 100, "the set lost its balance"

    # the catalogue is the operator's: the API server takes these, validate refuses them by the catalogue
    for case, fields in catalogue:
        stored = kube.request("POST", ISVC_PATH.format(namespace=e2e_namespace), query=DRY_RUN,
                              body=case.text.encode(), content_type="application/yaml")
        spec = parse_spec(stored["spec"])
        assert not case.validate_ok, case.label
        assert {e.field for e in catalog_errors(spec, DEFAULT_CATALOG)} == fields, case.label
        assert all(any(f in line for f in fields) for line in case.validate_errors), (case.label, case.validate_errors)
