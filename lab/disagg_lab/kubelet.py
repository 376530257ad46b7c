"""The kubelet of the engine pods, as far as the lab plays it: what happens to an engine container when its pod
is deleted, when its process dies, and how its readiness shows in the pod.

kwok plays the kubelet's pod start (scheduling, an IP, Running and Ready) but finishes a deleted pod at once,
whatever its grace period. A real kubelet, on a graceful deletion, runs the container's preStop hook, sends
SIGTERM, waits for the process to exit for what remains of the grace period, kills it (SIGKILL) then, and only
then removes the pod. The lab does that for every engine pod it serves:

- it puts its finalizer `FINALIZER` on the pod when the engine starts, so that kwok cannot remove the pod
  before the lab says the container is gone (the local cluster's kwok stage skips pods with finalizers,
  `hack/cluster.py`), and takes it off when the engine has exited (or at the grace period's end);
- it runs the preStop hook for real: an exec command as a process with the container's environment (the
  engine is reached at the pod's IP, `$POD_IP`, as inside a pod where the engine listens on all interfaces),
  or a sleep; bounded by the grace period;
- SIGTERM is the engine's own shutdown (`engines.PrefillEngine.shutdown`): new requests are refused, what is
  in flight goes on for the engine's shutdown timeout (vLLM's `--shutdown-timeout`, 0 by default: abort at
  once; SGLang: until done), then the process exits; what is left at the grace period's end is killed;
- a killed engine process (the fault `kill`, or a crash) is restarted in place, as `restartPolicy: Always`
  does: the pod turns NotReady at once, its restartCount grows, and after `restart_s` (the engine loading
  its model again) a new engine process, with a new identity, serves at the same address and the pod is Ready
  again; a readiness probe that fails (the fault `unhealthy`) turns the pod NotReady after the probe's
  failure threshold, and Ready again after its success threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from disagg_lab.kube import PodObservation
from disagg_lab.podspec import Hook

log = logging.getLogger("disagg_lab.kubelet")

FINALIZER = "lab.disagg.dev/engine-container"
"""Held by the lab on every engine pod whose engine runs: the pod stays (Terminating) until its engine has
exited, as a real kubelet keeps a deleted pod until its containers stopped."""
DEFAULT_RESTART_S = 10.0
"""How long a restarted engine takes to load its model and answer again (real engines: minutes)."""
HOOK_OUTPUT_LIMIT = 2000


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """The engine container of one pod, as the lab's kubelet keeps it."""

    uid: str
    restarts: int = 0
    restart_at: float | None = None
    """Event-loop time when a restarted engine answers again (None: not restarting)."""
    exited: bool = False
    """The process ended for good (the pod is being deleted)."""
    terminating: asyncio.Task[None] | None = None
    finalized: bool = False
    """The lab's finalizer is on the pod."""
    ready: bool | None = None
    """The Ready condition the lab last wrote (None: kwok's, at the pod's start)."""
    probe_failures: int = 0
    probe_successes: int = 0
    next_probe: float = 0.0
    hook: dict[str, Any] = field(default_factory=dict)
    """What the preStop hook did (for /state): took, exit code, output."""


class PodApi:
    """The few writes the lab's kubelet makes: finalizers and the pod's readiness (strategic merge patches)."""

    def __init__(self, make_client: Callable[[], Any]) -> None:
        self._make_client = make_client
        self._core: Any = None

    def core(self) -> Any:
        from kubernetes import client as kclient

        if self._core is None:
            self._core = kclient.CoreV1Api(self._make_client())
        return self._core

    def _patch(self, namespace: str, name: str, body: dict[str, Any], status: bool = False) -> bool:
        from kubernetes.client.exceptions import ApiException

        core = self.core()
        call = core.patch_namespaced_pod_status if status else core.patch_namespaced_pod
        try:
            call(name, namespace, body, _request_timeout=10, _content_type="application/strategic-merge-patch+json")
            return True
        except ApiException as error:
            if error.status != 404:
                log.info("pod %s/%s: patch refused: %s %s", namespace, name, error.status, error.reason)
            return False
        except Exception as error:  # the API server may be restarting: the next observation retries
            log.info("pod %s/%s: patch failed: %s", namespace, name, str(error).splitlines()[0][:200])
            return False

    def add_finalizer(self, namespace: str, name: str) -> bool:
        return self._patch(namespace, name, {"metadata": {"finalizers": [FINALIZER]}})

    def remove_finalizer(self, namespace: str, name: str) -> bool:
        return self._patch(namespace, name, {"metadata": {"$deleteFromPrimitiveList/finalizers": [FINALIZER]}})

    def set_ready(self, namespace: str, name: str, ready: bool, restarts: int, reason: str, message: str) -> bool:
        condition = "True" if ready else "False"
        extra = {} if ready else {"reason": reason, "message": message[:300]}
        body = {"status": {
            "conditions": [{"type": kind, "status": condition, "lastTransitionTime": _now(), **extra}
                           for kind in ("Ready", "ContainersReady")],
            "containerStatuses": [{"name": "engine", "ready": ready, "started": ready, "restartCount": restarts}],
        }}
        return self._patch(namespace, name, body, status=True)


async def run_hook(hook: Hook, pod: PodObservation, timeout_s: float) -> dict[str, Any]:
    """Runs a preStop hook as the kubelet does (an exec command in the container's environment, or a sleep),
    at most `timeout_s`; what it did."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    if not hook.command:
        await asyncio.sleep(max(0.0, min(hook.sleep_s, timeout_s)))
        return {"sleep_s": hook.sleep_s, "took_s": round(loop.time() - started, 3)}
    env = {**dict(pod.hook_env), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    try:
        process = await asyncio.create_subprocess_exec(
            *hook.command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
    except OSError as error:
        return {"error": f"cannot run {hook.command[0]}: {error}", "took_s": 0.0}
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=max(0.0, timeout_s))
        code: int | None = process.returncode
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = await process.communicate()
        code = None
    return {"exit_code": code, "took_s": round(loop.time() - started, 3),
            "output": output.decode(errors="replace")[-HOOK_OUTPUT_LIMIT:]}
