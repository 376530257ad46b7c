"""The lab's client: schedules (rate, steps, trace replay, bounded), the Service's ready endpoints as the
EndpointSlice controller computes them, and a transport that sends each request to one of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from kubernetes import client as kclient

from disagg_lab.load import EndpointTransport, Schedule, ServiceEndpoints, parse_steps, trace_schedule
from disagg_lab.offered import LoadError


def test_steps_and_their_bounds() -> None:
    assert parse_steps("4") == ((0.0, 4.0),)
    assert parse_steps("0s@2,30s@8") == ((0.0, 2.0), (30.0, 8.0))
    for bad in ("4x", "0s@2,10s@1x", "30s@2,10s@3", "fast"):
        with pytest.raises(LoadError):
            parse_steps(bad)
    plan = Schedule(steps=((0.0, 2.0), (10.0, 8.0)), arrivals="uniform").plan(20.0, 1000, 0)
    assert len([t for t, _, _ in plan if t < 10.0]) == 19 and len([t for t, _, _ in plan if t >= 10.0]) == 79
    assert [t for t, _, _ in plan] == sorted(t for t, _, _ in plan) and max(t for t, _, _ in plan) < 20.0
    assert len(Schedule(steps=((0.0, 100.0),)).plan(60.0, 50, 0)) == 50  # the request cap holds


def test_trace_replay_keeps_arrivals_and_caps_sizes(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.0000000,100,10\n"
                     "2023-11-16 18:00:01.0000000,20000,900\n2023-11-16 18:00:03.0000000,300,0\n")
    replay = trace_schedule(f"{trace}:2", max_output=512, max_prompt=16384)
    assert replay == ((0.0, 100, 10), (0.5, 16384, 512), (1.5, 300, 1))
    assert Schedule(trace=replay).plan(1.0, 100, 0) == [(0.0, 100, 10), (0.5, 16384, 512)]


def _pod(name: str, ip: str, ready: bool, deleting: bool = False) -> Any:
    return kclient.V1Pod(
        metadata=kclient.V1ObjectMeta(name=name, deletion_timestamp="2026-01-01T00:00:00Z" if deleting else None),
        spec=kclient.V1PodSpec(containers=[kclient.V1Container(
            name="router", ports=[kclient.V1ContainerPort(name="http", container_port=8000)])]),
        status=kclient.V1PodStatus(pod_ip=ip, conditions=[
            kclient.V1PodCondition(type="Ready", status="True" if ready else "False")]))


class FakeCore:
    def __init__(self, pods: list[Any]) -> None:
        self.pods = pods

    def read_namespaced_service(self, name: str, namespace: str, **_: Any) -> Any:
        return kclient.V1Service(spec=kclient.V1ServiceSpec(
            selector={"disagg.dev/service": name, "disagg.dev/role": "router"},
            ports=[kclient.V1ServicePort(name="http", port=8000, target_port="http")]))

    def list_namespaced_pod(self, namespace: str, label_selector: str, **_: Any) -> Any:
        assert label_selector == "disagg.dev/role=router,disagg.dev/service=svc"
        return kclient.V1PodList(items=self.pods)


def test_ready_endpoints_are_ready_pods_not_terminating_at_the_named_port(monkeypatch: pytest.MonkeyPatch) -> None:
    core = FakeCore([_pod("a", "127.100.0.1", True), _pod("b", "127.100.0.2", False),
                     _pod("c", "127.100.0.3", True, deleting=True), _pod("d", "127.100.0.4", True)])
    monkeypatch.setattr(kclient, "CoreV1Api", lambda api: core)
    endpoints = ServiceEndpoints(lambda: None, "ns", "svc")
    assert [(e.pod, e.ip, e.port) for e in endpoints.read(None)] == [("a", "127.100.0.1", 8000),
                                                                      ("d", "127.100.0.4", 8000)]


async def test_each_request_goes_to_a_ready_endpoint_keeping_the_service_host() -> None:
    endpoints = ServiceEndpoints(lambda: None, "ns", "svc")
    transport = EndpointTransport(endpoints)
    seen: list[tuple[str, int | None, str]] = []

    class Recorder(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append((str(request.url.host), request.url.port, request.headers["host"]))
            return httpx.Response(200, json={})

    transport.inner = Recorder()  # type: ignore[assignment]
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(httpx.ConnectError, match="no ready endpoints"):
            await http.get("http://svc.ns.svc:80/v1/models")
        from disagg_lab.load import Endpoint

        endpoints.endpoints = [Endpoint("127.100.0.1", 8000, "a"), Endpoint("127.100.0.4", 8000, "d")]
        for _ in range(40):
            await http.get("http://svc.ns.svc:80/v1/models")
    assert {host for host, _, _ in seen} == {"127.100.0.1", "127.100.0.4"}  # both used
    assert {port for _, port, _ in seen} == {8000} and {h for _, _, h in seen} == {"svc.ns.svc"}
