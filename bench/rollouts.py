#!/usr/bin/env python3
"""Rollouts benchmark: the planned rollout events under steady streaming load, per engine, on the local cluster.

Runs the e2e scenario `tests/e2e/test_operations.py::test_c_rollouts_under_load_never_mix_revisions` (the real
OpenAI client through the real vllm-router and sglang-router into the lab's engines, the operator as it runs by
default) and writes its per-event table to bench/results/rollouts.json: event, engine, requests, failed,
mixed (requests served by a prefill and a decode of different revisions, from the client's answers), the
hand-offs the engines refused, and the event's duration (from the edit to one revision's pools and routers
left). Run it under the e2e lock: `flock /tmp/disagg-e2e.lock .venv/bin/python bench/rollouts.py`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "rollouts.json"
TEST = "tests/e2e/test_operations.py::test_c_rollouts_under_load_never_mix_revisions"


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        table_file = Path(scratch) / "table.json"
        env = {**os.environ, "DISAGG_OPERATIONS_JSON": str(table_file)}
        done = subprocess.run([sys.executable, "-m", "pytest", TEST, "-m", "e2e", "-q", "-p", "no:cacheprovider"],
                              cwd=ROOT, env=env, timeout=1800, check=False)
        if not table_file.exists():
            print(f"the scenario wrote no table (pytest exit {done.returncode})", file=sys.stderr)
            return 1
        rows = json.loads(table_file.read_text())
    events: list[dict[str, Any]] = rows
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "scenario": TEST,
        "passed": done.returncode == 0,
        "events": events,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print("| event | engine | requests | failed | mixed | refused by engines | duration s |")
    print("|---|---|---|---|---|---|---|")
    for row in events:
        print(f"| {row['event']} | {row['engine']} | {row['requests']} | {row['failed']} | {row['mixed']} | "
              f"{row['refused_by_engines']} | {row['duration_s']} |")
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
