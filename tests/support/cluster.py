"""The local cluster the e2e suite and the benchmarks run against (hack/cluster.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as kclient
from kubernetes import config as kconfig

from support.operators import sa_kubeconfig
from support.paths import REPO

CLUSTER_PY = REPO / "hack" / "cluster.py"


@dataclass(frozen=True)
class LocalCluster:
    dir: Path
    kubeconfig: Path
    prometheus_url: str

    def run(self, *args: str, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess[str]:
        """Run a `hack/cluster.py` subcommand; its progress (stderr) is captured and shown on failure."""
        proc = subprocess.run(
            [sys.executable, str(CLUSTER_PY), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"hack/cluster.py {' '.join(args)} failed with code {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def healthy(self) -> bool:
        return self.run("status", check=False, timeout=60).returncode == 0

    def up(self) -> subprocess.CompletedProcess[str]:
        # a cold build of the binaries takes 20-40 min on 2 cores: no timeout
        return self.run("up", timeout=None)

    def sa_kubeconfig(self, namespace: str, service_account: str, out: Path, duration: int = 7200) -> Path:
        return sa_kubeconfig(namespace, service_account, out, duration)

    def prometheus_stop(self) -> None:
        self.run("prometheus-stop")

    def prometheus_start(self) -> None:
        self.run("prometheus-start")

    def apiserver_restart(self) -> None:
        self.run("apiserver-restart")

    def api_client(self, kubeconfig: Path | None = None) -> kclient.ApiClient:
        loader: Any = kconfig.new_client_from_config
        api: kclient.ApiClient = loader(config_file=str(kubeconfig or self.kubeconfig))
        return api

    @property
    def engines_file(self) -> Path:
        """Prometheus file_sd targets of the `disagg-engines` scrape job."""
        return self.dir / "prometheus" / "engines.json"


def _kubeconfig_path() -> Path:
    out = subprocess.run([sys.executable, str(CLUSTER_PY), "env"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^export KUBECONFIG=(.+)$", out.strip().splitlines()[-1])
    assert match, f"unexpected output of hack/cluster.py env: {out!r}"
    return Path(match.group(1))


