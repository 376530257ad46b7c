#!/usr/bin/env python3
"""Operations benchmark: planned and unplanned events on running services under a steady streaming load, for
both engines, and what each cost the client.

On the local cluster (hack/cluster.py): one namespace with the operator, `ops-vllm` (examples/01: vLLM over
NIXL) and `ops-sglang` (examples/02: SGLang over Mooncake), each with PREFILL prefill and DECODE decode
workers and one router pod; the lab's engines and kubelet (`disagg-lab fleet`), the real routers
(`disagg-lab routers`) and the `openai` client streaming RATE requests/s into each service
(tests/support/lab_services.py, the e2e tests' rig). The events of `SCENARIOS` run one after the other on the
same services, each inside its own LOAD_S load, at EVENT_AT_S; a scenario that changes a pool's size comes
last or sets it back. Per event and engine (tests/support/service_events.py counts): requests, failed (in
flight on a killed pod at the kill / any other), requests served by a mixed-version pair, seconds until the
service was whole again. Targets: 0 failed for a planned event; for a kill, only the killed engine's
in-flight requests; 0 mixed.

More events (rollouts) are more entries of `SCENARIOS`: a name, an `Event` (an async function
`(env, service) -> Marked`, tests/support/service_events.py) and whether it is planned.

Run it under the e2e lock: `flock /tmp/disagg-e2e.lock .venv/bin/python bench/operations.py` (~6 min; writes
bench/results/operations.json and prints a table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.cluster import LocalCluster  # noqa: E402
from support.lab_services import LabServices  # noqa: E402
from support.service_events import (  # noqa: E402
    Event,
    Outcome,
    drain_nodes,
    example_services,
    kill_one,
    run_event,
    scale_down,
    stops_answering,
)

ENGINES = {"ops-vllm": "vllm", "ops-sglang": "sglang"}
PREFILL, DECODE = 3, 3
RATE = 4.0
LOAD_S = 45.0
EVENT_AT_S = 10.0
RESULTS = REPO / "bench" / "results" / "operations.json"


@dataclass(frozen=True)
class Scenario:
    name: str
    event: Event
    planned: bool
    load_s: float = LOAD_S
    recovers: bool = False
    """A worker fails and recovers: met when the client is served through it again while the load lasts."""


SCENARIOS: list[Scenario] = [
    Scenario("SIGKILL of one decode pod", kill_one("decode"), planned=False),
    Scenario("SIGKILL of one prefill pod (NIXL peer restart)", kill_one("prefill"), planned=False),
    Scenario("kubectl drain of the decode workers' nodes", drain_nodes("decode"), planned=True),
    Scenario("kubectl drain of the prefill workers' nodes", drain_nodes("prefill"), planned=True),
    Scenario("a decode worker answers 503 for 20 s, then recovers", stops_answering("decode", 20.0), planned=False,
             load_s=100.0, recovers=True),
    Scenario("a prefill worker answers 503 for 20 s, then recovers", stops_answering("prefill", 20.0), planned=False,
             load_s=100.0, recovers=True),
    Scenario("decode scale-down by two", scale_down("decode", 2), planned=True),
    Scenario("prefill scale-down by two", scale_down("prefill", 2), planned=True),
]


def local_cluster() -> LocalCluster:
    env = subprocess.run([sys.executable, str(REPO / "hack" / "cluster.py"), "env"], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip().splitlines()[-1]
    kubeconfig = Path(env.split("=", 1)[1])
    return LocalCluster(dir=kubeconfig.parent, kubeconfig=kubeconfig, prometheus_url="http://127.0.0.1:9090")


def run(only: set[str] | None) -> list[dict[str, Any]]:
    cluster = local_cluster()
    api = cluster.api_client()
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-operations-"))
    with example_services(cluster, api, workdir, "operations-bench", ENGINES, PREFILL, DECODE) as env:
        for scenario in SCENARIOS:
            if only and scenario.name not in only:
                continue
            rows.extend(row(outcome, scenario) for outcome in measure(env, scenario))
    print(f"logs: {workdir}")
    return rows


def measure(env: LabServices, scenario: Scenario) -> list[Outcome]:
    started = time.time()
    outcomes = asyncio.run(run_event(env, scenario.name, scenario.event, ENGINES, rate=RATE, load_s=scenario.load_s,
                                     event_at_s=EVENT_AT_S))
    for outcome in outcomes:
        print(f"{scenario.name} [{outcome.engine}]: {outcome.row()} ({time.time() - started:.0f} s)", flush=True)
    return outcomes


def row(outcome: Outcome, scenario: Scenario) -> dict[str, Any]:
    out = outcome.row()
    out["planned"] = scenario.planned
    if scenario.recovers:
        out["met"] = out.get("served_again_s") is not None and outcome.mixed == 0
    else:
        out["met"] = (outcome.failed == 0 if scenario.planned else outcome.failed_after == 0) and outcome.mixed == 0
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| event | engine | requests | failed (in flight on a killed pod / other) | mixed | duration s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['event']} | {r['engine']} | {r['requests']} | {r['failed']} ({r['failed_in_flight']} / "
                     f"{r['failed_after']}) | {r['mixed']} | {r['duration_s']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help="run only this event (by name; repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = run(set(args.only) if args.only else None)
    report = {"host": platform.node(), "python": platform.python_version(), "rate_per_service": RATE,
              "load_s": LOAD_S, "event_at_s": EVENT_AT_S, "prefill": PREFILL, "decode": DECODE, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
