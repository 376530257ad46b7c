"""Where the repository is, and a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def helm_binary() -> str | None:
    """helm on PATH, else the one `hack/cluster.py up` built under ~/.cache/disagg."""
    cache = Path(os.environ.get("DISAGG_CACHE", str(Path.home() / ".cache" / "disagg")))
    found = shutil.which("helm") or shutil.which("helm", path=str(cache / "bin"))
    if found:
        return found
    built = sorted(cache.glob("helm/*/bin/helm"))
    return str(built[-1]) if built else None
