#!/usr/bin/env python3
"""Data-path benchmark: what the real router adds, how many requests/s one router holds here, and the
errors each fault costs.

On the local cluster (hack/cluster.py): examples/01 (vLLM, NIXL) with one router replica, rendered by
`disagg render` and applied as the operator would (no operator: nothing scales), the engines of
`disagg-lab fleet`, the real vllm-router 0.1.17 of the router pod under `disagg-lab routers`.

- router overhead: the same client code (httpx, streaming) sends each request either to the router pod,
  or does the router's two legs itself against the engine pods (the prefill leg with max_tokens 1 and
  `kv_transfer_params`, then the decode leg echoing them); TTFT and total time per path, p50/p99, at a
  light load (the engines' model time is the same on both paths);
- router throughput: the rate steps up (short prompts and answers, two prefill and two decode engines so
  that the engines' model is not the limit); per step: requests/s completed, errors, TTFT p99, and the
  CPU seconds of the router, the fleet and the client. "Holds" = the highest step with no error and
  TTFT p99 under 1 s;
- errors per fault (the openai client through the Service's endpoints, 4 requests/s for 40 s, two router
  replicas, two decode engines): one decode engine down, one prefill engine down (the other takes the
  load), a router pod deleted; errors and when the last one was sent after the fault.

Run it under the e2e lock: `flock /tmp/disagg-e2e.lock .venv/bin/python bench/datapath.py` (writes
bench/results/datapath.json and prints a table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import yaml

from disagg_lab.kube import admin_client
from disagg_lab.load import LoadClient, Result, Schedule, ServiceEndpoints, prompt_text

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(*args: str, input: str | None = None) -> str:
    return subprocess.run(args, input=input, capture_output=True, text=True, check=True, timeout=120).stdout


class Rig:
    """A namespace with one service, the lab's engines and routers; removed at the end."""

    def __init__(self, workdir: Path, routers: int, prefill: int, decode: int) -> None:
        env = sh(PY, str(REPO / "hack" / "cluster.py"), "env").strip().splitlines()[-1]
        self.kubeconfig = env.split("=", 1)[1]
        self.kubectl = str(Path(sh(PY, str(REPO / "hack" / "cluster.py"), "bin-dir").strip().splitlines()[-1])
                           / "kubectl")
        self.namespace = f"bench-datapath-{secrets.token_hex(3)}"
        self.workdir = workdir
        self.control = 18000 + secrets.randbelow(1000)
        example = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
        example["metadata"]["namespace"] = self.namespace
        spec = example["spec"]
        spec["router"]["replicas"] = routers
        spec["prefill"]["replicas"], spec["decode"]["replicas"] = prefill, decode
        for role in ("prefill", "decode"):
            spec[role].pop("autoscaling", None)
        self.manifest = example
        self.processes: list[subprocess.Popen[bytes]] = []

    def k(self, *args: str, input: str | None = None) -> str:
        return sh(self.kubectl, f"--kubeconfig={self.kubeconfig}", *args, input=input)

    def up(self) -> None:
        self.k("create", "namespace", self.namespace)
        self.k("apply", "--server-side", "--force-conflicts", "-f", "-", input=sh(PY, "-m", "disagg.cli", "crd"))
        self.k("apply", "-f", "-", input=yaml.safe_dump(self.manifest))
        uid = self.k("-n", self.namespace, "get", "inferenceservice", "llama-70b", "-o", "jsonpath={.metadata.uid}")
        owned = dict(self.manifest, metadata={**self.manifest["metadata"], "uid": uid})
        children = subprocess.run([PY, "-m", "disagg.cli", "render", "-f", "-"], input=yaml.safe_dump(owned),
                                  capture_output=True, text=True, check=True).stdout
        self.k("apply", "--server-side", "-f", "-", input=children)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")}
        for name, args in (("fleet", ["fleet", "-n", self.namespace, "--kubeconfig", self.kubeconfig,
                                      "--control-port", str(self.control), "--targets-file", "none"]),
                           ("routers", ["routers", "-n", self.namespace, "--kubeconfig", self.kubeconfig,
                                        "--state-dir", str(self.workdir / "routers")])):
            with (self.workdir / f"{name}.log").open("ab") as log:
                self.processes.append(subprocess.Popen([PY, "-m", "disagg_lab.cli", *args], stdout=log,
                                                       stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.time() + 180
        while time.time() < deadline:
            states = self.k("-n", self.namespace, "get", "pods", "-l", "disagg.dev/role=router", "-o",
                            "jsonpath={range .items[*]}{.status.containerStatuses[0].started}/"
                            "{.status.conditions[?(@.type==\"Ready\")].status} {end}").split()
            if states and all(s == "true/True" for s in states):
                return
            time.sleep(1)
        raise SystemExit(f"routers not Ready in 180 s; see {self.workdir}")

    def pods(self, role: str) -> list[dict[str, Any]]:
        out = json.loads(self.k("-n", self.namespace, "get", "pods", "-l", f"disagg.dev/role={role}", "-o", "json"))
        return [p for p in out["items"] if not p["metadata"].get("deletionTimestamp")]

    def fault(self, pod: str, fault: str | None) -> None:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.control}/fault/{self.namespace}/{pod}",
                                         data=json.dumps({"fault": fault}).encode(), method="PUT")
        urllib.request.urlopen(request, timeout=5).read()

    def down(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.k("delete", "namespace", self.namespace, "--wait=false")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that were waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def router_pids(rig: Rig) -> list[int]:
    """The router processes disagg-lab routers started (from its log), still running."""
    text = (rig.workdir / "routers.log").read_text(errors="replace")
    pids = {int(m) for m in re.findall(rf"{rig.namespace}/\S+: started \S+ \(pid (\d+)\)", text)}
    return sorted(pid for pid in pids if Path(f"/proc/{pid}").exists())


async def one(http: httpx.AsyncClient, model: str, prompt: int, output: int, router: str | None,
              prefill: str, decode: str) -> tuple[float | None, float, str | None]:
    """(TTFT, total seconds, error) of one streamed completion, through `router` or over both legs."""
    body: dict[str, Any] = {"model": model, "prompt": prompt_text(prompt, 0), "max_tokens": output, "stream": True}
    started = time.monotonic()
    try:
        if router is None:
            leg = dict(body, max_tokens=1, stream=False,
                       kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
            answer = (await http.post(f"http://{prefill}/v1/completions", json=leg)).json()
            body["kv_transfer_params"] = answer["kv_transfer_params"]
            target = decode
        else:
            target = router
        first = None
        async with http.stream("POST", f"http://{target}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return None, time.monotonic() - started, f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                if line.startswith("data: {") and first is None:
                    first = time.monotonic() - started
        return first, time.monotonic() - started, None
    except (httpx.HTTPError, KeyError, ValueError) as error:
        return None, time.monotonic() - started, type(error).__name__


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))] * 1000.0, 1)


async def overhead(rig: Rig, count: int, rate: float) -> dict[str, Any]:
    router = f"{rig.pods('router')[0]['status']['podIP']}:8000"
    prefill = f"{rig.pods('prefill')[0]['status']['podIP']}:8000"
    decode = f"{rig.pods('decode')[0]['status']['podIP']}:8000"
    model = rig.manifest["spec"]["model"]["name"]
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=60.0) as http:
        for path, via in (("direct", None), ("router", router), ("direct", None), ("router", router)):
            ttft, total = [], []
            for _ in range(count // 2):
                first, seconds, error = await one(http, model, 512, 32, via, prefill, decode)
                if error is None and first is not None:
                    ttft.append(first)
                    total.append(seconds)
                await asyncio.sleep(1.0 / rate)
            out.setdefault(path, {"ttft": [], "total": []})
            out[path]["ttft"] += ttft
            out[path]["total"] += total
    result: dict[str, Any] = {
        path: {"requests": len(v["ttft"]), "ttft_ms": {"p50": pct(v["ttft"], 50), "p99": pct(v["ttft"], 99)},
               "total_ms": {"p50": pct(v["total"], 50), "p99": pct(v["total"], 99)}} for path, v in out.items()}
    result["added_ms"] = {q: round((result["router"]["ttft_ms"][q] or 0) - (result["direct"]["ttft_ms"][q] or 0), 1)
                          for q in ("p50", "p99")}
    return result


async def throughput(rig: Rig, rates: list[float], seconds: float) -> list[dict[str, Any]]:
    router = f"{rig.pods('router')[0]['status']['podIP']}:8000"
    model = rig.manifest["spec"]["model"]["name"]
    steps: list[dict[str, Any]] = []
    fleet_pid = rig.processes[0].pid
    async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=1000)) as http:
        for rate in rates:
            pids = router_pids(rig)
            before = {"router": sum(cpu_seconds(p) for p in pids), "fleet": cpu_seconds(fleet_pid),
                      "client": time.process_time()}
            started = time.monotonic()
            tasks = []
            for index in range(int(rate * seconds)):
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(http, model, 16, 4, router, "", "")))
            results = await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
            ok = [r for r in results if r[2] is None]
            cpu = {"router": sum(cpu_seconds(p) for p in router_pids(rig)) - before["router"],
                   "fleet": cpu_seconds(fleet_pid) - before["fleet"], "client": time.process_time() - before["client"]}
            steps.append({"offered_rps": rate, "completed_rps": round(len(ok) / elapsed, 1), "requests": len(results),
                          "errors": len(results) - len(ok),
                          "error_kinds": sorted({str(r[2]) for r in results if r[2] is not None}),
                          "ttft_ms": {"p50": pct([r[0] for r in ok if r[0] is not None], 50),
                                      "p99": pct([r[0] for r in ok if r[0] is not None], 99)},
                          "cpu_share": {k: round(v / elapsed, 2) for k, v in cpu.items()}})
            print(f"  {rate:>5g}/s offered: {steps[-1]['completed_rps']}/s completed, {steps[-1]['errors']} errors, "
                  f"TTFT p99 {steps[-1]['ttft_ms']['p99']} ms, CPU {steps[-1]['cpu_share']}", flush=True)
            await asyncio.sleep(3.0)
    return steps


async def fault_run(rig: Rig, kind: str, seconds: float = 40.0, rate: float = 4.0) -> dict[str, Any]:
    endpoints = ServiceEndpoints(lambda: admin_client(rig.kubeconfig), rig.namespace, "llama-70b").start()
    client = LoadClient(endpoints, timeout_s=60.0)
    plan = Schedule(steps=((0.0, rate),), prompt_tokens=512, output_tokens=32).plan(seconds, 10_000, 5)
    load = asyncio.create_task(client.run(plan))
    await asyncio.sleep(5.0)
    at = time.time()
    victim = ""
    if kind == "router pod deleted":
        victim = rig.pods("router")[0]["metadata"]["name"]
        rig.k("-n", rig.namespace, "delete", "pod", victim, "--wait=false")
    else:
        role = "decode" if kind.startswith("decode") else "prefill"
        victim = rig.pods(role)[0]["metadata"]["name"]
        rig.fault(victim, "down")
    results: list[Result] = await load
    await client.close()
    endpoints.stop()
    if kind != "router pod deleted":
        rig.fault(victim, None)
    failed = [r for r in results if not r.ok]
    return {"fault": kind, "requests": len(results), "errors": len(failed),
            "last_error_after_s": round(max(r.sent_at for r in failed) - at, 1) if failed else None,
            "error_kinds": sorted({(r.error or "").split(":")[0] for r in failed})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "datapath.json"))
    parser.add_argument("--rates", default="20,80,160,320,640")
    parser.add_argument("--step-seconds", type=float, default=15.0)
    parser.add_argument("--only", choices=("overhead", "throughput", "faults"), action="append", default=[],
                        help="run only these parts (repeatable); the others are kept from --out")
    args = parser.parse_args()
    parts = set(args.only or ("overhead", "throughput", "faults"))
    workdir = Path(sh("mktemp", "-d", "/tmp/bench-datapath-XXXX").strip())
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    report: dict[str, Any] = {**previous, "benchmark": "datapath", "when_unix": time.time(),
                              "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
                              "router": "vllm-router 0.1.17", "example": "examples/01-vllm-nixl-llama70b.yaml"}
    rig = Rig(workdir, routers=1, prefill=2, decode=2)
    try:
        rig.up()
        if "overhead" in parts:
            print("router overhead (512+32 tokens, 2 requests/s, 60 requests per path):", flush=True)
            report["overhead"] = asyncio.run(overhead(rig, 120, 2.0))
            print(json.dumps(report["overhead"]), flush=True)
        if "throughput" in parts:
            print("router throughput (16+4 tokens):", flush=True)
            report["throughput"] = asyncio.run(throughput(rig, [float(x) for x in args.rates.split(",")],
                                                          args.step_seconds))
            held = [s["completed_rps"] for s in report["throughput"]
                    if s["errors"] == 0 and (s["ttft_ms"]["p99"] or 1e9) < 1000.0]
            report["router_holds_rps"] = max(held) if held else None
    finally:
        rig.down()
    faults = []
    for kind in ("decode engine down", "prefill engine down", "router pod deleted") if "faults" in parts else ():
        rig = Rig(workdir, routers=2, prefill=2, decode=2)
        try:
            rig.up()
            faults.append(asyncio.run(fault_run(rig, kind)))
            print(f"fault: {faults[-1]}", flush=True)
        finally:
            rig.down()
    if faults:
        report["faults"] = faults
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
