"""Events done to running services under a steady streaming load, and what the client saw of each: the e2e
tests' (tests/e2e/test_failures.py) and the operations benchmark's (bench/operations.py) one way to count.

An event is an async function `(env, service) -> Marked`: it does something to one service (kill a pod,
scale a pool, drain a node), waits (bounded) until the service is whole again, and says when it started,
when it was over, and which pods' requests it may lose (a kill loses what was in flight on the killed pod;
a planned event loses nothing). `run_event` starts the load on every service, does the event on each
at `event_at_s`, and counts per service: requests, failed (split into those allowed, in flight on a killed
pod at the kill, and the rest), mixed-version hand-offs (requests whose KV was refused, and the engines'
own `kv_refused` counters) and the event's duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes import client as kclient

from disagg.wellknown import MANAGED_SELECTOR
from disagg_lab.load import Result, Schedule
from support.lab_services import LabServices, lab_services
from support.operators import EXAMPLES, GROUP, PLURAL, VERSION, in_namespace, load_docs

if TYPE_CHECKING:
    from support.cluster import LocalCluster

SETTLE_S = 90.0
"""An event waits at most this long for its service to be whole again."""


@dataclass
class Marked:
    """What an event did to one service."""

    started: float
    """Unix time the event began (the kill, the edit, the drain command)."""
    ended: float
    """Unix time the service was whole again (every pool at its count, every pod Ready, none left over)."""
    lossy_pods: frozenset[str] = frozenset()
    """`namespace/pod` of pods whose in-flight requests the event may lose (a kill)."""
    notes: dict[str, Any] = field(default_factory=dict)
    recovered_at: float | None = None
    """Unix time a faulty worker answered again (an event that recovers it)."""


Event = Callable[[LabServices, str], Awaitable[Marked]]


@dataclass
class Outcome:
    """One event on one service, as the client and the engines saw it."""

    event: str
    service: str
    engine: str
    requests: int
    failed: int
    failed_in_flight: int
    """Failed, and in flight on a pod the event may lose requests of at its start (a kill)."""
    failed_after: int
    """Every other failure: what the event must not cause."""
    mixed: int
    """Requests served by a mixed-version pair: their KV refused (client side) or counted refused by the
    engines, whichever is larger."""
    duration_s: float
    notes: dict[str, Any] = field(default_factory=dict)
    first_failures: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"event": self.event, "engine": self.engine, "requests": self.requests, "failed": self.failed,
                "failed_in_flight": self.failed_in_flight, "failed_after": self.failed_after, "mixed": self.mixed,
                "duration_s": round(self.duration_s, 1), **self.notes}


def _refused(env: LabServices) -> dict[str, int]:
    return {p["pod"]: int(p.get("kv_refused_total", 0)) for p in env.lab.get("/state")["pods"]}


def _service_of_pods(env: LabServices) -> dict[str, str]:
    return {p["pod"]: p["service"] for p in env.lab.get("/state")["pods"]}


def count(event: str, service: str, engine: str, results: Sequence[Result], marked: Marked, refused: int) -> Outcome:
    failed = [r for r in results if not r.ok]

    def lost_at_start(r: Result) -> bool:
        open_at = r.sent_at < marked.started <= r.sent_at + (r.duration_s or 0.0) + 0.5
        pods = {r.prefill_pod, r.decode_pod} - {""}
        return open_at and bool(marked.lossy_pods) and (not pods or bool(pods & marked.lossy_pods))

    in_flight = [r for r in failed if lost_at_start(r)]
    mixed = max(refused, sum(1 for r in results if r.kv == "refused"))
    notes = dict(marked.notes)
    if marked.recovered_at is not None:
        notes["served_again_s"] = served_again_s(results, marked)
    return Outcome(event, service, engine, len(results), len(failed), len(in_flight), len(failed) - len(in_flight),
                   mixed, marked.ended - marked.started, notes,
                   [r.record() for r in failed if not lost_at_start(r)][:3])


def served_again_s(results: Sequence[Result], marked: Marked) -> float | None:
    """Seconds from the recovery of the event's worker until the client got the first answer through it (None:
    not while the load lasted)."""
    assert marked.recovered_at is not None
    through = [r.sent_at for r in results if r.ok and r.sent_at >= marked.recovered_at
               and {r.prefill_pod, r.decode_pod} & marked.lossy_pods]
    return round(min(through) - marked.recovered_at, 1) if through else None


async def run_event(env: LabServices, name: str, event: Event, engines: dict[str, str], *, rate: float,
                    load_s: float, event_at_s: float, prompt_tokens: int = 256,
                    output_tokens: int = 128) -> list[Outcome]:
    """`event` on every service of `engines` (service -> engine kind) at `event_at_s` into a `load_s` load of
    `rate` requests/s per service; the load goes on until the event is over and `load_s` has passed."""
    schedule = Schedule(steps=((0.0, rate),), prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    before = await asyncio.to_thread(_refused, env)
    loads = [asyncio.create_task(env.load(service, schedule, load_s, seed)) for seed, service in enumerate(engines)]
    await asyncio.sleep(event_at_s)
    marks = await asyncio.gather(*(event(env, service) for service in engines))
    results = await asyncio.gather(*loads)
    after = await asyncio.to_thread(_refused, env)
    owners = await asyncio.to_thread(_service_of_pods, env)
    outcomes = []
    for (service, engine), marked, got in zip(engines.items(), marks, results, strict=True):
        refused = sum(n - before.get(pod, 0) for pod, n in after.items() if owners.get(pod) == service)
        outcomes.append(count(name, service, engine, got, marked, refused))
    return outcomes


EXAMPLE_OF = {"vllm": "01-", "sglang": "02-"}
"""The example each engine's services are made from (vLLM over NIXL, SGLang over Mooncake)."""


def example_service(namespace: str, name: str, engine: str, prefill: int, decode: int) -> dict[str, Any]:
    """The engine's example as service `name` with fixed pools of these sizes and one router."""
    (example,) = [p for p in EXAMPLES if p.name.startswith(EXAMPLE_OF[engine])]
    (service,) = [in_namespace(d, namespace) for d in load_docs(example) if d.get("kind") == "InferenceService"]
    service["metadata"]["name"] = name
    spec = service["spec"]
    spec["router"] = {**(spec.get("router") or {}), "replicas": 1}
    spec["prefill"]["replicas"] = prefill
    spec["decode"]["replicas"] = decode
    for role in ("prefill", "decode"):
        spec[role].pop("autoscaling", None)
    return service


@contextlib.contextmanager
def example_services(cluster: LocalCluster, kube_api: kclient.ApiClient, workdir: Path, name: str,
                     engines: dict[str, str], prefill: int, decode: int) -> Iterator[LabServices]:
    """`engines` (service -> engine kind) as `example_service`s with pools of these sizes, in a namespace of
    their own, Ready and served by the lab (`lab_services`)."""

    def fleet_ready(served: list[tuple[str, str]]) -> None:
        for service in engines:
            assert served.count((service, "prefill")) == prefill, f"the fleet serves {sorted(served)}"
            assert served.count((service, "decode")) == decode, f"the fleet serves {sorted(served)}"

    with lab_services(cluster, kube_api, workdir, name,
                      lambda namespace: [example_service(namespace, service, engine, prefill, decode)
                                         for service, engine in engines.items()], fleet_ready) as env:
        yield env


# -- waiting for a service to be whole

def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def whole(env: LabServices, service: str, counts: dict[str, int], served: Callable[[], set[str]]) -> bool:
    """Every pool at its count, every pod Ready, served by the lab's engines, none terminating."""
    for role, want in counts.items():
        pods = env.pods_left(service, role)
        if len(pods) != want or not all(_ready(p) and not p.metadata.deletion_timestamp for p in pods):
            return False
        if not {p.metadata.name for p in pods} <= served():
            return False
    return True


async def until_whole(env: LabServices, service: str, counts: dict[str, int], timeout_s: float = SETTLE_S) -> float:
    """Unix time the service was whole (or the timeout's end)."""
    end = time.time() + timeout_s

    def served() -> set[str]:
        return {p["pod"] for p in env.lab.pods(service)}

    while time.time() < end:
        if await asyncio.to_thread(whole, env, service, counts, served):
            return time.time()
        await asyncio.sleep(0.5)
    return time.time()


def stale_router_workers(env: LabServices, service: str) -> list[str]:
    """Workers a router of the service lists that no live pod of the service is."""
    live = {f"http://{p.status.pod_ip}:{env.engine_port(service)}" for r in ("prefill", "decode")
            for p in env.pods(service, r) if p.status.pod_ip}
    return [url for workers in router_listing(env, service, ready_only=False).values() for url in workers
            if url not in live]


def router_listing(env: LabServices, service: str, ready_only: bool = True) -> dict[str, dict[str, bool]]:
    """Each (Ready) router pod of the service: the workers its `GET /workers` lists (both routers give each
    worker's url), URL -> healthy."""
    listing = {}
    for router in env.pods(service, "router"):
        if ready_only and not _ready(router):
            continue
        try:
            with urllib.request.urlopen(f"http://{router.status.pod_ip}:{env.router_port(service)}/workers",
                                        timeout=2) as answer:
                listed = json.loads(answer.read()).get("workers") or []
        except (OSError, ValueError):
            continue
        listing[router.metadata.name] = {w.get("url", "").rstrip("/"): w.get("is_healthy") is not False
                                         for w in listed}
    return listing


async def until_listed(env: LabServices, service: str, url: str, healthy: bool, timeout_s: float) -> float | None:
    """Seconds until every Ready router of the service lists `url` healthy (`healthy`) or keeps it out (not
    listed, or listed unhealthy); None if not within `timeout_s`."""
    started = time.time()
    while time.time() < started + timeout_s:
        listing = await asyncio.to_thread(router_listing, env, service)
        if listing and all(workers.get(url, False) == healthy for workers in listing.values()):
            return round(time.time() - started, 1)
        await asyncio.sleep(0.5)
    return None


async def until_routers_clean(env: LabServices, service: str, timeout_s: float = 30.0) -> list[str]:
    """Waits until no router of the service lists a worker that is no live pod; what is left at the end."""
    end = time.time() + timeout_s
    stale = await asyncio.to_thread(stale_router_workers, env, service)
    while stale and time.time() < end:
        await asyncio.sleep(1.0)
        stale = await asyncio.to_thread(stale_router_workers, env, service)
    return stale


def pool_counts(env: LabServices, service: str) -> dict[str, int]:
    return {role: len(env.pods(service, role)) for role in ("prefill", "decode")}


# -- events

def kill_one(role: str) -> Event:
    """SIGKILL of one engine of `role` (the lab's fault `kill`: the kubelet restarts it in place)."""

    async def event(env: LabServices, service: str) -> Marked:
        counts = await asyncio.to_thread(pool_counts, env, service)
        victim = sorted(p.metadata.name for p in await asyncio.to_thread(env.pods, service, role))[0]
        answer = await asyncio.to_thread(env.lab.put, f"/fault/{env.namespace}/{victim}", {"fault": "kill"})
        started = float(answer["applied_at_unix"])
        await asyncio.sleep(1.0)
        ended = await until_whole(env, service, counts)
        replaced = victim not in {p.metadata.name for p in await asyncio.to_thread(env.pods_left, service, role)}
        left = [p for r in ("prefill", "decode") for p in await asyncio.to_thread(env.pods_left, service, r)]
        restarts = sum(int(s.restart_count or 0) for p in left for s in p.status.container_statuses or [])
        stale = await until_routers_clean(env, service)
        return Marked(started, ended, frozenset({f"{env.namespace}/{victim}"}),
                      {"victim_replaced": replaced, "restarts_left": restarts,
                       "stale_router_workers": len(stale), "routers_clean_s": round(time.time() - started, 1)})

    return event


def stops_answering(role: str, for_s: float) -> Event:
    """One engine of `role` answers 503 to every request and to /health for `for_s` (the lab's fault
    `unhealthy`: the same engine; its pod turns NotReady after the readiness probe's failures), then answers
    again. Notes how long until every router kept it out (`out_s`) and listed it healthy again after the
    recovery (`listed_again_s`); `served_again_s` (from the client's answers) is added by `count`."""

    async def event(env: LabServices, service: str) -> Marked:
        counts = await asyncio.to_thread(pool_counts, env, service)
        pods = sorted(await asyncio.to_thread(env.pods, service, role), key=lambda p: p.metadata.name)
        victim, url = pods[0].metadata.name, f"http://{pods[0].status.pod_ip}:{env.engine_port(service)}"
        fault = f"/fault/{env.namespace}/{victim}"
        started = float((await asyncio.to_thread(env.lab.put, fault, {"fault": "unhealthy"}))["applied_at_unix"])
        out_s = await until_listed(env, service, url, False, for_s)
        await asyncio.sleep(max(0.0, started + for_s - time.time()))
        recovered = float((await asyncio.to_thread(env.lab.put, fault, {"fault": None}))["applied_at_unix"])
        listed_again_s = await until_listed(env, service, url, True, SETTLE_S)
        ended = await until_whole(env, service, counts)
        return Marked(started, ended, frozenset({f"{env.namespace}/{victim}"}),
                      {"out_s": out_s, "listed_again_s": listed_again_s}, recovered_at=recovered)

    return event


def scale_down(role: str, by: int) -> Event:
    """The pool's `spec.<role>.replicas` lowered by `by`."""

    async def event(env: LabServices, service: str) -> Marked:
        counts = await asyncio.to_thread(pool_counts, env, service)
        counts[role] -= by
        started = time.time()
        await asyncio.to_thread(
            env.session.cluster.custom.patch_namespaced_custom_object, GROUP, VERSION, env.namespace, PLURAL, service,
            {"spec": {role: {"replicas": counts[role]}}}, _content_type="application/merge-patch+json")
        return Marked(started, await until_whole(env, service, counts))

    return event


def _drainable(env: LabServices, pods: list[Any]) -> list[str]:
    """The nodes of `pods`, leaving one node of their selector's nodes schedulable (the replacements must
    have somewhere to go: the PodDisruptionBudget would hold the last eviction until the drain's timeout)."""
    nodes = sorted({p.spec.node_name for p in pods if p.spec.node_name})
    selector = ",".join(f"{k}={v}" for k, v in sorted((pods[0].spec.node_selector or {}).items())) if pods else ""
    same_kind = env.session.cluster.core.list_node(label_selector=selector).items if selector else []
    spare = [n.metadata.name for n in same_kind if n.metadata.name not in nodes and not n.spec.unschedulable]
    return nodes if spare else nodes[:-1]


def drain_nodes(role: str) -> Event:
    """`kubectl drain` of the nodes holding the service's `role` workers in one command (all but one when no
    other node of their kind is left for the replacements), limited to this service's pods (the nodes are
    shared), through the eviction API: the pool's PodDisruptionBudget lets one worker go at a time. Notes
    how many of the pool's workers were unavailable at most (sampled every 0.5 s); uncordoned after."""

    async def event(env: LabServices, service: str) -> Marked:
        counts = await asyncio.to_thread(pool_counts, env, service)
        pods = await asyncio.to_thread(env.pods, service, role)
        nodes = await asyncio.to_thread(_drainable, env, pods)
        on_nodes = [p for p in pods if p.spec.node_name in nodes]
        unavailable: list[int] = [0]
        done = asyncio.Event()

        def sample() -> int:
            live = [p for p in env.pods_left(service, role) if _ready(p) and not p.metadata.deletion_timestamp]
            return counts[role] - len(live)

        async def watch() -> None:
            while not done.is_set():
                unavailable.append(await asyncio.to_thread(sample))
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        kubectl = env.session.kubectl
        started = time.time()
        try:
            drained = await asyncio.to_thread(
                kubectl, "drain", *nodes, f"--pod-selector=disagg.dev/service={service},{MANAGED_SELECTOR}",
                "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s", check=False, timeout=150)
            drain_s = time.time() - started
            ended = await until_whole(env, service, counts)
        finally:
            done.set()
            await watcher
            await asyncio.to_thread(kubectl, "uncordon", *nodes, check=False)
        return Marked(started, ended, notes={"nodes": len(nodes), "workers_on_nodes": len(on_nodes),
                                             "max_unavailable": max(unavailable), "drain_s": round(drain_s, 1),
                                             "drain_exit": drained.returncode})

    return event
