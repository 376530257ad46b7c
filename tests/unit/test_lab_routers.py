"""The lab's router supervisor builds a router's process as the kubelet would build the container: the
pod's command, arguments and environment, `$(VAR)` expansion, downward-API fieldRefs, the wildcard
address made the pod's IP; the pinned router versions are the engine-flag tests'."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from kubernetes import client as kclient

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import render_service
from disagg_lab.podspec import container_env, expand
from disagg_lab.routers import ROUTER_PACKAGES, Probe, container_argv, router_package
from support.paths import REPO


def test_pinned_router_versions_are_the_engine_flag_tests() -> None:
    header = (REPO / "tests" / "data" / "engine_flags" / "choices.txt").read_text().splitlines()[0]
    for package, version in ROUTER_PACKAGES.items():
        assert re.search(rf"\b{package} {re.escape(version)}\b", header), (package, version, header)


def test_expansion_follows_the_kubelet() -> None:
    env = {"POD_IP": "127.100.0.7", "PORT": "8000"}
    assert expand("--host=$(POD_IP):$(PORT)", env) == "--host=127.100.0.7:8000"
    assert expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert expand("$$(POD_IP) is escaped, $$ alone too", env) == "$(POD_IP) is escaped, $ alone too"


def _router_pod(example: str) -> Any:
    body = yaml.safe_load((REPO / "examples" / example).read_text())
    (deployment,) = [d for d in render_service(body, DEFAULT_CATALOG)
                     if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-router")]
    template = deployment["spec"]["template"]
    api = kclient.ApiClient()

    raw = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {
        **template["metadata"], "name": "r-0", "namespace": "serving", "uid": "u"},
        "spec": template["spec"], "status": {"phase": "Running", "podIP": "127.100.0.9"}})
    deserialize: Any = api.deserialize
    pod = deserialize(raw, "V1Pod", "application/json")
    return pod


@pytest.mark.parametrize(("example", "package"), [("01-vllm-nixl-llama70b.yaml", "vllm-router"),
                                                  ("02-sglang-mooncake.yaml", "sglang-router")])
def test_the_rendered_router_runs_with_its_own_args_on_the_pod_ip(example: str, package: str) -> None:
    pod = _router_pod(example)
    container = pod.spec.containers[0]
    env = container_env(pod, container)
    argv = container_argv(pod, container, env)
    assert router_package(argv) == package
    assert "0.0.0.0" not in argv
    assert argv[argv.index("--host") + 1] == "127.100.0.9"
    assert argv[argv.index("--prometheus-host") + 1] == "127.100.0.9"
    rendered = [*container.command, *container.args]
    assert [a for a in rendered if a != "0.0.0.0"] == [a for a in argv if a != "127.100.0.9"]  # nothing else
    readiness = Probe.of(container.readiness_probe, container)
    liveness = Probe.of(container.liveness_probe, container)
    assert readiness is not None and readiness.path == "/readiness" and readiness.port == 8000
    assert liveness is not None and liveness.path == ("/liveness" if package == "vllm-router" else "/health")


def test_downward_api_values() -> None:
    pod = _router_pod("01-vllm-nixl-llama70b.yaml")
    container = pod.spec.containers[0]
    container.env = [
        kclient.V1EnvVar(name="POD_IP", value_from=kclient.V1EnvVarSource(
            field_ref=kclient.V1ObjectFieldSelector(field_path="status.podIP"))),
        kclient.V1EnvVar(name="ME", value_from=kclient.V1EnvVarSource(
            field_ref=kclient.V1ObjectFieldSelector(field_path="metadata.name"))),
        kclient.V1EnvVar(name="URL", value="http://$(POD_IP):8000/$(ME)"),
    ]
    assert container_env(pod, container) == {"POD_IP": "127.100.0.9", "ME": "r-0",
                                             "URL": "http://127.100.0.9:8000/r-0"}
    container.env = [kclient.V1EnvVar(name="S", value_from=kclient.V1EnvVarSource(
        secret_key_ref=kclient.V1SecretKeySelector(name="s", key="k")))]
    with pytest.raises(ValueError, match="only literal values and fieldRefs"):
        container_env(pod, container)
