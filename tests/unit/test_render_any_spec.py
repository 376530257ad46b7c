"""`disagg render` of InferenceServices that are not examples: every catalogue pair, both engines."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from disagg.api.validate import InvalidSpec
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.engines import ENGINES
from disagg.render import render_service

# planner-only types (no device plugin) are refused; tests/unit/test_multinode_plan.py says how
SERVABLE = [name for name in DEFAULT_CATALOG.names() if not DEFAULT_CATALOG[name].plan_only]
PAIRS = list(itertools.product(SERVABLE, SERVABLE))


def service(engine: str, prefill: str, decode: str, connector: str = "nixl") -> dict[str, Any]:
    return {
        "apiVersion": "disagg.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "any", "namespace": "ns", "uid": "1234"},
        "spec": {
            "model": {"name": "org/model", "uri": "hf://org/model"},
            "engine": {"kind": engine, "image": "example/engine:1"},
            "kvTransfer": {"connector": connector},
            "prefill": {"replicas": 2, "accelerator": {"type": prefill, "count": 2}, "parallelism": {"tensor": 2}},
            "decode": {"replicas": 3, "accelerator": {"type": decode, "count": 4}, "parallelism": {"tensor": 4}},
        },
    }


def pool(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"any-{role}"]
    return deployment


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=[f"{p}->{d}" for p, d in PAIRS])
def test_pools_request_and_target_their_accelerators(engine: str, prefill: str, decode: str) -> None:
    body = service(engine, prefill, decode)
    supported = ENGINES[engine].vendors
    if {DEFAULT_CATALOG[prefill].vendor, DEFAULT_CATALOG[decode].vendor} - supported:
        with pytest.raises(InvalidSpec, match="does not run on"):
            render_service(body, DEFAULT_CATALOG)
        return
    docs = render_service(body, DEFAULT_CATALOG)
    for role, acc_type, count, tp in (("prefill", prefill, 2, 2), ("decode", decode, 4, 4)):
        deployment = pool(docs, role)
        accelerator = DEFAULT_CATALOG[acc_type]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"][accelerator.resource_name] == str(count)
        assert container["resources"]["requests"][accelerator.resource_name] == str(count)
        for label, value in accelerator.node_labels.items():
            assert pod["nodeSelector"][label] == value
        assert deployment["spec"]["replicas"] == (2 if role == "prefill" else 3)
        assert deployment["metadata"]["ownerReferences"][0]["uid"] == "1234"
        args = container["args"]
        if engine == "vllm":
            assert args[args.index("--tensor-parallel-size") + 1] == str(tp)
            config = json.loads(args[args.index("--kv-transfer-config") + 1])
            assert config["kv_connector"] == "NixlConnector"
            assert config["kv_role"] == ("kv_producer" if role == "prefill" else "kv_consumer")
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "$(POD_IP)"
        else:
            assert args[args.index("--tp-size") + 1] == str(tp)
            assert args[args.index("--disaggregation-mode") + 1] == role
            assert args[args.index("--disaggregation-transfer-backend") + 1] == "nixl"


def test_mooncake_flags_for_sglang_and_refusal_for_vllm() -> None:
    body = service("sglang", "nvidia-h100", "nvidia-h200", connector="mooncake")
    body["spec"]["decode"]["parallelism"]["tensor"] = 2
    docs = render_service(body, DEFAULT_CATALOG)
    prefill_args = pool(docs, "prefill")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert prefill_args[prefill_args.index("--disaggregation-bootstrap-port") + 1] == "8998"
    body["spec"]["engine"]["kind"] = "vllm"
    with pytest.raises(InvalidSpec, match="vllm-router"):
        render_service(body, DEFAULT_CATALOG)


def test_cli_render_prints_what_would_be_applied(tmp_path: Any) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(service("sglang", "amd-mi300x", "amd-mi300x")))
    result = subprocess.run([sys.executable, "-m", "disagg.cli", "render", "-f", str(path)],
                            capture_output=True, text=True, check=True)
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs].count("Deployment") == 3
    assert pool(docs, "decode")["spec"]["template"]["spec"]["nodeSelector"] == {
        "amd.com/gpu.product-name": "AMD_Instinct_MI300X_OAM"}


def test_cli_render_fails_with_the_field(tmp_path: Any) -> None:
    body = service("vllm", "nvidia-h100", "nvidia-h200")
    body["spec"]["decode"]["accelerator"]["type"] = "nvidia-h999"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    result = subprocess.run([sys.executable, "-m", "disagg.cli", "render", "-f", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "spec.decode.accelerator.type" in result.stderr and "nvidia-h999" in result.stderr
    assert result.stdout == ""
