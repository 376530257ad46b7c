"""`disagg-lab load`: real OpenAI requests to a service's endpoint, as a user's client sends them.

The client is the `openai` package (streaming completions or chat completions). The local cluster has no
kube-proxy, and the API server refuses loopback pod IPs in EndpointSlices (hack/cluster.py runs no
EndpointSlice controller), so the client's transport does both jobs: `ServiceEndpoints` computes the
Service's ready endpoints as the EndpointSlice controller would (pods matching the Service's selector,
Ready and not terminating, at the container port its `targetPort` names), re-read every half second, and
`EndpointTransport` sends each request on a new connection to one of them chosen at random, as kube-proxy
balances connections. The request keeps the Service's name as its Host.

Load: a constant rate, steps (`0s@2,30s@8`), or a trace replay (arrival times and prompt/output lengths of
an Azure CSV or Mooncake JSONL trace, time-scaled), Poisson or uniform arrivals, bounded by a duration and
a request count. Per request: when it was sent, HTTP status or error, time to first token, inter-token
latencies, tokens, and which prefill and decode pods served it (headers the simulated engines add and
the routers pass back). `--out FILE` writes one JSON line per request as it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx2 as httpx
import numpy as np
import openai

from disagg.capacity.traces import read_trace, scale_time
from disagg_lab.kube import admin_client
from disagg_lab.offered import LoadError, default_traces_dir, parse_duration, parse_rate, resolve_trace
from disagg_lab.protocol import DECODE_POD_HEADER, KV_HEADER, PREFILL_POD_HEADER, WORDS

log = logging.getLogger("disagg_lab.load")

MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
REFRESH_S = 0.5


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    pod: str


class ServiceEndpoints:
    """A Service's ready endpoints, kept current by a thread that re-reads the Service and its pods."""

    def __init__(self, make_client: Callable[[], Any], namespace: str, service: str, port: str | int = "http",
                 ready_for_s: float = 0.0) -> None:
        self.make_client = make_client
        self.ready_for_s = ready_for_s
        """A pod is an endpoint once Ready this long (0: at once), as a Service's endpoints reach the clients'
        proxies a moment after the pod turns Ready; on the local cluster kwok also reports a new pod Ready
        before the lab's probe has run, for a moment."""
        self.namespace = namespace
        self.service = service
        self.port = port
        self.endpoints: list[Endpoint] = []
        self.history: list[tuple[float, int]] = []
        """(unix time, number of ready endpoints) at every change."""
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def read(self, api: Any) -> list[Endpoint]:
        from kubernetes import client as kclient

        core: Any = kclient.CoreV1Api(api)
        svc = core.read_namespaced_service(self.service, self.namespace, _request_timeout=5)
        ports = svc.spec.ports or []
        chosen = next((p for p in ports if p.name == self.port or p.port == self.port), ports[0] if ports else None)
        if chosen is None or not svc.spec.selector:
            return []
        selector = ",".join(f"{k}={v}" for k, v in sorted(svc.spec.selector.items()))
        pods: list[Any] = core.list_namespaced_pod(self.namespace, label_selector=selector, _request_timeout=5).items
        out = []
        for pod in pods:
            status = pod.status
            if pod.metadata.deletion_timestamp is not None or status is None or not status.pod_ip:
                continue
            ready = next((c for c in status.conditions or [] if c.type == "Ready" and c.status == "True"), None)
            if ready is None:
                continue
            since = ready.last_transition_time
            if self.ready_for_s and since is not None and time.time() - since.timestamp() < self.ready_for_s:
                continue
            target = chosen.target_port if chosen.target_port is not None else chosen.port
            if isinstance(target, str) and not target.isdigit():
                named = {p.name: p.container_port for c in pod.spec.containers for p in c.ports or []}
                if target not in named:
                    continue
                target = named[target]
            out.append(Endpoint(status.pod_ip, int(target), pod.metadata.name))
        return sorted(out, key=lambda e: e.pod)

    def start(self) -> ServiceEndpoints:
        api = self.make_client()
        self.refresh(api)
        self._thread = threading.Thread(target=self._run, args=(api,), daemon=True,
                                        name=f"endpoints-{self.namespace}-{self.service}")
        self._thread.start()
        return self

    def refresh(self, api: Any) -> None:
        try:
            endpoints = self.read(api)
            self.error = None
        except Exception as error:  # shown with the results; the last known endpoints stay
            self.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            return
        with self._lock:
            if len(endpoints) != len(self.endpoints) or not self.history:
                self.history.append((time.time(), len(endpoints)))
            self.endpoints = endpoints

    def _run(self, api: Any) -> None:
        while not self._stop.wait(REFRESH_S):
            self.refresh(api)

    def pick(self) -> Endpoint | None:
        with self._lock:
            return random.choice(self.endpoints) if self.endpoints else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class EndpointTransport(httpx.AsyncBaseTransport):
    """Sends every request on a new connection to a random ready endpoint of the Service."""

    def __init__(self, endpoints: ServiceEndpoints) -> None:
        self.endpoints = endpoints
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        endpoint = self.endpoints.pick()
        if endpoint is None:
            raise httpx.ConnectError(f"service {self.endpoints.namespace}/{self.endpoints.service} has no ready "
                                     "endpoints", request=request)
        request.url = request.url.copy_with(host=endpoint.ip, port=endpoint.port)
        request.extensions = {**request.extensions, "endpoint": endpoint.pod}
        response = await self.inner.handle_async_request(request)
        response.extensions = {**response.extensions, "endpoint": endpoint.pod}
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Result:
    """One request as the client saw it."""

    index: int
    sent_at: float
    """Unix time."""
    prompt_tokens: int
    max_tokens: int
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    duration_s: float | None = None
    prefill_pod: str = ""
    decode_pod: str = ""
    kv: str = ""
    endpoint: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.tokens == self.max_tokens

    def mean_itl_s(self) -> float | None:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["itl_s"] = [round(x, 5) for x in self.itl_s]
        out["mean_itl_s"] = self.mean_itl_s()
        out["ok"] = self.ok
        return out


@dataclass(frozen=True)
class Schedule:
    """When requests are sent, and their sizes."""

    steps: tuple[tuple[float, float], ...] = ()
    """(seconds from the start, requests/s)."""
    trace: tuple[tuple[float, int, int], ...] = ()
    """(seconds from the start, prompt tokens, output tokens) of a replay."""
    prompt_tokens: int = 256
    output_tokens: int = 64
    arrivals: str = "poisson"

    def plan(self, duration_s: float, max_requests: int, seed: int) -> list[tuple[float, int, int]]:
        """(offset, prompt, output) of every request, in time order."""
        if self.trace:
            return [t for t in self.trace if t[0] < duration_s][:max_requests]
        rng = np.random.default_rng(seed)
        out: list[tuple[float, int, int]] = []
        for index, (start, rate) in enumerate(self.steps):
            end = self.steps[index + 1][0] if index + 1 < len(self.steps) else duration_s
            end = min(end, duration_s)
            t = start
            while rate > 0 and len(out) < max_requests:
                t += rng.exponential(1.0 / rate) if self.arrivals == "poisson" else 1.0 / rate
                if t >= end:
                    break
                out.append((t, self.prompt_tokens, self.output_tokens))
        return sorted(out)[:max_requests]


def parse_steps(text: str) -> tuple[tuple[float, float], ...]:
    """`0s@2,30s@8` (times from the start, requests/s) or a single rate."""
    if "@" not in text:
        value, multiple = parse_rate(text)
        if multiple:
            raise LoadError("the client's rates are requests/s (no 4x multiples)")
        return ((0.0, value),)
    steps = []
    for item in text.split(","):
        at, _, rate = item.partition("@")
        value, multiple = parse_rate(rate)
        if multiple:
            raise LoadError("the client's rates are requests/s (no 4x multiples)")
        steps.append((parse_duration(at), value))
    if any(b[0] <= a[0] for a, b in itertools.pairwise(steps)):
        raise LoadError(f"steps in {text!r} must be given in increasing time order")
    return tuple(steps)


def trace_schedule(spec: str, max_output: int, max_prompt: int) -> tuple[tuple[float, int, int], ...]:
    """`PATH[:time-scale]`: the trace's arrivals and sizes, output and prompt lengths capped."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        with contextlib.suppress(ValueError):
            scale, path = float(tail), head
    workload = scale_time(read_trace(resolve_trace(path, default_traces_dir())), scale)
    return tuple((float(a), min(int(p), max_prompt), min(max(int(o), 1), max_output))
                 for a, p, o in zip(workload.arrivals, workload.prompt_tokens, workload.output_tokens, strict=True))


def prompt_text(tokens: int, index: int) -> str:
    """A prompt of `tokens` words (the simulated tokenizer's tokens), different per request."""
    return " ".join(WORDS[(index + i) % len(WORDS)] for i in range(max(1, tokens)))


class LoadClient:
    """Sends a schedule of requests through the Service's endpoints with the openai client."""

    def __init__(self, endpoints: ServiceEndpoints, *, api: str = "completions", model: str | None = None,
                 timeout_s: float = 120.0, out: TextIO | None = None) -> None:
        self.endpoints = endpoints
        self.api = api
        self.model = model
        self.timeout_s = timeout_s
        self.out = out
        self.results: list[Result] = []
        self.http = httpx.AsyncClient(transport=EndpointTransport(endpoints), timeout=timeout_s)
        base = f"http://{endpoints.service}.{endpoints.namespace}.svc:80/v1"
        self.client = openai.AsyncOpenAI(api_key="disagg-lab", base_url=base, http_client=self.http, max_retries=0)

    async def model_name(self) -> str:
        if self.model is None:
            models = await self.client.models.list()
            self.model = models.data[0].id
        return self.model

    async def one(self, index: int, prompt: int, output: int) -> Result:
        result = Result(index, time.time(), prompt, output)
        loop = asyncio.get_running_loop()
        start = loop.time()
        last: float | None = None
        try:
            model = await self.model_name()
            text = prompt_text(prompt, index)
            request: Any
            if self.api == "chat":
                request = self.client.chat.completions.with_streaming_response.create(
                    model=model, messages=[{"role": "user", "content": text}], max_tokens=output, stream=True,
                    stream_options={"include_usage": True})
            else:
                request = self.client.completions.with_streaming_response.create(
                    model=model, prompt=text, max_tokens=output, stream=True, stream_options={"include_usage": True})
            async with request as response:
                result.status = response.status_code
                headers = response.headers
                result.prefill_pod = headers.get(PREFILL_POD_HEADER, "")
                result.decode_pod = headers.get(DECODE_POD_HEADER, "")
                result.kv = headers.get(KV_HEADER, "")
                result.endpoint = str(response.http_request.url.host)
                stream = await response.parse()
                async for chunk in stream:
                    choices = getattr(chunk, "choices", None) or []
                    piece = ""
                    if choices:
                        choice = choices[0]
                        delta = getattr(choice, "delta", None)
                        piece = (delta.content or "") if delta is not None else (getattr(choice, "text", "") or "")
                    if not piece:
                        continue
                    now = loop.time()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    result.tokens += 1
        except openai.APIStatusError as error:
            result.status = error.status_code
            result.error = f"HTTP {error.status_code}: {str(error.message)[:200]}"
        except (TimeoutError, openai.APIError, httpx.HTTPError, OSError) as error:
            result.error = f"{type(error).__name__}: {str(error)[:200]}"
        result.duration_s = loop.time() - start
        if result.error is None and result.tokens != output:
            result.error = f"got {result.tokens} of {output} tokens"
        self.results.append(result)
        if self.out is not None:
            self.out.write(json.dumps(result.record()) + "\n")
            self.out.flush()
        return result

    async def run(self, plan: list[tuple[float, int, int]], max_in_flight: int = 512) -> list[Result]:
        """Sends every planned request at its offset (bounded in flight); waits for all to end."""
        loop = asyncio.get_running_loop()
        origin = loop.time()
        gate = asyncio.Semaphore(max_in_flight)
        tasks: list[asyncio.Task[Result]] = []

        async def send(index: int, prompt: int, output: int) -> Result:
            async with gate:
                return await self.one(index, prompt, output)

        for index, (offset, prompt, output) in enumerate(plan):
            delay = origin + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(index, prompt, output)))
        if tasks:
            await asyncio.wait(tasks, timeout=self.timeout_s + 30)
        return self.results

    async def close(self) -> None:
        await self.client.close()
        await self.http.aclose()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[Result], seconds: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error.split(":")[0] if r.error else f"HTTP {r.status}"
            errors[key] = errors.get(key, 0) + 1
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    pairs: dict[str, int] = {}
    for r in ok:
        pairs[f"{r.prefill_pod or '-'} -> {r.decode_pod or '-'} ({r.kv})"] = pairs.get(
            f"{r.prefill_pod or '-'} -> {r.decode_pod or '-'} ({r.kv})", 0) + 1

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000.0, 1)

    return {
        "requests": len(results), "ok": len(ok), "errors": errors,
        "rps": round(len(results) / seconds, 3) if seconds > 0 else None,
        "ttft_ms": {q: ms(percentile(ttft, float(q[1:]))) for q in ("p50", "p90", "p99")},
        "itl_ms": {q: ms(percentile(itl, float(q[1:]))) for q in ("p50", "p90", "p99")},
        "kv": {kind: sum(1 for r in ok if r.kv == kind) for kind in sorted({r.kv for r in ok})},
        "served_by": dict(sorted(pairs.items())),
    }


def load_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg-lab load",
        description="Real OpenAI requests (the openai package, streaming) to an InferenceService's endpoint on the "
                    "local cluster, through the Service's ready endpoints as kube-proxy would route them.")
    parser.add_argument("-n", "--namespace", required=True)
    parser.add_argument("service", help="the InferenceService (its Service has the same name)")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--rate", default="1", help="requests/s, or steps: 0s@2,30s@8 (default 1)")
    parser.add_argument("--trace", default=None, metavar="PATH[:SCALE]",
                        help="replay a trace's arrivals and sizes instead of --rate")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-output-tokens", type=int, default=512, help="cap of a trace's output lengths")
    parser.add_argument("--max-prompt-tokens", type=int, default=16384, help="cap of a trace's prompt lengths")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending (default 30)")
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--api", choices=("completions", "chat"), default="completions")
    parser.add_argument("--model", default=None, help="default: the first of the endpoint's /v1/models")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="one JSON line per request")
    return parser


def load_main(argv: list[str]) -> int:
    args = load_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s load: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "openai", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        duration = min(max(args.duration, 0.0), MAX_DURATION_S)
        count = min(max(args.max_requests, 0), MAX_REQUESTS)
        if args.trace:
            schedule = Schedule(trace=trace_schedule(args.trace, args.max_output_tokens, args.max_prompt_tokens))
        else:
            if args.prompt_tokens < 1 or args.output_tokens < 1:
                raise LoadError("--prompt-tokens and --output-tokens must be >= 1")
            schedule = Schedule(steps=parse_steps(args.rate), prompt_tokens=args.prompt_tokens,
                                output_tokens=args.output_tokens, arrivals=args.arrivals)
    except (LoadError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plan = schedule.plan(duration, count, args.seed)
    endpoints = ServiceEndpoints(lambda: admin_client(args.kubeconfig), args.namespace, args.service).start()

    async def go() -> list[Result]:
        out = open(args.out, "a") if args.out else None  # noqa: SIM115
        client = LoadClient(endpoints, api=args.api, model=args.model, timeout_s=args.timeout, out=out)
        try:
            return await client.run(plan, args.max_in_flight)
        finally:
            await client.close()
            if out is not None:
                out.close()

    started = time.time()
    try:
        results = asyncio.run(go())
    finally:
        endpoints.stop()
    summary = summarize(results, max(time.time() - started, 1e-9))
    summary["endpoints"] = [[round(t - started, 2), n] for t, n in endpoints.history]
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] == summary["requests"] else 1


def iter_results(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON lines `--out` wrote."""
    with path.open() as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


class BackgroundLoad:
    """Poisson requests at a rate that can change while they run (a thread with its own event loop), for
    tests and the demo; bounded in time and count."""

    def __init__(self, endpoints: ServiceEndpoints, *, prompt_tokens: int, output_tokens: int, rate: float,
                 max_s: float = 1800.0, max_requests: int = 50_000, seed: int = 0, api: str = "completions") -> None:
        self.endpoints = endpoints
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.rate = rate
        self.max_s = max_s
        self.max_requests = max_requests
        self.rng = random.Random(seed)
        self.api = api
        self.results: list[Result] = []
        self.changes: list[tuple[float, float]] = [(time.time(), rate)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_rate(self, rate: float) -> float:
        """The new rate from now on; when it was set (unix time)."""
        self.rate = rate
        at = time.time()
        self.changes.append((at, rate))
        return at

    def start(self) -> BackgroundLoad:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True, name="background-load")
        self._thread.start()
        return self

    async def _run(self) -> None:
        client = LoadClient(self.endpoints, api=self.api, timeout_s=60.0)
        client.results = self.results
        tasks: set[asyncio.Task[Result]] = set()
        started = time.monotonic()
        sent = 0
        try:
            while not self._stop.is_set() and time.monotonic() - started < self.max_s and sent < self.max_requests:
                rate = self.rate
                if rate <= 0:
                    await asyncio.sleep(0.1)
                    continue
                await asyncio.sleep(min(self.rng.expovariate(rate), 1.0))
                if self._stop.is_set():
                    break
                task = asyncio.create_task(client.one(sent, self.prompt_tokens, self.output_tokens))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if tasks:
                await asyncio.wait(tasks, timeout=70.0)
        finally:
            await client.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=90)

    def since(self, at: float) -> list[Result]:
        return [r for r in list(self.results) if r.sent_at >= at]


def ask_main(argv: list[str]) -> int:
    """`disagg-lab ask`: one streamed chat answer through the service's endpoint, printed as it comes."""
    parser = argparse.ArgumentParser(prog="disagg-lab ask",
                                     description="Stream one chat answer from an InferenceService's endpoint.")
    parser.add_argument("-n", "--namespace", required=True)
    parser.add_argument("service")
    parser.add_argument("prompt", nargs="+")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    for noisy in ("httpx", "httpx2", "openai", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    endpoints = ServiceEndpoints(lambda: admin_client(args.kubeconfig), args.namespace, args.service).start()

    async def go() -> int:
        client = LoadClient(endpoints, api="chat")
        loop = asyncio.get_running_loop()
        started = loop.time()
        first: float | None = None
        tokens = 0
        try:
            model = await client.model_name()
            request = client.client.chat.completions.with_streaming_response.create(
                model=model, messages=[{"role": "user", "content": " ".join(args.prompt)}],
                max_tokens=max(1, args.max_tokens), stream=True)
            async with request as response:
                headers = response.headers
                async for chunk in await response.parse():
                    for choice in chunk.choices:
                        if choice.delta.content:
                            first = first if first is not None else loop.time()
                            tokens += 1
                            print(choice.delta.content, end="", flush=True)
            elapsed = loop.time() - started
            itl = (loop.time() - first) / max(tokens - 1, 1) if first is not None else 0.0
            print(f"\n[{model}: {tokens} tokens, first after {((first or started) - started) * 1000:.0f} ms, then one "
                  f"every {itl * 1000:.1f} ms, {elapsed:.2f} s in all; prefill {headers.get(PREFILL_POD_HEADER, '?')}"
                  f" -> decode {headers.get(DECODE_POD_HEADER, '?')}, KV {headers.get(KV_HEADER, '?')}]")
            return 0
        except (openai.APIError, httpx.HTTPError, OSError) as error:
            print(f"\nerror: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    finally:
        endpoints.stop()
