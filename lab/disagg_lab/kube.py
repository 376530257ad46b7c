"""The lab's view of the cluster: list + watch of pods and InferenceServices in threads, handed to an
asyncio loop as observations. Talks to a loopback API server only (the local cluster), unless told
otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from disagg.kube.client import INFERENCE_SERVICE, POD, Kind, Kube
from disagg.kube.watch import KindWatch
from disagg.wellknown import LWS_WORKER_INDEX_LABEL, MANAGED_SELECTOR, ROLE_LABEL, ROLES, SERVICE_LABEL, Role
from disagg_lab.podspec import (
    DEFAULT_GRACE_S,
    Hook,
    ReadinessProbe,
    container_env,
    deletion_deadline,
    grace_seconds,
    prestop_hook,
    readiness_probe,
)

log = logging.getLogger("disagg_lab.kube")

POD_SELECTOR = f"{MANAGED_SELECTOR},{ROLE_LABEL} in ({','.join(ROLES)})"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def is_loopback(address: str) -> bool:
    """Whether `address` is an IPv4 loopback address (127.0.0.0/8)."""
    try:
        return ipaddress.ip_address(address) in LOOPBACK
    except ValueError:
        return False


def admin_client(kubeconfig: str | None, allow_remote: bool = False) -> Any:
    """An API client from a kubeconfig; refuses an API server that is not on loopback."""
    from kubernetes import config as kconfig

    loader: Any = kconfig.new_client_from_config
    api: Any = loader(config_file=kubeconfig)
    host = urlparse(api.configuration.host).hostname or ""
    if not allow_remote and host != "localhost" and not is_loopback(host):
        api.close()
        raise SystemExit(f"error: the API server {api.configuration.host} is not a loopback address; the lab "
                         "only talks to a local cluster")
    return api


@dataclass(frozen=True)
class PodObservation:
    """What the fleet needs to know about one pod."""

    uid: str
    namespace: str
    name: str
    service: str
    role: Role
    ip: str
    ready: bool
    deleting: bool = False
    args: tuple[str, ...] = ()
    """The engine container's command and arguments."""
    env: tuple[tuple[str, str], ...] = ()
    """The engine container's environment variables with literal values."""
    annotations: tuple[tuple[str, str], ...] = field(default=())
    running: bool = True
    """The pod's phase is Running (kwok started its container)."""
    image: str = ""
    finalizers: tuple[str, ...] = ()
    deadline: float | None = None
    """Being deleted: when the kubelet kills what still runs (unix time, the deletionTimestamp)."""
    grace_s: float = DEFAULT_GRACE_S
    prestop: Hook | None = None
    hook_env: tuple[tuple[str, str], ...] = ()
    """The engine container's environment as its hooks see it (literal values and the downward API)."""
    readiness: ReadinessProbe = field(default_factory=ReadinessProbe)
    restart_count: int = 0
    def env_value(self, name: str) -> str | None:
        return dict(self.env).get(name)

    def arg_value(self, flag: str) -> str | None:
        """The value after `flag` (or of `flag=value`) in the container's arguments."""
        for index, arg in enumerate(self.args):
            if arg == flag and index + 1 < len(self.args):
                return self.args[index + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None



def pod_observation(pod: Any) -> PodObservation | None:
    """A V1Pod as the fleet sees it; None for pods without our role/service labels."""
    meta = pod.metadata
    labels = meta.labels or {}
    role = labels.get(ROLE_LABEL)
    service = labels.get(SERVICE_LABEL)
    if role not in ROLES or not service:
        return None
    if labels.get(LWS_WORKER_INDEX_LABEL, "0") != "0":
        return None  # a multi-node worker's member: its leader serves the worker's HTTP and metrics
    status = pod.status
    conditions = (status.conditions or []) if status is not None else []
    ready = status is not None and status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in conditions
    )
    containers = (pod.spec.containers or []) if pod.spec is not None else []
    engine = containers[0] if containers else None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    hook_env: dict[str, str] = {}
    hook: Hook | None = None
    probe = ReadinessProbe()
    if engine is not None:
        args = tuple(str(a) for a in [*(engine.command or []), *(engine.args or [])])
        env = tuple((str(e.name), str(e.value)) for e in (engine.env or []) if e.value is not None)
        hook_env = container_env(pod, engine, strict=False)
        hook = prestop_hook(pod, engine, hook_env)
        probe = readiness_probe(engine)
    statuses = (status.container_statuses or []) if status is not None else []
    return PodObservation(
        uid=str(meta.uid), namespace=str(meta.namespace), name=str(meta.name), service=str(service),
        role="prefill" if role == "prefill" else "decode", ip=str((status.pod_ip if status else None) or ""),
        ready=bool(ready), deleting=meta.deletion_timestamp is not None, args=args, env=env,
        annotations=tuple(sorted((meta.annotations or {}).items())),
        running=status is not None and status.phase == "Running",
        image=str(engine.image or "") if engine is not None else "",
        finalizers=tuple(meta.finalizers or ()), deadline=deletion_deadline(pod), grace_s=grace_seconds(pod),
        prestop=hook, hook_env=tuple(sorted(hook_env.items())), readiness=probe,
        restart_count=max((int(c.restart_count or 0) for c in statuses), default=0),
    )


@dataclass(frozen=True)
class ServiceObservation:
    namespace: str
    name: str
    spec: Mapping[str, Any]


def service_observation(obj: Mapping[str, Any]) -> ServiceObservation:
    meta = obj.get("metadata") or {}
    return ServiceObservation(str(meta.get("namespace", "")), str(meta.get("name", "")), obj.get("spec") or {})


@dataclass(frozen=True)
class Event:
    """From a watch thread: a full listing of one scope (`sync`) or one change."""

    kind: Literal["pods", "services"]
    type: str
    """SYNC, ADDED, MODIFIED, DELETED."""
    scope: str | None
    """Namespace of a SYNC listing (None: all namespaces)."""
    items: tuple[Any, ...]


class Watcher:
    """One kind in one scope as fleet `Event`s, through the operator's own list-and-watch
    (`disagg.kube.watch.KindWatch`): a listing's pages gathered into one SYNC, then each change; until
    `stop` is set."""

    def __init__(self, kind: Literal["pods", "services"], namespace: str | None, make_client: Callable[[], Any],
                 post: Callable[[Event], None], stop: threading.Event, selector: str = POD_SELECTOR,
                 convert: Callable[[Any], Any] | None = None) -> None:
        self.kind: Literal["pods", "services"] = kind
        self.namespace = namespace
        self.selector = selector if kind == "pods" else ""
        self.convert = convert
        self.make_client = make_client
        self.post = post
        self.stop_event = stop
        self._listing: list[Any] = []
        self._kube: Kube | None = None

    def start(self) -> None:
        self._kube = Kube(self.make_client())
        watch = KindWatch(self._kube, WATCHED[self.kind], self.namespace, self.selector, self._listed, self._changed)
        watch.start()

        def close_on_stop() -> None:
            self.stop_event.wait()
            watch.close()

        threading.Thread(target=close_on_stop, daemon=True, name=f"watch-{self.kind}-stop").start()

    def _convert(self, obj: dict[str, Any]) -> Any:
        if self.kind == "services":
            return service_observation(obj)
        assert self._kube is not None
        pod = self._kube.api.deserialize(json.dumps(obj), "V1Pod", "application/json")
        return self.convert(pod) if self.convert is not None else pod_observation(pod)

    def _listed(self, kind: Kind, namespace: str | None, items: list[dict[str, Any]], last: bool) -> None:
        self._listing.extend(self._convert(obj) for obj in items)
        if last:
            listing, self._listing = self._listing, []
            self._post(Event(self.kind, "SYNC", namespace, tuple(i for i in listing if i is not None)))

    def _changed(self, kind: Kind, change: str, obj: dict[str, Any]) -> None:
        item = self._convert(obj)
        if item is not None:
            self._post(Event(self.kind, change, None, (item,)))

    def _post(self, event: Event) -> None:
        try:
            self.post(event)
        except RuntimeError:  # the event loop is gone: the fleet is stopping
            self.stop_event.set()


WATCHED: dict[str, Kind] = {"pods": POD, "services": INFERENCE_SERVICE}

