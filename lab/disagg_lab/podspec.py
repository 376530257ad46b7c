"""What the lab reads of a pod's spec as the kubelet would: the container's environment (literal values and
the downward API, `$(VAR)` expanded), its lifecycle hooks, its probes, and the pod's termination grace.

Used by both of the lab's kubelets: the router supervisor (`routers.py`) and the engines' (`kubelet.py`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_GRACE_S = 30.0
"""The API server's default terminationGracePeriodSeconds."""

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined variables are replaced, `$$` is a literal `$`, anything else
    stays as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _REFERENCE.sub(replace, text)


def field(pod: Any, path: str) -> str:
    """A downward-API fieldRef of the pod."""
    meta, spec, status = pod.metadata, pod.spec, pod.status
    simple = {
        "metadata.name": meta.name, "metadata.namespace": meta.namespace, "metadata.uid": meta.uid,
        "spec.nodeName": spec.node_name, "spec.serviceAccountName": spec.service_account_name,
        "status.podIP": status.pod_ip if status else None, "status.hostIP": status.host_ip if status else None,
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        values = (meta.labels if match.group(1) == "labels" else meta.annotations) or {}
        return str(values.get(match.group(2), ""))
    raise ValueError(f"unsupported fieldRef {path!r}")


def container_env(pod: Any, container: Any, strict: bool = True) -> dict[str, str]:
    """The container's environment as the kubelet builds it (literal values and fieldRefs). A Secret or
    ConfigMap reference is refused (`strict`) or left out: the lab reads neither."""
    env: dict[str, str] = {}
    for var in container.env or []:
        if var.value is not None:
            env[var.name] = expand(var.value, env)
        elif var.value_from is not None and var.value_from.field_ref is not None:
            try:
                env[var.name] = field(pod, var.value_from.field_ref.field_path)
            except ValueError:
                if strict:
                    raise
        elif var.value_from is not None:
            if strict:
                raise ValueError(f"env {var.name}: only literal values and fieldRefs are supported by the lab")
        else:
            env[var.name] = ""
    return env


@dataclass(frozen=True)
class Hook:
    """A container's preStop hook as the kubelet runs it: a command (exec) or a pause (sleep)."""

    command: tuple[str, ...] = ()
    sleep_s: float = 0.0


def prestop_hook(pod: Any, container: Any, env: Mapping[str, str]) -> Hook | None:
    """The container's preStop hook, `$(VAR)` expanded as the kubelet expands an exec command; None without
    one (an httpGet hook, which no pod of this project has, is read as none)."""
    lifecycle = container.lifecycle
    hook = lifecycle.pre_stop if lifecycle is not None else None
    if hook is None:
        return None
    if hook._exec is not None and hook._exec.command:
        return Hook(command=tuple(expand(part, env) for part in hook._exec.command))
    if hook.sleep is not None:
        return Hook(sleep_s=float(hook.sleep.seconds or 0))
    return None


def grace_seconds(pod: Any) -> float:
    """How long the kubelet gives the pod's containers from the deletion to SIGKILL: the deletion's own grace
    (`metadata.deletionGracePeriodSeconds`, a `kubectl delete --grace-period`) or the pod's."""
    meta, spec = pod.metadata, pod.spec
    if meta.deletion_grace_period_seconds is not None:
        return float(meta.deletion_grace_period_seconds)
    if spec is not None and spec.termination_grace_period_seconds is not None:
        return float(spec.termination_grace_period_seconds)
    return DEFAULT_GRACE_S


def deletion_deadline(pod: Any) -> float | None:
    """When the kubelet kills what still runs of a pod being deleted (unix time): its deletionTimestamp, which
    the API server sets to the deletion request's time plus its grace period; None while it is not deleted."""
    stamp = pod.metadata.deletion_timestamp
    if stamp is None:
        return None
    if isinstance(stamp, str):
        stamp = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return float(stamp.timestamp())


@dataclass(frozen=True)
class ReadinessProbe:
    """What the kubelet needs of a readiness probe to turn a pod NotReady and Ready again."""

    period_s: float = 10.0
    failure_threshold: int = 3
    success_threshold: int = 1


def readiness_probe(container: Any) -> ReadinessProbe:
    probe = container.readiness_probe
    if probe is None:
        return ReadinessProbe(period_s=1.0, failure_threshold=1, success_threshold=1)
    return ReadinessProbe(period_s=float(probe.period_seconds or 10),
                          failure_threshold=int(probe.failure_threshold or 3),
                          success_threshold=int(probe.success_threshold or 1))
