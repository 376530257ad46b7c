"""The kopf layer, the only module that imports kopf: it watches the InferenceServices and runs the
`Operator` (kept in kopf's memo) from start-up to cleanup, and peering decides which replica acts.

InferenceServices are handled with raw watch events (`on.event`) and a resync thread instead of
kopf's create/update handlers: reconcile is level-triggered, so it needs no diff base, and kopf then
keeps no state annotations on the objects - a steady operator writes nothing at all. The children are
watched by the operator's own informers (`disagg.runtime.informers`), not by kopf.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import kopf

from disagg import GROUP, PLURAL, VERSION
from disagg.metrics import OperatorMetrics
from disagg.runtime.operator import Operator
from disagg.settings import OperatorSettings


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf computes a diff base (a deep copy of the body) on every watch event, for create/update
    handlers; this operator has none (raw events only), and those copies were ~15 % of its
    CPU while 1,000 services were created."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class NoProgress(kopf.ProgressStorage):
    """No handler of this operator keeps progress (see NoDiffBase): nothing to read, write or strip."""

    def fetch(self, *, key: Any, body: kopf.Body) -> Any:
        return None

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


def configure(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """kopf's own settings for this operator."""
    kopf_settings.posting.level = logging.INFO
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
    kopf_settings.persistence.progress_storage = NoProgress()
    # kopf logs "Handler ... succeeded" for every watch event: ~30,000 lines for 1,000 new services
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf_settings.execution.max_workers = settings.workers
    # No limit on kopf's per-object workers (it watches only the services, whose handlers just queue
    # work). Should kopf indexes ever come back: with a limit below the objects of one kind, kopf's
    # start-up hangs for good (each object's worker waits for all to be indexed; kopf#1243).
    kopf_settings.queueing.worker_limit = None
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.networking.request_timeout = 60
    if settings.peering is None:
        kopf_settings.peering.standalone = True
    else:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.mandatory = True
        kopf_settings.peering.clusterwide = not settings.namespaces
        kopf_settings.peering.priority = settings.priority
        # a dead active replica is noticed within this many seconds (its entry expires)
        kopf_settings.peering.lifetime = 15


def operator_of(memo: kopf.Memo) -> Operator:
    return cast(Operator, memo["operator"])


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # in a pod: its ServiceAccount token; elsewhere: $KUBECONFIG (kopf's pure-Python readers)
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings, operator_of(memo).settings)
    operator_of(memo).start()


def stop(memo: kopf.Memo, **_: Any) -> None:
    operator_of(memo).stop()


async def service_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    operator_of(memo).service_event(type, body)  # queues work only: kopf's workers are never held up


def build_registry() -> kopf.OperatorRegistry:
    """The handlers above, on a registry of their own (no module-level state)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry)(start)
    kopf.on.cleanup(registry=registry)(stop)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(service_event)
    return registry


def run(settings: OperatorSettings, metrics: OperatorMetrics) -> None:
    """Runs the operator of `settings` until it is stopped (a signal)."""
    operator = Operator.build(settings, metrics)
    liveness = f"http://{settings.listen_host}:{settings.liveness_port}/healthz" if settings.liveness_port else None
    asyncio.run(kopf.operator(
        registry=build_registry(),
        memo=kopf.Memo(operator=operator),
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        standalone=settings.peering is None,
        peering_name=settings.peering,
        priority=settings.priority,
        identity=settings.identity,  # type: ignore[arg-type]  # kopf's Identity is a NewType of str
        liveness_endpoint=liveness,
    ))
