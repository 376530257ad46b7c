"""How a worker leaves without losing a request: pure values for the pool and router templates.

A deleted pod (scale-down, rollout, node drain, eviction) goes through the kubelet's termination: preStop
hook, SIGTERM, SIGKILL at the end of the grace period. What each step does here:

1. The routers drop the worker first. Both routers remove a worker when its pod gets a deletionTimestamp
   (their pod watch); the preStop hook waits `DEREGISTER_S` so that what a router sent just before arrives.
2. The hook then waits until the engine has nothing in flight, read from its own /metrics: requests running
   and waiting, and for a vLLM prefill worker the KV caches it still holds for decodes (vLLM's shutdown does
   not wait for KV transfers: a decode that pulls after the prefill exited would recompute the prompt), and
   until it has finished no request for `QUIET_S` (a router that drops the worker late still sends it
   requests). At most the drain bound.
3. SIGTERM: vLLM finishes what is left for `--shutdown-timeout` (its default, 0, aborts it), SGLang until done.
4. The grace period is the first wait, the drain bound, the quiet time and a margin for the process to exit: past it the
   kubelet kills what is left.

The router pods sleep `ROUTER_DEREGISTER_S` in their preStop hook (clients and kube-proxy stop using the
endpoint), then drain on SIGTERM (both routers stop accepting and finish their streams; sglang-router for at
most `--shutdown-grace-period-secs`), within a grace period that holds the longest request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.engines import Role, engine_adapter

DEREGISTER_S = 3
"""What the preStop hook waits before it looks at the engine: the routers' watch sees the deletion within a
second; a request they sent just before is then in the engine's counts."""
ROUTER_DEREGISTER_S = 5
"""A router pod's preStop sleep: clients and kube-proxy stop picking its endpoint."""
EXIT_MARGIN_S = 5
"""Grace beyond the drain for the process to exit."""
PREFILL_TTFT_FACTOR = 10
"""A prefill worker drains for this many times the TTFT target (a queue the SLO allows, and more)."""
KV_PULL_S = 10
"""...plus this long for its decodes to pull the KV caches it holds."""

QUIET_S = 5
"""The hook ends once the engine has had nothing running or waiting, and finished no request, for this long: a
router may drop the worker late (vllm-router handles pod events one at a time, and waits for a new worker's
health check before the next event), and the requests it still sends keep the worker busy or finishing."""

# Polls the engine's /metrics (at $POD_IP: the engine listens on all interfaces) until the gauges named on the
# command line sum to zero and its count of finished requests stays still for a quiet time, after a first wait;
# at most a bound. Arguments: port, first wait, bound, quiet time, the finished-requests counter, the gauges.
# Standard library only: the engines' images have Python.
DRAIN_SCRIPT = (
    "import os,sys,time,urllib.request as u\n"
    "a=sys.argv[1:];url='http://%s:%s/metrics'%(os.environ.get('POD_IP','127.0.0.1'),a[0]);names=set(a[5:])\n"
    "time.sleep(float(a[1]));end=time.time()+float(a[2]);last=None;since=time.time()\n"
    "while time.time()<end:\n"
    " try:text=u.urlopen(url,timeout=2).read().decode()\n"
    " except Exception:break\n"
    " busy=done=0.0\n"
    " for l in text.splitlines():\n"
    "  n=l.split('{',1)[0].split(' ',1)[0]\n"
    "  if n in names:busy+=float(l.rsplit(None,1)[1])\n"
    "  elif n==a[4]:done+=float(l.rsplit(None,1)[1])\n"
    " if busy>0 or done!=last:last=done;since=time.time()\n"
    " elif time.time()-since>=float(a[3]):break\n"
    " time.sleep(0.5)\n"
)


@dataclass(frozen=True)
class Drain:
    """How long one pool's workers take to leave."""

    drain_s: int
    """The engine finishes its requests within this (the preStop hook's bound, vLLM's --shutdown-timeout)."""
    grace_s: int
    """terminationGracePeriodSeconds."""
    prestop: list[str]
    """The engine container's preStop exec command."""
    engine_args: list[str]
    """Engine flags for the drain."""


def drain_seconds(spec: InferenceServiceSpec, role: Role) -> int:
    """The drain bound of one pool: explicit (`drain.timeoutSeconds`) or derived from the SLO."""
    if spec.drain.timeout_seconds is not None:
        return spec.drain.timeout_seconds
    ttft_s = spec.slo.ttft_ms / 1000.0
    if role == "prefill":
        return math.ceil(PREFILL_TTFT_FACTOR * ttft_s + KV_PULL_S)
    return math.ceil(ttft_s + spec.drain.max_output_tokens * spec.slo.itl_ms / 1000.0)


def pool_drain(spec: InferenceServiceSpec, role: Role) -> Drain:
    drain_s = drain_seconds(spec, role)
    engine = engine_adapter(spec.engine)
    gauges = engine.drain_gauges(role)
    finished = f"{engine.metrics.e2e_histogram}_count"
    prestop = ["python3", "-c", DRAIN_SCRIPT, str(spec.engine.port), str(DEREGISTER_S), str(drain_s), str(QUIET_S),
               finished, *gauges]
    args = engine.drain_args(drain_s)
    return Drain(drain_s=drain_s, grace_s=DEREGISTER_S + drain_s + QUIET_S + EXIT_MARGIN_S, prestop=prestop,
                 engine_args=args)


def router_grace_seconds(spec: InferenceServiceSpec) -> int:
    """A router drains its streams on SIGTERM: the longest is a whole request (prefill, then decode)."""
    return ROUTER_DEREGISTER_S + drain_seconds(spec, "prefill") + drain_seconds(spec, "decode") + EXIT_MARGIN_S
