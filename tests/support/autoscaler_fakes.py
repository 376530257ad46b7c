"""Fakes of the autoscaler's surroundings: a Kubernetes client that records scales and a Prometheus that
answers from samples."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.kube.client import Kube
from disagg.scaling.loop import Autoscaler, Index
from disagg.scaling.policy import PolicySettings
from disagg.scaling.prometheus import PrometheusSource
from disagg.scaling.signals import QuerySet
from support.paths import REPO

EXAMPLE = REPO / "examples" / "01-vllm-nixl-llama70b.yaml"
NOW = 1_800_000_000.0


class FakeKube:
    """Records the autoscaler's writes."""

    def __init__(self) -> None:
        self.scaled: list[tuple[str, str, int, str]] = []
        self.status: list[tuple[str, str, dict[str, Any]]] = []

    def scale(self, namespace: str, name: str, replicas: int, field_manager: str, kind: object = None,
              uid: str | None = None) -> dict[str, Any]:
        assert uid == f"uid-{name}", "only the pool Deployment the service owns is scaled"
        self.scaled.append((namespace, name, replicas, field_manager))
        return {}

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.status.append((namespace, name, status))


class FakePrometheus:
    """A Prometheus query API on loopback: answers from a table keyed by query name, counts queries."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.answers: dict[str, list[dict[str, Any]]] = {}
        names = {promql: name for name, promql in QuerySet().queries().items()}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query).get("query", [""])[0]
                outer.queries.append(query)
                result = outer.answers.get(names.get(query, ""), [])
                body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    yield fake
    fake.stop()


def services(count: int) -> Index:
    body = yaml.safe_load(EXAMPLE.read_text())
    index = Index()
    for i in range(count):
        svc = json.loads(json.dumps(body))
        svc["metadata"].update(name=f"svc-{i}", namespace="ns", generation=1, uid=f"uid-svc-{i}")
        index.services[("ns", f"svc-{i}")] = svc
        for role in ("prefill", "decode"):
            index.deployments[("ns", f"svc-{i}-{role}")] = pool(f"svc-{i}-{role}", 2)
    return index


def pool(name: str, replicas: int, ready: int = 2) -> dict[str, Any]:
    """A pool Deployment as the index holds it (`pool_counts`), owned by its service."""
    service = name.rsplit("-", 1)[0]
    return {"metadata": {"uid": f"uid-{name}", "owners": [f"uid-{service}"]},
            "spec": {"replicas": replicas}, "status": {"readyReplicas": ready}}


def autoscaler(index: Index, source: PrometheusSource | None, kube: FakeKube) -> tuple[Autoscaler, list[Any]]:
    events: list[Any] = []
    scaler = Autoscaler(
        kube=cast(Kube, kube),
        catalog=DEFAULT_CATALOG,
        source=source,
        settings=PolicySettings(tick_s=5, scale_down_window_s=300, staleness_s=60),
        record_event=lambda obj, kind, reason, message: events.append((kind, reason, message)),
        index=index,
        lock_for=lambda ns, name: threading.Lock(),
        clock=lambda: NOW,
    )
    return scaler, events


def sample(service: str, role: str, value: float, **labels: str) -> dict[str, Any]:
    metric = {"namespace": "ns", "disagg_service": service, "disagg_role": role, **labels}
    return {"metric": metric, "value": [NOW, str(value)]}


