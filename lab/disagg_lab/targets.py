"""The Prometheus file_sd targets file of the local cluster's `disagg-engines` scrape job.

Each lab process owns its groups (labelled with its process id) and rewrites only those, atomically;
groups of processes that died are dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FLEET_LABEL = "__meta_disagg_fleet"
"""Label of our groups in the targets file (the owning process id); Prometheus drops `__` labels."""


def default_targets_file() -> Path:
    root = os.environ.get("DISAGG_CLUSTER_DIR") or "/tmp/disagg-cluster"
    return Path(root) / "prometheus" / "engines.json"


def target_groups(targets: Iterable[tuple[str, Mapping[str, str]]], owner: str,
                  scrape_interval: str | None = None) -> list[dict[str, Any]]:
    """file_sd groups: one per (address, labels), with our ownership label; a scrape interval other than
    the job's goes in Prometheus' `__scrape_interval__`/`__scrape_timeout__` target labels."""
    groups = []
    for address, pod_labels in sorted(targets, key=lambda t: (t[1].get("namespace", ""), t[1].get("pod", ""))):
        labels = dict(pod_labels)
        labels[FLEET_LABEL] = owner
        if scrape_interval is not None:
            labels["__scrape_interval__"] = scrape_interval
            labels["__scrape_timeout__"] = scrape_interval
        groups.append({"targets": [address], "labels": labels})
    return groups


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_targets(path: Path, groups: list[dict[str, Any]], owner: str) -> None:
    """Replace our groups in the file_sd file (keeping other live owners' and foreign groups), atomically.

    A lock file serialises concurrent writers; the new content is written to a temporary file in the same
    directory and renamed over the old one, so Prometheus never reads a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            existing = json.loads(path.read_text()) if path.exists() else []
        except (OSError, json.JSONDecodeError):
            existing = []
        keep: list[dict[str, Any]] = []
        for group in existing if isinstance(existing, list) else []:
            if not isinstance(group, dict):
                continue
            other = str((group.get("labels") or {}).get(FLEET_LABEL, ""))
            if other == owner:
                continue
            if other.isdigit() and not _pid_alive(int(other)):
                continue  # left behind by a process that died
            keep.append(group)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(keep + groups, handle, indent=1, sort_keys=True)
                handle.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
