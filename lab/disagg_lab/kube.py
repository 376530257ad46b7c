"""The lab's view of the cluster: list + watch of pods and InferenceServices in threads, handed to an
asyncio loop as observations. Talks to a loopback API server only (the local cluster), unless told
otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from disagg import GROUP, PLURAL, VERSION
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


class Watcher(threading.Thread):
    """List + watch one kind in one scope, forever (until `stop`), re-listing after every watch window.

    Every API call has a server-side and a client-side timeout; errors back off up to 10 s.
    """

    def __init__(self, kind: Literal["pods", "services"], namespace: str | None, make_client: Callable[[], Any],
                 post: Callable[[Event], None], stop: threading.Event, window_s: int = 60,
                 selector: str = POD_SELECTOR, convert: Callable[[Any], Any] | None = None) -> None:
        super().__init__(name=f"watch-{kind}-{namespace or 'all'}", daemon=True)
        self.kind: Literal["pods", "services"] = kind
        self.namespace = namespace
        self.selector = selector
        self.convert = convert
        self.make_client = make_client
        self.post = post
        self.stop_event = stop
        self.window_s = window_s

    def _list_fn(self, client: Any) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        from kubernetes import client as kclient

        if self.kind == "pods":
            core = kclient.CoreV1Api(client)
            if self.namespace is None:
                return core.list_pod_for_all_namespaces, (), {"label_selector": self.selector}
            return core.list_namespaced_pod, (self.namespace,), {"label_selector": self.selector}
        custom = kclient.CustomObjectsApi(client)
        if self.namespace is None:
            return custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL), {}
        return custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL), {}

    def _convert(self, obj: Any) -> Any:
        if self.convert is not None:
            return self.convert(obj)
        if self.kind == "pods":
            return pod_observation(obj)
        return service_observation(obj)

    def run(self) -> None:
        from kubernetes import watch as kwatch
        from kubernetes.client.exceptions import ApiException

        watch: Any = kwatch

        backoff = 1.0
        client: Any = None
        while not self.stop_event.is_set():
            try:
                if client is None:
                    client = self.make_client()
                fn, args, kwargs = self._list_fn(client)
                listing = fn(*args, **kwargs, _request_timeout=(5, 30))
                if self.kind == "pods":
                    items = [self._convert(p) for p in listing.items]
                    version = listing.metadata.resource_version
                else:
                    items = [self._convert(o) for o in listing.get("items", [])]
                    version = (listing.get("metadata") or {}).get("resourceVersion")
                self.post(Event(self.kind, "SYNC", self.namespace, tuple(i for i in items if i is not None)))
                stream = watch.Watch()
                for event in stream.stream(fn, *args, **kwargs, resource_version=version,
                                           timeout_seconds=self.window_s, _request_timeout=(5, self.window_s + 10)):
                    if self.stop_event.is_set():
                        stream.stop()
                        break
                    kind = event.get("type")
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: re-list
                    if kind not in ("ADDED", "MODIFIED", "DELETED"):
                        continue
                    item = self._convert(event["object"])
                    if item is not None:
                        self.post(Event(self.kind, str(kind), None, (item,)))
                backoff = 1.0
            except ApiException as error:
                if error.status != 410:
                    log.warning("watch %s (%s): API error %s %s", self.kind, self.namespace or "all namespaces",
                                error.status, error.reason)
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            except RuntimeError:
                return  # the event loop is gone
            except Exception as error:
                log.warning("watch %s (%s): %s: %s", self.kind, self.namespace or "all namespaces",
                            type(error).__name__, error)
                client = None
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)


