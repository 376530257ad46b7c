"""Services served end to end on the local cluster: a namespace with its own operator, the lab's engines
and real routers, and the InferenceServices applied and Ready with their routers probed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client as kclient

from disagg_lab.load import LoadClient, Result, Schedule, ServiceEndpoints
from support.operators import (
    Cluster,
    E2ESession,
    Kubectl,
    LabProcesses,
    OperatorProcess,
    bin_dir,
    condition,
    diagnose,
    dump,
    is_ready,
    isolate,
    operator_session,
    remove_finalizers,
    routers_ready,
    wait_until,
)

if TYPE_CHECKING:
    from support.cluster import LocalCluster


@dataclass
class LabServices:
    session: E2ESession
    namespace: str
    operator: OperatorProcess
    lab: LabProcesses
    api: kclient.ApiClient

    def diagnostics(self) -> str:
        return "\n".join([diagnose(self.session.kubectl, [self.namespace], [self.operator]), self.lab.log_tail(60)])

    def pods(self, service: str, role: str) -> list[Any]:
        """The pool's pods that are not being deleted."""
        return self.session.cluster.pods(self.namespace, f"disagg.dev/service={service},disagg.dev/role={role}")

    def pods_left(self, service: str, role: str) -> list[Any]:
        """The pool's pods, terminating ones included (they are gone when their engine has exited)."""
        pods: list[Any] = self.session.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"disagg.dev/service={service},disagg.dev/role={role}").items
        return pods

    def engine_port(self, service: str) -> int:
        body = self.session.cluster.service(self.namespace, service) or {}
        return int(((body.get("spec") or {}).get("engine") or {}).get("port") or 8000)

    def router_port(self, service: str) -> int:
        body = self.session.cluster.service(self.namespace, service) or {}
        return int(((body.get("spec") or {}).get("router") or {}).get("port") or 8000)

    def endpoints(self, service: str, ready_for_s: float = 0.0) -> ServiceEndpoints:
        return ServiceEndpoints(lambda: self.api, self.namespace, service, ready_for_s=ready_for_s)

    @contextlib.asynccontextmanager
    async def client(self, service: str, ready_for_s: float = 0.0) -> AsyncIterator[LoadClient]:
        """A real OpenAI client sending to the service's ready endpoints (Ready for `ready_for_s`)."""
        endpoints = await asyncio.to_thread(self.endpoints(service, ready_for_s).start)  # other loads share the loop
        client = LoadClient(endpoints, timeout_s=60.0)
        try:
            yield client
        finally:
            await client.close()
            endpoints.stop()

    async def load(self, service: str, schedule: Schedule, seconds: float, seed: int) -> list[Result]:
        """Requests on `schedule` through the service's ready endpoints, bounded in time."""
        async with self.client(service) as client:
            return await client.run(schedule.plan(seconds, 1000, seed))

    async def burst(self, service: str, count: int, prompt_tokens: int, output_tokens: int) -> list[Result]:
        """`count` requests sent at once through the service's ready endpoints."""
        async with self.client(service) as client:
            return list(await asyncio.gather(*(client.one(i, prompt_tokens, output_tokens) for i in range(count))))

    async def load_until(self, service: str, rate: float, prompt_tokens: int, output_tokens: int,
                         stop: asyncio.Event, max_s: float, ready_for_s: float = 0.0) -> list[Result]:
        """Requests at `rate` a second through the service's ready endpoints (Ready for `ready_for_s`) until `stop`
        is set (at most `max_s`), then waits for those in flight."""
        async with self.client(service, ready_for_s) as client:
            loop = asyncio.get_running_loop()
            end = loop.time() + max_s
            tasks: list[asyncio.Task[Result]] = []
            while not stop.is_set() and loop.time() < end and len(tasks) < rate * max_s + 1:
                tasks.append(asyncio.create_task(client.one(len(tasks), prompt_tokens, output_tokens)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0 / rate)
            if tasks:
                await asyncio.wait(tasks, timeout=client.timeout_s + 30)
            return [t.result() for t in tasks if t.done()]

@contextlib.contextmanager
def lab_services(
    cluster: LocalCluster, kube_api: kclient.ApiClient, workdir: Path, name: str,
    manifests: Callable[[str], list[dict[str, Any]]], fleet_ready: Callable[[list[tuple[str, str]]], None],
    *, operator_args: Sequence[str] = (), scrape: bool = False,
) -> Iterator[LabServices]:
    """`manifests(namespace)` applied in a new namespace and Ready, each router started and probed, and
    `fleet_ready` content with the (service, role) of every engine the lab serves; removed after."""
    kubectl = Kubectl(bin_dir() / "kubectl", cluster.kubeconfig)
    with operator_session(kubectl, Cluster(kube_api), workdir, name) as session:
        namespace = f"e2e-{name.removesuffix('-e2e')}-{session.session}"
        kubectl("create", "namespace", namespace)
        kubectl("label", "namespace", namespace, "e2e=true")
        operator = OperatorProcess("operator", (namespace,), session.operator_kubeconfig, workdir / "operator.log",
                                   30.0, extra_args=tuple(operator_args))
        lab = LabProcesses(namespace, workdir, cluster.kubeconfig,
                           targets_file=cluster.engines_file if scrape else None)
        env = LabServices(session, namespace, operator, lab, kube_api)
        try:
            isolate(kubectl, session.session, namespace)
            operator.start().wait_healthy(timeout=30)
            lab.start()
            services = manifests(namespace)
            kubectl("apply", "-f", "-", input=dump(services))

            def all_ready() -> bool:
                for service in (s["metadata"]["name"] for s in services):
                    body = session.cluster.service(namespace, service)
                    assert is_ready(body), f"{service}: Ready {condition(body, 'Ready')}"
                    assert routers_ready(env.pods(service, "router")), f"{service}: routers not started and Ready"
                fleet_ready([(p["service"], p["role"]) for p in lab.get("/state")["pods"]])
                return True

            wait_until(all_ready, 180, "the services Ready with their routers started and probed",
                       env.diagnostics, interval=1.0)
            yield env
        finally:
            lab.stop()
            operator.stop()
            remove_finalizers(session.cluster, namespace)
            kubectl("delete", "namespace", namespace, "--wait=false", check=False)
