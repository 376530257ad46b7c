"""The engines' revision (render/revision.py): what is in it (anything two engines must agree on to hand KV
over), what is out of it (what a worker changes without its peers noticing), and how `place` puts a revision's
pools into a slot and pins the routers to one revision."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from disagg.api.validate import validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import Owner, Placement, place, render_unplaced, revision_of
from disagg.render.revision import ANY_REVISION
from support.paths import REPO

VLLM = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
SGLANG = yaml.safe_load((REPO / "examples" / "02-sglang-mooncake.yaml").read_text())
REVISION = "disagg.dev/revision"


def edited(body: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    def merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
        for key, value in patch.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    out = copy.deepcopy(body)
    merge(out["spec"], change)
    return out


def children(body: dict[str, Any]) -> list[dict[str, Any]]:
    owner = Owner(body["metadata"]["name"], body["metadata"].get("namespace"), "uid-1")
    return render_unplaced(owner, validate_service(body, DEFAULT_CATALOG), DEFAULT_CATALOG)


def revision(body: dict[str, Any]) -> str:
    return revision_of(children(body))


INCOMPATIBLE = {
    "model revision": {"model": {"revision": "0e9e39f249a16976918f6564b8830bc894c89659"}},
    "model": {"model": {"name": "meta-llama/Llama-3.3-70B-Instruct", "uri": "hf://meta-llama/Llama-3.3-70B-Instruct"}},
    "engine image": {"engine": {"image": "vllm/vllm-openai:v0.33.0"}},
    "one pool's image": {"decode": {"image": "vllm/vllm-openai:v0.33.0"}},
    "KV dtype": {"engine": {"extraArgs": ["--kv-cache-dtype", "fp8"]}},
    "block size": {"engine": {"extraArgs": ["--block-size", "32"]}},
    "parallel layout": {"decode": {"accelerator": {"count": 4}, "parallelism": {"tensor": 4}}},
    "engine env": {"engine": {"env": [{"name": "VLLM_ATTENTION_BACKEND", "value": "FLASHINFER"}]}},
}
COMPATIBLE = {
    "resources": {"decode": {"resources": {"requests": {"cpu": "24", "memory": "256Gi"}}}},
    "tolerations": {"prefill": {"tolerations": [{"key": "example.com/spot", "operator": "Exists"}]}},
    "node selection": {"decode": {"nodeSelector": {"topology.kubernetes.io/zone": "zone-b"}}},
    "replicas": {"prefill": {"replicas": 4}},
    "autoscaling bounds": {"decode": {"autoscaling": {"minReplicas": 3, "maxReplicas": 12}}},
    "drain bound": {"drain": {"timeoutSeconds": 900}},
    "router": {"router": {"replicas": 3}},
}


@pytest.mark.parametrize("change", INCOMPATIBLE.values(), ids=INCOMPATIBLE.keys())
def test_a_change_the_engines_must_agree_on_is_a_new_revision(change: dict[str, Any]) -> None:
    assert revision(edited(VLLM, change)) != revision(VLLM)


@pytest.mark.parametrize("change", COMPATIBLE.values(), ids=COMPATIBLE.keys())
def test_a_change_a_worker_makes_alone_keeps_the_revision(change: dict[str, Any]) -> None:
    before, after = children(VLLM), children(edited(VLLM, change))
    assert before != after, "the change must change something rendered"
    assert revision_of(after) == revision_of(before)


def test_sglang_model_revision_image_and_connector_are_new_revisions_and_resources_are_not() -> None:
    assert revision(edited(SGLANG, {"kvTransfer": {"connector": "nixl"}})) != revision(SGLANG)
    assert revision(edited(SGLANG, {"model": {"revision": "v2"}})) != revision(SGLANG)
    assert revision(edited(SGLANG, {"engine": {"image": "lmsysorg/sglang:v0.6.0"}})) != revision(SGLANG)
    assert revision(edited(SGLANG, {"decode": {"resources": {"requests": {"cpu": "12"}}}})) == revision(SGLANG)


def by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_slot_b_pools_have_their_own_names_selectors_and_start_size() -> None:
    docs = children(VLLM)
    rev = revision_of(docs)
    placed = by_name(place("llama-70b", docs, Placement("b", initial_replicas=(("decode", 5), ("prefill", 3)))))
    assert "Deployment/llama-70b-decode" not in placed
    decode = placed["Deployment/llama-70b--decode-b"]
    assert decode["spec"]["selector"]["matchLabels"]["disagg.dev/slot"] == "b"
    assert decode["spec"]["template"]["metadata"]["labels"][REVISION] == rev
    assert decode["spec"]["template"]["metadata"]["labels"]["disagg.dev/slot"] == "b"
    assert decode["metadata"]["annotations"]["disagg.dev/initial-replicas"] == "5"
    assert placed["Deployment/llama-70b--prefill-b"]["metadata"]["annotations"]["disagg.dev/initial-replicas"] == "3"
    # the KV Services and the disruption budgets cover the role in both slots
    assert placed["Service/llama-70b--decode-kv"]["spec"]["selector"] == {
        "disagg.dev/service": "llama-70b", "disagg.dev/role": "decode"}
    assert docs == children(VLLM), "place changes a copy"


def test_routers_select_the_workers_of_one_revision_or_any() -> None:
    docs = children(VLLM)
    placed = by_name(place("llama-70b", docs, Placement("a", router_revision="0123456789")))
    pinned = placed["Deployment/llama-70b-router"]
    args = pinned["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag in ("--prefill-selector", "--decode-selector"):
        values = args[args.index(flag) + 1:]
        values = values[:next(i for i, v in enumerate(values) if v.startswith("--"))]
        assert f"{REVISION}=0123456789" in values, (flag, values)
    assert pinned["spec"]["template"]["metadata"]["labels"][REVISION] == "0123456789"
    unpinned = by_name(place("llama-70b", docs, Placement("a", router_revision=ANY_REVISION)))
    router_args = unpinned["Deployment/llama-70b-router"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(REVISION in arg for arg in router_args)


def test_in_place_rollouts_label_no_pod_with_a_revision() -> None:
    # a revision label on the pods would roll the prefill pool too when only the decode image changes
    placed = place("llama-70b", children(VLLM), Placement("a", router_revision=ANY_REVISION))
    assert REVISION not in str(placed)
