"""The Pod Security Standards' checks, baseline and restricted, as the Kubernetes documentation lists
them ("Pod Security Standards", the policy tables as of v1.34+), for pod specs in tests.

`violations(pod_spec, level, annotations)` names every rule a pod breaks at that level (restricted
includes baseline). Written from the documented rules, not from the admission plugin's code; the e2e
suite checks the same pods against the real API server's PodSecurity admission.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BASELINE_CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
})
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
RESTRICTED_VOLUMES = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim", "projected",
    "secret",
})
VOLUME_SOURCE_KEYS = frozenset({"name"})  # a volume's keys other than its one source


def _containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(field) or []:
            yield f"{field}[{container.get('name')}]", container


def _handlers(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if container.get(probe):
            yield probe, container[probe]
    for hook, handler in (container.get("lifecycle") or {}).items():
        if isinstance(handler, dict):
            yield f"lifecycle.{hook}", handler


def baseline(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Rules of the baseline level the pod spec breaks."""
    found: list[str] = []
    psc = pod.get("securityContext") or {}
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("HostProcess: spec.securityContext.windowsOptions.hostProcess")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"Host Namespaces: spec.{field}")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            found.append(f"HostPath Volumes: {volume.get('name')}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"Sysctls: {sysctl.get('name')}")
    contexts = [("spec.securityContext", psc)]
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        contexts.append((f"{where}.securityContext", sc))
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"HostProcess: {where}")
        if sc.get("privileged"):
            found.append(f"Privileged Containers: {where}")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            found.append(f"Capabilities: {where} adds {sorted(added - BASELINE_CAPABILITIES)}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"Host Ports: {where} hostPort {port['hostPort']}")
        for name, handler in _handlers(container):
            for action in ("httpGet", "tcpSocket"):
                if (handler.get(action) or {}).get("host"):
                    found.append(f"Host Probes / Lifecycle Hooks: {where}.{name}.{action}.host")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"/proc Mount Type: {where}")
    for where, sc in contexts:
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"AppArmor: {where}.appArmorProfile")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"SELinux: {where}.seLinuxOptions")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"Seccomp: {where} Unconfined")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            found.append(f"AppArmor: annotation {key}")
    return found


def restricted(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Rules of the restricted level (baseline's included) the pod spec breaks."""
    found = baseline(pod, annotations)
    psc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - VOLUME_SOURCE_KEYS
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"Volume Types: {volume.get('name')} is {sorted(kinds)}")
    if psc.get("runAsUser") == 0:
        found.append("Running as Non-root user: spec.securityContext.runAsUser 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for where, container in _containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"Privilege Escalation: {where} must set allowPrivilegeEscalation: false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"Running as Non-root: {where} (runAsNonRoot must be true, on the pod or the container)")
        if sc.get("runAsUser") == 0:
            found.append(f"Running as Non-root user: {where} runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"Seccomp: {where} needs RuntimeDefault or Localhost (pod or container)")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"Capabilities: {where} must drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"Capabilities: {where} may add only NET_BIND_SERVICE")
    return found


def violations(pod: dict[str, Any], level: str, annotations: dict[str, str] | None = None) -> list[str]:
    """The rules of `level` (privileged, baseline, restricted) that the pod spec breaks."""
    if level == "privileged":
        return []
    return baseline(pod, annotations) if level == "baseline" else restricted(pod, annotations)
