"""The lab's engines served on loopback for a test: pods, services, and a server-sent-events reader."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from disagg.catalog.accelerators import load_catalog
from disagg_lab.engines import FleetSim
from disagg_lab.kube import Event, PodObservation, ServiceObservation
from disagg_lab.server import FleetServer
from support.paths import REPO, free_port

VLLM = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
SGLANG = next(d for d in yaml.safe_load_all((REPO / "examples" / "02-sglang-mooncake.yaml").read_text())
              if d and d.get("kind") == "InferenceService")
RECOMPUTE = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_consumer",
                        "kv_load_failure_policy": "recompute"})
PRODUCER = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_producer"})




def pod(service: str, role: str, ip: str, *, args: tuple[str, ...] = (), env: tuple[tuple[str, str], ...] = ()
        ) -> PodObservation:
    name = f"{service}-{role}-{ip.rsplit('.', 1)[1]}"
    return PodObservation(uid=name, namespace="ns", name=name, service=service, role=role,  # type: ignore[arg-type]
                          ip=ip, ready=True, args=args, env=env)


@dataclass
class Lab:
    server: FleetServer
    sim: FleetSim
    port: int
    control: int
    http: aiohttp.ClientSession

    def url(self, ip: str, path: str) -> str:
        return f"http://{ip}:{self.port}{path}"

    def engine(self, name: str) -> Any:
        (found,) = [p.engine for p in self.sim.pods.values() if p.pod.name == name]
        return found


@contextlib.asynccontextmanager
async def lab(services: dict[str, dict[str, Any]], pods: list[PodObservation], tmp_path: Path) -> AsyncIterator[Lab]:
    port, control = free_port(), free_port()
    sim = FleetSim(load_catalog(), seed=0)
    server = FleetServer(sim, namespaces=["ns"], kubeconfig=None, targets_file=None, control_port=control,
                         models_dir=tmp_path / "models")
    await server.start_http()
    specs = []
    for name, example in services.items():
        spec = copy.deepcopy(example["spec"])
        spec["engine"]["port"] = port
        specs.append(ServiceObservation("ns", name, spec))
    server.apply(Event("services", "SYNC", "ns", tuple(specs)))
    server.apply(Event("pods", "SYNC", "ns", tuple(pods)))
    await server.reconcile()
    assert not server.problems, server.problems
    ticker = asyncio.create_task(server._ticker())
    try:
        async with aiohttp.ClientSession() as http:
            yield Lab(server, sim, port, control, http)
    finally:
        server.stop()
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await server.shutdown()


async def sse(response: aiohttp.ClientResponse) -> tuple[list[dict[str, Any]], list[float]]:
    """The events of a stream (until [DONE]) and when each arrived."""
    events: list[dict[str, Any]] = []
    times: list[float] = []
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        events.append(json.loads(line.removeprefix("data: ")))
        times.append(time.monotonic())
    return events, times


