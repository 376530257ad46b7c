"""The kmock reconcile harness: an emulated API server, the operator's reconcile against it, and what it wrote."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from disagg.catalog.accelerators import load_catalog
from disagg.kube.client import Kube
from disagg.reconcile.run import Outcome, Reconciler, reconcile_service
from disagg.wellknown import FIELD_MANAGER
from support.kmock import ApplyingEmulator, Write, writes
from support.paths import REPO

EXAMPLE = REPO / "examples" / "01-vllm-nixl-llama70b.yaml"
NAMESPACE, NAME = "serving", "llama-70b"
ISVC = "disagg.dev/v1alpha1/inferenceservices"
SERVICES = "v1/services"
DEPLOYMENTS = "apps/v1/deployments"
NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
CATALOG = load_catalog()

# Every child of example 01, as `<plural>/<name>` (the path tail the writes are compared by).
CHILDREN = {
    f"serviceaccounts/{NAME}-router",
    f"roles/{NAME}-router",
    f"rolebindings/{NAME}-router",
    f"deployments/{NAME}-router",
    f"poddisruptionbudgets/{NAME}-router",
    f"services/{NAME}",
    f"services/{NAME}--metrics",
    f"deployments/{NAME}-prefill",
    f"deployments/{NAME}-decode",
    f"services/{NAME}--prefill-kv",
    f"services/{NAME}--decode-kv",
    f"poddisruptionbudgets/{NAME}-prefill",
    f"poddisruptionbudgets/{NAME}-decode",
    f"networkpolicies/{NAME}-engines",
}
CHILD_RESOURCES = (
    "v1/serviceaccounts",
    "rbac.authorization.k8s.io/v1/roles",
    "rbac.authorization.k8s.io/v1/rolebindings",
    DEPLOYMENTS,
    SERVICES,
    "policy/v1/poddisruptionbudgets",
    "networking.k8s.io/v1/networkpolicies",
)
STATUS = f"inferenceservices/{NAME}/status"

Event = tuple[str, str, str]  # (type, reason, message)


@dataclass
class Harness:
    """The emulated API server, a real `Kube` pointed at it, and a reconciler with a fake recorder."""

    api: ApplyingEmulator
    kube: Kube
    events: list[Event] = field(default_factory=list)
    applier: Executor | None = None

    @property
    def reconciler(self) -> Reconciler:
        return Reconciler(kube=self.kube, catalog=CATALOG, record_event=self._record, clock=lambda: NOW,
                          applier=self.applier)

    def _record(self, obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        self.events.append((event_type, reason, message))

    def service(self) -> dict[str, Any]:
        body = self.api.get_object(ISVC, NAMESPACE, NAME)
        assert body is not None
        return body

    async def reconcile(self) -> tuple[Outcome, list[Write]]:
        """One reconcile of the stored InferenceService; what it did and the writes kmock received."""
        body = self.service()
        mark = self.api.mark()
        outcome = await asyncio.to_thread(reconcile_service, self.reconciler, body)
        return outcome, writes(self.api.requests_since(mark))

    def edit(self, change: dict[str, Any]) -> None:
        """A user's edit of the spec (merged in), with the generation bump the API server makes."""
        obj = self.api.objects[ISVC, NAMESPACE, NAME]
        generation = int(obj["metadata"]["generation"]) + 1
        obj.patch({"spec": change, "metadata": {"generation": generation}})

    def children(self) -> dict[str, dict[str, Any]]:
        """All live objects of the child kinds in the namespace, by `<plural>/<name>`."""
        found: dict[str, dict[str, Any]] = {}
        for resource in CHILD_RESOURCES:
            for obj in self.api.live(resource, NAMESPACE):
                found[f"{resource.rsplit('/', 1)[1]}/{obj['metadata']['name']}"] = obj
        return found


def example() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return manifest


def applied(found: list[Write], manager: str = FIELD_MANAGER) -> set[str]:
    return {w.name for w in found if w.method == "PATCH" and w.field_manager == manager and not claim(w)}


def created(found: list[Write]) -> set[str]:
    return {w.name for w in found if w.method == "POST"}


def claim(write: Write) -> bool:
    """The JSON patch that turns the fields of a create into the operator's applied fields."""
    return write.content_type.startswith("application/json-patch+json")


def child_writes(found: list[Write]) -> list[Write]:
    """Writes of children, without the one claim of a created child's fields before its first apply."""
    return [w for w in found if not w.name.startswith("inferenceservices/") and not claim(w)]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def managers_of_replicas(deployment: dict[str, Any]) -> set[str]:
    return {
        e["manager"] for e in deployment["metadata"].get("managedFields", [])
        if "f:replicas" in e.get("fieldsV1", {}).get("f:spec", {})
    }


@pytest.fixture()
async def harness(kmock: ApplyingEmulator) -> AsyncIterator[Harness]:
    configuration = k8s.Configuration()
    configuration.host = str(kmock.url).rstrip("/")
    with k8s.ApiClient(configuration) as api_client:
        yield Harness(api=kmock, kube=Kube(api_client))
    assert kmock.errors == [], "the emulator failed to serve a request"


async def create_service(harness: Harness, manifest: dict[str, Any] | None = None) -> str:
    """Stores the InferenceService, reconciles it once (the create) and returns its uid."""
    stored = harness.api.put_object(ISVC, manifest or example())
    await harness.reconcile()
    return str(stored["metadata"]["uid"])


# --- (a) create ---------------------------------------------------------------------------------


