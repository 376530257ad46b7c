"""Where the API server is and how to authenticate: a `Kube` from the pod's ServiceAccount, or from a
kubeconfig."""

from __future__ import annotations

from collections.abc import Callable

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from disagg.kube.client import Kube


def api_client(kubeconfig: str | None, connections: int, in_cluster: bool = True) -> k8s.ApiClient:
    """A client of the pod's ServiceAccount where there is one (and `in_cluster`), else of `kubeconfig`
    (None: $KUBECONFIG or ~/.kube/config), keeping up to `connections` connections open."""
    configuration = k8s.Configuration()
    loaded = False
    if in_cluster:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            loaded = True
        except k8s_config.ConfigException:
            pass
    if not loaded:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    # one connection per thread that may call at once, so no call queues for a socket
    configuration.connection_pool_maxsize = connections
    return k8s.ApiClient(configuration)


def connect(
    kubeconfig: str | None, connections: int = 4, *, in_cluster: bool = True,
    on_request: Callable[[str], None] | None = None,
) -> Kube:
    """A `Kube` for the cluster `api_client` finds."""
    return Kube(api_client(kubeconfig, connections, in_cluster), on_request=on_request)
