"""Is this operator the active one of its kopf peering group? (The autoscaler thread asks each tick.)

kopf pauses the watch handlers of every operator that sees a live peer of higher priority; the
autoscaler runs outside kopf's handlers, so it reads the same peering object and applies the same
rule: act only while no live peer has a higher (or the same) priority.
"""

from __future__ import annotations

import datetime
import getpass
import os
import secrets
import socket
from dataclasses import dataclass

from disagg.kube.client import ApiError, Kind, Kube

CLUSTER_PEERING = Kind("kopf.dev/v1", "ClusterKopfPeering", "clusterkopfpeerings")
NAMESPACED_PEERING = Kind("kopf.dev/v1", "KopfPeering", "kopfpeerings")


def own_identity() -> str:
    """This process's name in the peering object, as kopf names its peers: the pod's name where the
    Deployment sets POD_ID, else user@host/start time/a random suffix (several at once stay apart)."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    started = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return f"{getpass.getuser()}@{socket.gethostname()}/{started}/{secrets.token_hex(2)}"


def _parse(moment: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


@dataclass
class PeeringCheck:
    kube: Kube
    name: str
    identity: str
    priority: int
    namespace: str | None = None
    """None for cluster-wide peering."""

    def is_active(self) -> bool:
        if self.namespace is None:
            path = f"{CLUSTER_PEERING.collection(None)}/{self.name}"
        else:
            path = NAMESPACED_PEERING.path(self.namespace, self.name)
        try:
            peering = self.kube.request("GET", path)
        except ApiError:
            return False  # cannot tell: a standby that acts is worse than a tick skipped
        now = datetime.datetime.now(datetime.UTC)
        for peer_id, info in ((peering or {}).get("status") or {}).items():
            if peer_id == self.identity or not isinstance(info, dict):
                continue
            try:
                deadline = _parse(str(info["lastseen"])) + datetime.timedelta(seconds=int(info.get("lifetime", 60)))
                priority = int(info.get("priority", 0))
            except (KeyError, ValueError, TypeError):
                continue
            if deadline > now and priority >= self.priority:
                return False
        return True
