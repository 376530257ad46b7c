"""engine.kind custom: templates filled per pool, its metric names behind the autoscaler's signals, and the
validation that refuses to autoscale a pool whose signals the engine does not export."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.engines import engine_adapter
from disagg.render import render_service
from disagg.scaling.loop import _custom_metrics
from disagg.scaling.signals import QuerySet
from support.paths import REPO

GOLDEN_INPUT = REPO / "tests" / "golden" / "input" / "custom-engine.yaml"


def custom_service() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(GOLDEN_INPUT.read_text())
    return body


def engine_container(body: dict[str, Any], role: str) -> dict[str, Any]:
    for manifest in render_service(body, DEFAULT_CATALOG):
        if manifest["kind"] == "Deployment" and manifest["metadata"]["name"].endswith(f"-{role}"):
            container: dict[str, Any] = manifest["spec"]["template"]["spec"]["containers"][0]
            return container
    raise AssertionError(f"no {role} Deployment")


def test_templates_are_filled_with_each_pools_values() -> None:
    body = custom_service()
    body["spec"]["kvTransfer"] = {"port": 7001}
    body["spec"]["decode"]["parallelism"] = {"tensor": 2}
    body["spec"]["decode"]["accelerator"]["count"] = 2
    decode = engine_container(body, "decode")
    assert decode["image"] == "registry.example.com/acme/megakernel-server:2.1"
    assert decode["command"] == ["/opt/mk/serve"]
    assert decode["args"] == ["--listen", "0.0.0.0:8100", "--phase", "decode", "--kv-port", "7001",
                              "--weights", "/models/llama-1b", "--name", "acme/llama-1b", "--tp", "2"]
    assert engine_container(body, "prefill")["args"][3] == "prefill"


def test_a_custom_engine_without_the_metrics_autoscaling_needs_cannot_be_autoscaled() -> None:
    body = custom_service()
    del body["spec"]["engine"]["custom"]["metrics"]["ttftHistogram"]
    del body["spec"]["engine"]["custom"]["metrics"]["kvCacheUsage"]
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    messages = {e.field: e.message for e in caught.value.errors}
    assert set(messages) == {"spec.prefill.autoscaling", "spec.decode.autoscaling"}, messages
    assert "ttftHistogram" in messages["spec.prefill.autoscaling"]
    assert "kvCacheUsage" not in messages["spec.prefill.autoscaling"]  # prefill does not read KV usage
    assert "kvCacheUsage" in messages["spec.decode.autoscaling"]
    assert "ttftHistogram" in messages["spec.decode.autoscaling"]
    # fixed pools need no metrics
    for role in ("prefill", "decode"):
        del body["spec"][role]["autoscaling"]
    validate_service(body, DEFAULT_CATALOG)


@pytest.mark.parametrize(("change", "field", "word"), [
    (lambda s: s["engine"]["custom"]["args"].append("{{nodeRank}}"), "spec.engine.custom.args[12]", "nodeRank"),
    (lambda s: s["engine"].pop("image"), "spec.engine.image", "image"),
    (lambda s: s["engine"].pop("custom"), "spec.engine", "custom"),
    (lambda s: s["engine"].update(kind="vllm"), "spec.engine", "custom"),
    (lambda s: s["engine"]["custom"]["metrics"].update(waitingRequests="mk queue"), "spec.engine.custom.metrics",
     "pattern"),
])
def test_bad_custom_engine_names_the_field(change: Any, field: str, word: str) -> None:
    body = custom_service()
    change(body["spec"])
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    messages = [str(e) for e in caught.value.errors]
    assert any(m.startswith(field) and word in m for m in messages), messages


def test_the_autoscaler_queries_the_custom_engines_metric_names() -> None:
    body = custom_service()
    del body["spec"]["prefill"]["autoscaling"]  # a fixed prefill: promptTokensTotal may be missing
    del body["spec"]["engine"]["custom"]["metrics"]["promptTokensTotal"]
    spec = validate_service(body, DEFAULT_CATALOG)
    custom = _custom_metrics([spec, spec])
    assert len(custom) == 1
    queries = QuerySet(custom=custom).queries()
    assert "mk_queue_depth" in queries["waiting"] and "vllm:num_requests_waiting" in queries["waiting"]
    assert "mk_first_token_seconds_bucket" in queries["ttft_buckets"]
    assert "mk_token_gap_seconds_bucket" in queries["itl_buckets"]
    assert "mk_kv_pages_used_ratio" in queries["kv_usage"]
    assert "mk_kv_received_total" in queries["kv_handed"] and "vllm:prompt_tokens_by_source" in queries["kv_handed"]
    assert "mk_kv_recomputed_total" in queries["kv_recomputed"]
    assert "mk_" not in queries["kv_failed"]  # unmapped: the built-in engines' names only
    # an unset name (promptTokensTotal, promptHistogram) adds no alternative: an empty one would match every series
    for promql in queries.values():
        assert "||" not in promql and '~"|' not in promql and '|"' not in promql, promql
    assert "mk_" not in QuerySet().queries()["waiting"]


def test_the_custom_engine_speaks_its_routers_protocol() -> None:
    body = custom_service()
    body["spec"]["engine"]["custom"]["protocol"] = "sglang"
    spec = validate_service(copy.deepcopy(body), DEFAULT_CATALOG)
    assert engine_adapter(spec.engine).router_image.startswith("lmsysorg/")
    routers = [m for m in render_service(body, DEFAULT_CATALOG)
               if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("-router")]
    assert "--pd-disaggregation" in routers[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    # SGLang's decode opens no KV port; its prefill announces the bootstrap port
    assert [p["name"] for p in engine_container(body, "decode")["ports"]] == ["http"]


def test_the_protocols_kv_rules_hold_for_a_custom_engine() -> None:
    body = custom_service()
    # vllm-router cannot hand Mooncake bootstrap data to a vLLM-protocol engine, custom or not
    body["spec"]["kvTransfer"] = {"connector": "mooncake"}
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert any(e.field == "spec.kvTransfer.connector" and "vllm-router" in e.message
               for e in caught.value.errors), caught.value.errors
    # an SGLang-protocol engine: the prefill's bootstrap port (8998), as for SGLang itself
    body["spec"]["engine"]["custom"]["protocol"] = "sglang"
    body["spec"]["kvTransfer"] = {"connector": "nixl"}
    assert engine_container(body, "prefill")["args"][5] == "8998"
    body["spec"]["engine"]["port"] = 8998
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert [e.field for e in caught.value.errors] == ["spec.engine.port"], caught.value.errors
