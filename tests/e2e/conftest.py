"""Fixtures for end-to-end tests against the real local cluster of hack/cluster.py.

`cluster` (session): makes sure the cluster is up (runs `hack/cluster.py up` when `status` says it is
not) and gives its paths and helpers. `kube_api` (session): an admin `kubernetes.client.ApiClient`.
`e2e_namespace` (function): a fresh namespace, deleted after the test.

The cluster is left running after the session (it is shared and slow to build the first time); set
DISAGG_E2E_DOWN=1 to tear it down at the end when this session started it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kclient
from kubernetes import config as kconfig
from operator_support import sa_kubeconfig

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    kubeconfig = _kubeconfig_path()
    c = LocalCluster(dir=kubeconfig.parent, kubeconfig=kubeconfig, prometheus_url="http://127.0.0.1:9090")
    started = False
    if not c.healthy():
        proc = c.up()
        assert proc.stdout.strip().splitlines()[-1] == f"export KUBECONFIG={kubeconfig}", proc.stdout
        started = True
    yield c
    if started and os.environ.get("DISAGG_E2E_DOWN") == "1":
        c.run("down")


@pytest.fixture(scope="session")
def kube_api(cluster: LocalCluster) -> Iterator[kclient.ApiClient]:
    api = cluster.api_client()
    yield api
    closer: Any = api.close
    closer()


@pytest.fixture
def e2e_namespace(kube_api: kclient.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique namespace for one test, deleted (without waiting) afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{stem}-{secrets.token_hex(3)}"
    core: Any = kclient.CoreV1Api(kube_api)
    core.create_namespace(kclient.V1Namespace(metadata=kclient.V1ObjectMeta(name=name, labels={"e2e": "true"})))
    yield name
    try:
        core.delete_namespace(name)
    except kclient.ApiException as e:
        if e.status != 404:
            raise
