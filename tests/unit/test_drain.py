"""A leaving worker finishes what it holds: the bounds the operator derives from the SLO, what it renders for
the engines and routers, and the preStop command itself, run against an engine's /metrics."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.catalog.accelerators import load_catalog
from disagg.render import render_service
from disagg.render.drain import DEREGISTER_S, EXIT_MARGIN_S, QUIET_S, drain_seconds, pool_drain, router_grace_seconds
from support.paths import REPO

VLLM = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
SGLANG = next(d for d in yaml.safe_load_all((REPO / "examples" / "02-sglang-mooncake.yaml").read_text())
              if d and d.get("kind") == "InferenceService")


def spec_of(example: dict[str, Any], **changes: Any) -> InferenceServiceSpec:
    raw = copy.deepcopy(example["spec"])
    raw.update(changes)
    return InferenceServiceSpec.model_validate(raw)


def test_bounds_follow_the_slo_and_the_longest_output() -> None:
    spec = spec_of(VLLM, slo={"ttftMs": 500, "itlMs": 50}, drain={"maxOutputTokens": 1000})
    assert drain_seconds(spec, "decode") == 51  # 0.5 s + 1000 tokens x 50 ms
    assert drain_seconds(spec, "prefill") == 15  # 10 x 0.5 s + 10 s for the decodes to pull
    assert pool_drain(spec, "decode").grace_s == DEREGISTER_S + 51 + QUIET_S + EXIT_MARGIN_S
    slower = spec_of(VLLM, slo={"ttftMs": 500, "itlMs": 100}, drain={"maxOutputTokens": 1000})
    assert drain_seconds(slower, "decode") == 101
    fixed = spec_of(VLLM, drain={"timeoutSeconds": 42})
    assert drain_seconds(fixed, "decode") == drain_seconds(fixed, "prefill") == 42
    assert router_grace_seconds(fixed) > 2 * 42


def _pool(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("example", [VLLM, SGLANG], ids=["vllm", "sglang"])
def test_pods_get_the_drain_the_router_a_preStop_sleep(example: dict[str, Any]) -> None:
    body = copy.deepcopy(example)
    body["metadata"]["namespace"] = "ns"
    manifests = render_service(body, load_catalog())
    name = body["metadata"]["name"]
    spec = InferenceServiceSpec.model_validate(body["spec"])
    for role in ("prefill", "decode"):
        pod = _pool(manifests, f"{name}-{role}")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        drain = pool_drain(spec, role)
        assert pod["terminationGracePeriodSeconds"] == drain.grace_s
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["python3", "-c"] and command[3:6] == [str(spec.engine.port), str(DEREGISTER_S),
                                                                     str(drain.drain_s)]
        shutdown = [a for i, a in enumerate(container["args"]) if container["args"][i - 1] == "--shutdown-timeout"]
        assert shutdown == ([str(drain.drain_s)] if spec.engine.kind == "vllm" else [])
    router = _pool(manifests, f"{name}-router")["spec"]["template"]["spec"]
    assert router["terminationGracePeriodSeconds"] == router_grace_seconds(spec)
    assert router["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    if spec.engine.kind == "sglang":
        args = router["containers"][0]["args"]
        assert args[args.index("--shutdown-grace-period-secs") + 1] == str(router_grace_seconds(spec) - 5)


class _Metrics(BaseHTTPRequestHandler):
    busy: Callable[[], float] = staticmethod(lambda: 0.0)
    finished: Callable[[], float] = staticmethod(lambda: 3.0)

    def do_GET(self) -> None:
        value = type(self).busy()
        body = (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{engine=\"0\"}} {value}\n"
                f"vllm:e2e_request_latency_seconds_count{{engine=\"0\"}} {type(self).finished()}\n"
                f"vllm:num_requests_waiting{{engine=\"0\"}} 0.0\nvllm:kv_cache_usage_perc{{engine=\"0\"}} 0.0\n"
                f"vllm:num_requests_running_other 7.0\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def engine_metrics(busy: Callable[[], float], finished: Callable[[], float] = lambda: 3.0) -> Iterator[int]:
    handler = type("Handler", (_Metrics,), {"busy": staticmethod(busy), "finished": staticmethod(finished)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


QUIET_TEST_S = 1.0


def run_prestop(port: int, wait: float, bound: float) -> float:
    """The rendered preStop command of a vLLM prefill pod, with this port and waits; how long it ran."""
    command = list(pool_drain(spec_of(VLLM), "prefill").prestop)
    command[0] = sys.executable  # python3 of this environment; the engines' images have theirs
    command[3:7] = [str(port), str(wait), str(bound), str(QUIET_TEST_S)]
    started = time.monotonic()
    subprocess.run(command, env={"POD_IP": "127.0.0.1"}, check=True, timeout=bound + wait + 10)
    return time.monotonic() - started


def test_prestop_waits_until_nothing_is_in_flight() -> None:
    started = time.monotonic()
    with engine_metrics(lambda: 2.0 if time.monotonic() - started < 1.5 else 0.0) as port:
        took = run_prestop(port, wait=0.2, bound=20.0)
    # after the engine went idle and stayed so for the quiet time, long before the bound
    assert 1.0 + QUIET_TEST_S <= took <= 4.0 + QUIET_TEST_S, took


def test_prestop_waits_while_a_router_still_sends_short_requests() -> None:
    # nothing running at any poll, but requests keep finishing for 3 s: a router that has not dropped the worker
    started = time.monotonic()
    with engine_metrics(lambda: 0.0, lambda: float(int(min(time.monotonic() - started, 3.0) * 4))) as port:
        took = run_prestop(port, wait=0.2, bound=20.0)
    assert 2.5 + QUIET_TEST_S <= took <= 5.0 + QUIET_TEST_S, took


def test_prestop_gives_up_at_its_bound_and_when_the_engine_is_gone() -> None:
    with engine_metrics(lambda: 1.0) as port:
        took = run_prestop(port, wait=0.1, bound=2.0)
    assert 2.0 <= took <= 4.0, took
    with engine_metrics(lambda: 0.0) as port:
        pass  # closed: nothing answers on this port any more
    assert run_prestop(port, wait=0.1, bound=30.0) < 5.0
