#!/usr/bin/env python3
"""`disagg validate` on large and hostile files: time and peak memory of the real command.

The CLI reads a file one document at a time (split as kubectl splits it) and judges each before the
next, so a file's size costs time and not memory; go-yaml's alias limit refuses an alias bomb after
about a thousand values. Measured here, each in its own process (peak RSS from getrusage of a parent
that runs nothing else):
- N copies of examples/01 (each renamed), ~1.07 KB each: 1 MB, 5 MB and 50 MB files;
- the 1 KB "billion laughs" (9 levels of 9 aliases: 9^9 values if expanded).
Targets: the 50 MB file validates within 60 s and 150 MiB; the bomb is refused within 5 s and 150 MiB.
Prints a table and writes JSON (bench/results/cli-large-file.json).

    .venv/bin/python bench/cli_large_file.py
    .venv/bin/python bench/cli_large_file.py --sizes 1 5 --out /tmp/cli.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text()
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
PROBE = ("import resource, subprocess, sys, time; start = time.monotonic(); "
         "proc = subprocess.run([sys.executable, '-m', 'disagg.cli', *sys.argv[1:]], capture_output=True, text=True); "
         "print(time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, proc.returncode, "
         "proc.stdout.count(': valid'), int('Traceback' in proc.stderr))")


def measure(path: Path) -> dict[str, float | int]:
    out = subprocess.run([sys.executable, "-c", PROBE, "validate", "-f", str(path)], capture_output=True, text=True,
                         check=True, timeout=1800).stdout.split()
    seconds, rss_kib, code, valid, traceback = float(out[0]), int(out[1]), int(out[2]), int(out[3]), int(out[4])
    return {"bytes": path.stat().st_size, "seconds": round(seconds, 2), "peak_rss_mib": round(rss_kib / 1024, 1),
            "exit_code": code, "valid_services": valid, "traceback": traceback}


def write_services(path: Path, megabytes: float) -> int:
    count = 0
    with path.open("w") as out:
        while out.tell() < megabytes * 2**20:
            out.write(EXAMPLE.replace("llama-70b", f"svc-{count}", 1) + "---\n")
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 5, 50], help="file sizes in MB")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cli-large-file.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for megabytes in args.sizes:
            path = Path(work) / f"services-{megabytes:g}mb.yaml"
            services = write_services(path, megabytes)
            rows.append({"file": f"{megabytes:g} MB of services", "services": services, **measure(path)})
            path.unlink()
        bomb = Path(work) / "bomb.yaml"
        bomb.write_text(BOMB)
        rows.append({"file": "1 KB alias bomb", "services": 0, **measure(bomb)})
    print(f"{'file':<22} {'services':>8} {'bytes':>10} {'seconds':>8} {'peak RSS':>9} exit")
    for row in rows:
        print(f"{row['file']:<22} {row['services']:>8} {row['bytes']:>10} {row['seconds']:>8} "
              f"{row['peak_rss_mib']:>6} MiB {row['exit_code']}")
    result = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    largest = max((r for r in rows if r["services"]), key=lambda r: r["bytes"])
    bomb_row = rows[-1]
    met = (largest["exit_code"] == 0 and largest["seconds"] <= 60 and largest["peak_rss_mib"] <= 150
           and bomb_row["exit_code"] == 1 and bomb_row["seconds"] <= 5 and bomb_row["peak_rss_mib"] <= 150
           and not any(r["traceback"] for r in rows))
    print(f"targets {'met' if met else 'MISSED'}; wrote {args.out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
