"""The only place that talks to the API server: typed paths, server-side apply, lists, deletes, status.

Synchronous (the `kubernetes` client is): call it from kopf's sync handlers or an executor thread,
never from the event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s

from disagg import GROUP, PLURAL, VERSION
from disagg.wellknown import (
    AUTOSCALER_FIELD_MANAGER as AUTOSCALER_FIELD_MANAGER,  # where the autoscaler loop imports it
)
from disagg.wellknown import FIELD_MANAGER
from disagg.yamlio import yaml_flow

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Kind:
    """A namespaced kind the operator manages, and where it lives in the API."""

    api_version: str
    kind: str
    plural: str

    def collection(self, namespace: str | None) -> str:
        """The kind's objects in `namespace`, or in every namespace (None)."""
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        return f"{prefix}/namespaces/{namespace}/{self.plural}" if namespace is not None else f"{prefix}/{self.plural}"

    def path(self, namespace: str, name: str) -> str:
        return f"{self.collection(namespace)}/{name}"

    @property
    def resource(self) -> str:
        """The kind as RBAC names it: plural.group (plural alone for the core group)."""
        group = self.api_version.rpartition("/")[0]
        return f"{self.plural}.{group}" if group else self.plural


# Every kind a service's children can have; pruning looks at all of them.
CHILD_KINDS: tuple[Kind, ...] = (
    Kind("v1", "ServiceAccount", "serviceaccounts"),
    Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
    Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("v1", "Service", "services"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
)
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
LEADER_WORKER_SET = Kind("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets")
"""Pools whose workers span nodes (sigs.k8s.io/lws): a child kind only where its CRD is served, so it
is not in CHILD_KINDS (a watch or list of it fails on clusters without it)."""
SCALED_KINDS = {DEPLOYMENT.kind: DEPLOYMENT, LEADER_WORKER_SET.kind: LEADER_WORKER_SET}
"""The pool kinds, whose spec.replicas the autoscaler owns."""
KINDS_BY_NAME = {(k.api_version, k.kind): k for k in (*CHILD_KINDS, LEADER_WORKER_SET)}
INFERENCE_SERVICE = Kind(f"{GROUP}/{VERSION}", "InferenceService", PLURAL)
POD = Kind("v1", "Pod", "pods")


class ApiError(Exception):
    """An API request that failed, with its HTTP status and the server's message."""

    def __init__(self, status: int, message: str, method: str = "", path: str = "") -> None:
        self.status = status
        self.message = message
        super().__init__(f"{method} {path}: {status} {message}")


def _refusal(status: int, reason: str | None, data: bytes | None, method: str, path: str) -> ApiError:
    """An API server's non-2xx answer as an ApiError with its own message where the body has one."""
    message = reason or ""
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(data or b"{}").get("message", message)
    return ApiError(int(status), str(message), method, path)


def _union_fields(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The union of two managedFields field sets (FieldsV1 tries)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _union_fields(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def kind_of(manifest: dict[str, Any]) -> Kind:
    return KINDS_BY_NAME[(manifest["apiVersion"], manifest["kind"])]


class Kube:
    """A thin, typed wrapper over one `kubernetes.client.ApiClient`."""

    def __init__(
        self, api: k8s.ApiClient, timeout_s: float = 30.0, on_request: Callable[[str], None] | None = None
    ) -> None:
        self.api = api
        self.timeout_s = timeout_s
        self.on_request = on_request
        """Called with the HTTP method of every request (metrics count reads and writes)."""

    @property
    def host(self) -> str:
        """The API server's URL."""
        return str(self.api.configuration.host)

    @property
    def ca_file(self) -> str | None:
        """The file of the CA that signed the API server's certificate, if the client was given one."""
        ca = self.api.configuration.ssl_ca_cert
        return str(ca) if ca else None

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        decode: bool = True,
    ) -> Any:
        if self.on_request is not None:
            self.on_request(method)
        method_, url, headers, payload, post = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(method_, url, header_params=headers, body=payload, post_params=post,
                                         _request_timeout=self.timeout_s)
            data = response.read()  # type: ignore[no-untyped-call]
        except (k8s.ApiException, urllib3.exceptions.HTTPError) as error:
            raise ApiError(0, f"no answer from the API server: {error}", method, path) from None
        if not 200 <= response.status < 300:
            raise _refusal(response.status, response.reason, data, method, path)
        return json.loads(data) if data and decode else None

    def open_stream(self, path: str, query: list[tuple[str, str]], read_timeout_s: float) -> Any:
        """A GET whose body is read as it comes (a watch): the urllib3 response, status checked."""
        if self.on_request is not None:
            self.on_request("WATCH")
        method_, url, headers, payload, post = self.api.param_serialize(
            "GET", path, query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.rest_client.request(  # type: ignore[no-untyped-call]
                method_, url, headers=headers, body=payload, post_params=post, _request_timeout=(10.0, read_timeout_s))
        except (k8s.ApiException, urllib3.exceptions.HTTPError) as error:
            raise ApiError(0, f"no answer from the API server: {error}", "WATCH", path) from None
        raw = response.response
        if not 200 <= raw.status < 300:
            data = raw.read()
            raw.release_conn()
            raise _refusal(raw.status, raw.reason, data, "WATCH", path)
        return raw

    # --- reads ----------------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", kind.path(namespace, name))
            return result
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, kind: Kind, namespace: str, label_selector: str, cached: bool = False) -> list[dict[str, Any]]:
        """The objects matching a selector; `cached`: as the API server's watch cache has them (may be
        a moment old, but costs no etcd read: for explanations, not for decisions)."""
        query = [("labelSelector", label_selector)] + ([("resourceVersion", "0")] if cached else [])
        result = self.request("GET", kind.collection(namespace), query=query)
        items: list[dict[str, Any]] = result.get("items", [])
        for item in items:  # list items come without their type
            item.setdefault("apiVersion", kind.api_version)
            item.setdefault("kind", kind.kind)
        return items

    # --- writes ---------------------------------------------------------------------------------

    def apply(
        self, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER, *, read_back: bool = True,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """Server-side apply of one object; this field manager takes over conflicting fields. Returns the
        object as stored, or with `read_back=False` the manifest itself, leaving the answer unparsed (a
        caller that only needs to know it was stored: parsing answers was ~4 % of a cold start's CPU).
        With `uid`, only the object with that uid is changed: the API server refuses the apply when the
        object is gone (409) or is another one of the same name (422, uid immutable), and creates none."""
        kind = kind_of(manifest)
        meta = manifest["metadata"]
        if uid is not None:
            manifest = {**manifest, "metadata": {**meta, "uid": uid}}
        result: dict[str, Any] | None = self.request(
            "PATCH",
            kind.path(meta["namespace"], meta["name"]),
            query=[("fieldManager", field_manager), ("force", "true")],
            body=yaml_flow(manifest).encode(),  # the body is YAML, which JSON not always is
            content_type="application/apply-patch+yaml",
            decode=read_back,
        )
        return result if result is not None else manifest

    def create(self, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Creates an object (POST): an ApiError 409 when one of that name exists, which is never touched.
        The fields are recorded as this manager's `Update`; `claim_fields` turns them into its `Apply`
        before the first apply, or an apply could never remove them."""
        kind = kind_of(manifest)
        meta = manifest["metadata"]
        result: dict[str, Any] = self.request(
            "POST", kind.collection(meta["namespace"]), query=[("fieldManager", field_manager)], body=manifest,
        )
        return result

    def claim_fields(
        self, kind: Kind, namespace: str, name: str, field_manager: str = FIELD_MANAGER, leave: tuple[str, ...] = ()
    ) -> None:
        """Makes the fields `field_manager` set by create/update its server-side apply fields (as
        kubectl's client-side-to-server-side upgrade does), so that a later apply removes the ones it
        no longer sends; the fields of `spec` named in `leave` are given up instead (the API server
        credits a create with the fields it defaults, such as an autoscaled Deployment's replicas, which
        a later apply would then reset). A no-op when it has none; ApiError 409/422 when the object
        changed meanwhile."""
        current = self.get(kind, namespace, name)
        if current is None:
            return
        entries = current.get("metadata", {}).get("managedFields") or []

        def mine(entry: dict[str, Any], operation: str) -> bool:
            return (entry.get("manager"), entry.get("operation"), entry.get("subresource")) == (
                field_manager, operation, None)

        updates = [e for e in entries if mine(e, "Update")]
        if not updates:
            return
        applied = [e for e in entries if mine(e, "Apply")]
        fields: dict[str, Any] = {}
        for entry in [*applied, *updates]:
            fields = _union_fields(fields, entry.get("fieldsV1") or {})
        spec_fields = fields.get("f:spec")
        if isinstance(spec_fields, dict) and leave:
            fields = {**fields, "f:spec": {k: v for k, v in spec_fields.items() if k[2:] not in leave}}
        claimed = {**(applied or updates)[0], "operation": "Apply", "fieldsV1": fields}
        rest = [e for e in entries if not (mine(e, "Update") or mine(e, "Apply"))]
        patch = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": current["metadata"]["resourceVersion"]},
            {"op": "replace", "path": "/metadata/managedFields", "value": [*rest, claimed]},
        ]
        self.request("PATCH", kind.path(namespace, name), query=[("fieldManager", field_manager)], body=patch,
                     content_type="application/json-patch+json", decode=False)

    def delete(self, kind: Kind, namespace: str, name: str, uid: str | None = None) -> None:
        """Deletes an object (only the one with `uid`, if given); already gone counts as done."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", kind.path(namespace, name), body=body)
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patches the InferenceService's status subresource; returns the object as written."""
        result: dict[str, Any] | None = self.request(
            "PATCH",
            INFERENCE_SERVICE.path(namespace, name) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )
        return result

    def annotate(self, kind: Kind, namespace: str, name: str, annotations: dict[str, str | None],
                 uid: str | None = None) -> dict[str, Any]:
        """Merge-patches annotations of one object (None removes one); with `uid`, only the object of that uid
        (the API server refuses the patch of a replaced object)."""
        metadata: dict[str, Any] = {"annotations": annotations}
        if uid is not None:
            metadata["uid"] = uid
        result: dict[str, Any] = self.request("PATCH", kind.path(namespace, name), body={"metadata": metadata},
                                              content_type="application/merge-patch+json")
        return result

    def scale(
        self, namespace: str, name: str, replicas: int, field_manager: str, kind: Kind = DEPLOYMENT,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """Sets a pool's replicas (a Deployment's, or a LeaderWorkerSet's groups) under `field_manager`
        (server-side apply of that one field); with `uid`, only on the object of that uid."""
        manifest = {
            "apiVersion": kind.api_version,
            "kind": kind.kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
        }
        return self.apply(manifest, field_manager=field_manager, uid=uid)

    def may(self, verb: str, kind: Kind, namespace: str | None) -> bool:
        """Whether this client's identity may `verb` objects of `kind` (a SelfSubjectAccessReview)."""
        group = kind.api_version.rpartition("/")[0]
        attributes = {"group": group, "resource": kind.plural, "verb": verb, "namespace": namespace or ""}
        result = self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body={
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes},
        })
        return bool(((result or {}).get("status") or {}).get("allowed"))

    def serves(self, kind: Kind) -> bool:
        """Whether the API server serves `kind` (discovery of its group version); False on a 404."""
        try:
            result = self.request("GET", f"/apis/{kind.api_version}")
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return any(r.get("name") == kind.plural for r in (result or {}).get("resources", []))
