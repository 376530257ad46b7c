"""A kmock KubernetesEmulator with the few API-server behaviours the reconcile code relies on.

kmock's emulator stores objects and merges PATCH bodies into them, but it knows nothing of
server-side apply ("inherit and implement for your cases", says its docstring). This subclass adds,
minimally and deterministically:

- server-side apply (PATCH with `application/apply-patch+yaml`): creates a missing object, merges an
  existing one, records each field manager's fields in `metadata.managedFields`, hands conflicting
  fields to the applier (`force=true`), and removes fields the applier owned before but no longer
  sends unless another manager still owns them (lists are atomic here, a simplification);
- server-set metadata on create (uid, resourceVersion, generation, creationTimestamp) and the one
  default the operator depends on (a Deployment's `spec.replicas` is 1 when nobody sets it);
- the `/status` subresource: a merge patch that only touches `status`;
- DELETE preconditions (`{"preconditions": {"uid": ...}}` answers 409 on another uid), and an apply
  whose `metadata.uid` names another object (422) or none (409), as the real API server answers;
- create (POST): 409 AlreadyExists when the name is taken, else the object with its fields recorded as
  the manager's `Update` (which a later apply of the same manager does not own, as on a real server);
  a `generateName` gets a name made of it;
- a JSON patch of `metadata.managedFields` (ops `test` and `replace`), as `claim_fields` sends it;
- equality-based `labelSelector` filtering of lists;
- watch events of these writes (ADDED on a create, MODIFIED otherwise), as kmock sends for its own.

Every request still lands in kmock's request log, so tests count them with `writes(...)`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CREATION_TIMESTAMP = "2026-01-01T00:00:00Z"

Path = tuple[str, ...]

# Resources a reconcile may touch: children, pods (read for status), the custom resource.
RESOURCES: dict[str, str] = {
    "v1/serviceaccounts": "ServiceAccount",
    "v1/services": "Service",
    "v1/pods": "Pod",
    "rbac.authorization.k8s.io/v1/roles": "Role",
    "rbac.authorization.k8s.io/v1/rolebindings": "RoleBinding",
    "apps/v1/deployments": "Deployment",
    "policy/v1/poddisruptionbudgets": "PodDisruptionBudget",
    "networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "disagg.dev/v1alpha1/inferenceservices": "InferenceService",
    "v1/events": "Event",
}
# Fields no manager owns (identity and server-set bookkeeping).
_UNOWNED: frozenset[Path] = frozenset({
    ("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace"), ("status",),
})


@dataclass(frozen=True)
class Write:
    """One write request as the API server saw it."""

    method: str
    path: str
    field_manager: str | None
    content_type: str
    body: Any

    @property
    def name(self) -> str:
        """`<plural>/<name>` (or `<plural>/<name>/status`), the short form tests compare."""
        parts = self.path.strip("/").split("/")
        index = parts.index("namespaces") + 2
        if self.method == "POST":  # a create names the object in its body
            return "/".join([*parts[index:], str(self.body["metadata"]["name"])])
        return "/".join(parts[index:])


def writes(requests: Iterable[kmock.Request]) -> list[Write]:
    """The write requests (POST/PUT/PATCH/DELETE) among `requests`, in order."""
    found: list[Write] = []
    for request in requests:
        method = str(request.method.value).upper()
        if method not in WRITE_METHODS:
            continue
        found.append(Write(
            method=method,
            path=request.url.path,
            field_manager=request.params.get("fieldManager"),
            content_type=request.headers.get("Content-Type", ""),
            body=_decode(request.body),
        ))
    return found


def _decode(body: bytes) -> Any:
    if not body:
        return None
    return yaml.safe_load(body)  # JSON is YAML: covers both content types


# --- field sets (a tiny model of managedFields/fieldsV1) ----------------------------------------


def field_paths(obj: Any, prefix: Path = ()) -> set[Path]:
    """Leaf paths of a manifest: maps are walked, lists and scalars are atomic leaves."""
    if isinstance(obj, dict) and obj:
        paths: set[Path] = set()
        for key, value in obj.items():
            paths |= field_paths(value, (*prefix, str(key)))
        return paths
    return {prefix}


def _owned(paths: Iterable[Path]) -> set[Path]:
    return {p for p in paths if not any(p[: len(u)] == u for u in _UNOWNED)}


def to_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for key, value in tree.items():
        if not key.startswith("f:"):
            continue
        path = (*prefix, key[2:])
        paths |= from_fields_v1(value, path) if value else {path}
    return paths


def _get(obj: Any, path: Path) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _remove(obj: dict[str, Any], path: Path) -> None:
    parents: list[tuple[dict[str, Any], str]] = []
    node: Any = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        parents.append((node, part))
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, key in reversed(parents):  # drop maps the removal left empty
        if parent[key] == {}:
            del parent[key]


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _Missing:
    pass


_MISSING = _Missing()


# --- label selectors ----------------------------------------------------------------------------


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif " " in term:
            raise NotImplementedError(f"set-based selector not emulated: {term!r}")
        elif term not in labels:
            return False
    return True


# --- the emulator -------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(data, status=status)


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": code, "reason": reason, "message": message}
    return _json(body, status=code)


@attrs.define(kw_only=True)
class ApplyingEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus server-side apply, status subresource, preconditions, selectors."""

    _serial: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, kind in RESOURCES.items():
            self.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs={"*"})

    # --- helpers for tests ---

    def requests_since(self, mark: int) -> list[kmock.Request]:
        return list(self)[mark:]

    def mark(self) -> int:
        return len(self)

    def put_object(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Stores an object as if it had been created through the API (server fields filled in)."""
        stored = self._server_fields(copy.deepcopy(obj))
        meta = stored["metadata"]
        self.objects[resource, meta.get("namespace"), meta["name"]] = stored
        return stored

    def get_object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self._find((kmock.resource(resource), namespace, name))
        return None if found is None else copy.deepcopy(found.raw)

    def _find(self, key: tuple[kmock.resource, str | None, str]) -> kmock.Object | None:
        """The live (not soft-deleted) object; `key in objects` does not parse string resources."""
        if key not in self.objects:
            return None
        found = self.objects[key]
        return None if found.deleted else found

    def live(self, resource: str, namespace: str) -> Iterator[dict[str, Any]]:
        wanted = kmock.resource(resource)
        for (res, ns, _), obj in self.objects.items():
            if res == wanted and ns == namespace and not obj.deleted:
                yield copy.deepcopy(obj.raw)

    # --- request handling ---

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        method = str(request.method.value).upper()
        if method == "POST" and request.resource is not None and request.name is None:
            return await self._published(request, self._create(request))
        if request.resource is not None and request.name is not None:
            content_type = request.headers.get("Content-Type", "")
            if method == "PATCH" and content_type.startswith(APPLY_CONTENT_TYPE):
                return await self._published(request, self._apply(request))
            if method == "PATCH" and content_type.startswith("application/json-patch+json"):
                return await self._published(request, self._json_patch(request))
            if method == "PATCH" and request.subresource == "status":
                return await self._published(request, self._patch_status(request))
            if method == "DELETE":
                refusal = self._check_preconditions(request)
                if refusal is not None:
                    return refusal
        if (request.resource is not None and request.name is None and method == "GET"
                and request.params.get("labelSelector") and request.params.get("watch") != "true"):
            return self._list_selected(request)
        return await super()._handle(request)

    async def _published(
        self, request: kmock.Request, response: aiohttp.web.StreamResponse,
    ) -> aiohttp.web.StreamResponse:
        """The answer to a write, after the object as written went to the resource's watches."""
        if (request.resource is not None and 200 <= response.status < 300 and isinstance(response, aiohttp.web.Response)
                and isinstance(response.body, bytes)):
            event = "ADDED" if response.status == 201 else "MODIFIED"
            await self._buses[request.resource].put({"type": event, "object": json.loads(response.body)})
        return response

    def _key(self, request: kmock.Request) -> tuple[kmock.resource, str | None, str]:
        assert request.resource is not None and request.name is not None
        return (request.resource, request.namespace, request.name)

    def _next_version(self) -> str:
        self._serial += 1
        return str(self._serial)

    def _server_fields(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        version = self._next_version()
        meta.setdefault("uid", f"uid-{meta.get('name', '')}-{version}")
        meta.setdefault("creationTimestamp", CREATION_TIMESTAMP)
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = version
        return self._defaults(obj)

    @staticmethod
    def _defaults(obj: dict[str, Any]) -> dict[str, Any]:
        if obj.get("kind") == "Deployment":
            obj.setdefault("spec", {}).setdefault("replicas", 1)
        return obj

    def _create(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        obj = _decode(request.body)
        if isinstance(obj, dict) and not (obj.get("metadata") or {}).get("name"):
            prefix = (obj.get("metadata") or {}).get("generateName")
            if prefix:  # the API server's name: the prefix and five characters
                obj["metadata"]["name"] = f"{prefix}{self._serial + 1:05d}"
        if not isinstance(obj, dict) or not (obj.get("metadata") or {}).get("name"):
            return _status(422, "Invalid", "metadata.name: Required value")
        name = obj["metadata"]["name"]
        key = (request.resource, request.namespace, name)
        if self._find(key) is not None:
            return _status(409, "AlreadyExists", f'{request.resource.plural} "{name}" already exists')
        manager = request.params.get("fieldManager") or "unknown"
        stored = self._server_fields(copy.deepcopy(obj))
        stored["metadata"]["managedFields"] = [
            {**_entry(manager, obj, _owned(field_paths(obj))), "operation": "Update"}]
        self.objects[key] = stored
        return _json(stored, status=201)

    def _json_patch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        current = self._find(self._key(request))
        if current is None:
            return _status(404, "NotFound", f"{request.name} not found")
        live: dict[str, Any] = copy.deepcopy(current.raw)
        for op in _decode(request.body) or []:
            path = tuple(op["path"].strip("/").split("/"))
            if op["op"] == "test" and _get(live, path) != op["value"]:
                return _status(409, "Conflict", f"the object has been modified: test of {op['path']} failed")
            if op["op"] == "replace":
                node = live
                for part in path[:-1]:
                    node = node[part]
                node[path[-1]] = copy.deepcopy(op["value"])
            elif op["op"] != "test":
                raise NotImplementedError(f"JSON patch op not emulated: {op['op']}")
        live["metadata"]["resourceVersion"] = self._next_version()
        current.history.append(live)
        return _json(live)

    def _apply(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        manager = request.params.get("fieldManager")
        if not manager:
            return _status(422, "Invalid", "fieldManager is required for apply patch")
        config = _decode(request.body)
        if not isinstance(config, dict):
            return _status(400, "BadRequest", "apply patch must be an object")
        key = self._key(request)
        wanted_uid = (config.get("metadata") or {}).pop("uid", None)
        applied = _owned(field_paths(config))
        current = self._find(key)
        if wanted_uid is not None and current is None:
            return _status(409, "Conflict", f"uid mismatch: the provided object specified uid {wanted_uid}, and no "
                                            "existing object was found")
        if wanted_uid is not None and current is not None and current.raw["metadata"]["uid"] != wanted_uid:
            return _status(422, "Invalid", f'metadata.uid: Invalid value: "{wanted_uid}": field is immutable')

        if current is None:
            if config.get("kind") == "Deployment" and "template" not in config.get("spec", {}):
                # a real server validates the created object: a Deployment needs a pod template
                return _status(422, "Invalid", "Deployment.apps is invalid: spec.template: Required value")
            obj = self._server_fields(copy.deepcopy(config))
            obj["metadata"]["managedFields"] = [_entry(manager, config, applied)]
            self.objects[key] = obj
            return _json(obj, status=201)

        live: dict[str, Any] = copy.deepcopy(current.raw)
        # managers are (name, operation): a manager's Update fields are not its Apply fields
        owners = {(e["manager"], e.get("operation", "Apply")): from_fields_v1(e.get("fieldsV1", {}))
                  for e in live["metadata"].get("managedFields", []) or []}
        previous = owners.pop((manager, "Apply"), set())
        for paths in owners.values():  # force=true: conflicting fields change hands
            paths -= {p for p in applied if p in paths and _get(live, p) != _get(config, p)}
        still_owned = set().union(*owners.values()) if owners else set()
        merged = _merge(live, config)
        for path in sorted(previous - applied - still_owned, key=len, reverse=True):
            _remove(merged, path)
        self._defaults(merged)
        owners[(manager, "Apply")] = applied
        order = [(e["manager"], e.get("operation", "Apply")) for e in live["metadata"].get("managedFields", []) or []]
        order += [m for m in owners if m not in order]
        merged["metadata"]["managedFields"] = [{**_entry(m, config, owners[(m, op)]), "operation": op}
                                               for m, op in order if owners.get((m, op))]
        if _strip_volatile(merged) != _strip_volatile(live):
            if merged.get("spec") != live.get("spec"):
                merged["metadata"]["generation"] = int(live["metadata"].get("generation", 1)) + 1
            merged["metadata"]["resourceVersion"] = self._next_version()
            current.history.append(merged)
        return _json(merged)

    def _patch_status(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        current = self._find(self._key(request))
        if current is None:
            return _status(404, "NotFound", f"{request.name} not found")
        patch = request.data if isinstance(request.data, dict) else {}
        current.patch({"status": patch.get("status")} if "status" in patch else {})
        current["metadata"] = {**current["metadata"], "resourceVersion": self._next_version()}
        return _json(current.raw)

    def _check_preconditions(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        current = self._find(self._key(request))
        if current is None:
            return _status(404, "NotFound", f"{request.name} not found")
        body = request.data if isinstance(request.data, dict) else {}
        wanted = (body.get("preconditions") or {}).get("uid")
        actual = current.raw.get("metadata", {}).get("uid")
        if wanted and wanted != actual:
            message = f"precondition failed: uid in precondition: {wanted}, uid in object: {actual}"
            return _status(409, "Conflict", message)
        return None

    def _list_selected(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        if request.resource not in self.resources:
            return _status(404, "NotFound", f"the server could not find the requested resource {request.resource}")
        selector = request.params["labelSelector"]
        items = [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in self.objects.items()
            if res == request.resource and not obj.deleted
            and (request.namespace is None or ns == request.namespace)
            and selector_matches(selector, obj.raw.get("metadata", {}).get("labels") or {})
        ]
        return _json({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._serial)},
                      "items": items})


def _entry(manager: str, config: dict[str, Any], paths: set[Path]) -> dict[str, Any]:
    return {
        "manager": manager,
        "operation": "Apply",
        "apiVersion": config.get("apiVersion", ""),
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields_v1(paths),
    }


def _strip_volatile(obj: dict[str, Any]) -> str:
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k not in ("resourceVersion", "generation")}
    return json.dumps({**obj, "metadata": meta}, sort_keys=True)
