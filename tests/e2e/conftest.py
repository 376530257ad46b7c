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
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as kclient

from support.cluster import (
    LocalCluster,
    _kubeconfig_path,
)


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
