"""Pure rendering: an InferenceService in, the list of child manifests out, in a stable order.

Never imports a Kubernetes client: `disagg render` prints exactly what reconcile applies.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jinja2
from pydantic import ValidationError

from disagg import wellknown
from disagg.api.v1alpha1 import InferenceServiceSpec, NetworkPolicyPeer
from disagg.api.validate import validate_service
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.render.context import (
    DEFAULT_METRICS_SCRAPERS,
    STARTUP_FAILURE_THRESHOLD,
    STARTUP_PERIOD_S,
    Owner,
    Pool,
    labels,
    pool_values,
    router_values,
)
from disagg.render.revision import Placement, place, revision_of
from disagg.wellknown import ROLES
from disagg.yamlio import load_all

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("disagg.render", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
    auto_reload=False,  # the templates ship with the package: no stat() of the file on every render
)
# No value is ever written into the YAML text: `| j` leaves a placeholder there and the value aside,
# and the parsed documents get the values back. No user string can break a document, and YAML parses
# only the templates' skeleton (parsing the values too was most of a render's time: 1,000 new services
# are 13,000 documents).
_PLACEHOLDER = re.compile(r"__disagg_value_(\d+)__")


@jinja2.pass_context
def _set_aside(context: jinja2.runtime.Context, value: Any) -> str:
    values: list[Any] = context["_values"]
    values.append(value)
    return f"__disagg_value_{len(values) - 1}__"


_env.filters["j"] = _set_aside
_env.globals.update(
    SERVICE_LABEL=wellknown.SERVICE_LABEL, ROLE_LABEL=wellknown.ROLE_LABEL, ROLES=wellknown.ROLES,
    ROUTER=wellknown.ROUTER,
    INITIAL_REPLICAS_ANNOTATION=wellknown.INITIAL_REPLICAS_ANNOTATION,
    AUTOSCALED_ANNOTATION=wellknown.AUTOSCALED_ANNOTATION, POD_SECURITY_ANNOTATION=wellknown.POD_SECURITY_ANNOTATION,
)


def _fill(node: Any, values: list[Any]) -> Any:
    if isinstance(node, dict):
        return {key: _fill(item, values) for key, item in node.items()}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, str) and "__disagg_value_" in node:
        match = _PLACEHOLDER.fullmatch(node)
        if match is None:
            raise ValueError(f"a template put a value inside a string: {node!r}")
        # through JSON, as the values always went: plain types, and a copy of its own for each use
        return json.loads(json.dumps(values[int(match.group(1))]))
    return node


def _documents(template: str, **values: Any) -> list[dict[str, Any]]:
    aside: list[Any] = []
    text = _env.get_template(template).render(_values=aside, **values)
    return [_fill(doc, aside) for doc in load_all(text)]


def _tidy(manifest: dict[str, Any]) -> dict[str, Any]:
    metadata = manifest["metadata"]
    if not metadata.get("ownerReferences"):
        metadata.pop("ownerReferences", None)
    if metadata.get("namespace") is None:
        metadata.pop("namespace", None)
    return manifest


def render_children(
    owner: Owner, spec: InferenceServiceSpec, catalog: AcceleratorCatalog,
    metrics_scrapers: tuple[NetworkPolicyPeer, ...] = DEFAULT_METRICS_SCRAPERS,
    placement: Placement | None = None,
) -> list[dict[str, Any]]:
    """Every child object of one InferenceService, from its validated spec; `metrics_scrapers` are the
    operator's default for a spec that names none; `placement` the slot of its pools and the revision its
    routers select (render/revision.py; default: slot a, the spec's own revision)."""
    return place(owner.name, render_unplaced(owner, spec, catalog, metrics_scrapers), placement or Placement())


def render_unplaced(
    owner: Owner, spec: InferenceServiceSpec, catalog: AcceleratorCatalog,
    metrics_scrapers: tuple[NetworkPolicyPeer, ...] = DEFAULT_METRICS_SCRAPERS,
) -> list[dict[str, Any]]:
    """The children before `place`: pools in slot a without a revision, routers selecting any revision."""
    common = {"namespace": owner.namespace, "owner_refs": owner.reference(), "name": owner.name}
    pools: dict[str, Pool] = {role: pool_values(owner, spec, role, catalog) for role in ROLES}
    router = router_values(owner, spec)
    docs: list[dict[str, Any]] = []
    docs += _documents("router.yaml.j2", router=router, **common)
    for role in ROLES:
        docs += _documents(
            "pool-deployment.yaml.j2" if pools[role].group is None else "pool-leaderworkerset.yaml.j2",
            pool=pools[role],
            port=spec.engine.port,
            startup_period=STARTUP_PERIOD_S,
            startup_failures=STARTUP_FAILURE_THRESHOLD,
            **common,
        )
    for role in ROLES:
        docs += _documents("kv-service.yaml.j2", pool=pools[role], port=spec.engine.port, **common)
    for role in ROLES:
        docs += _documents("pdb.yaml.j2", pool=pools[role], **common)
    scrapers = spec.network_policy.metrics_scrapers
    docs += _documents(
        "networkpolicy.yaml.j2", labels=labels(owner, "engines", "disagg"),
        scrapers=[peer.manifest() for peer in (metrics_scrapers if scrapers is None else scrapers)], **common
    )
    return [_tidy(doc) for doc in docs]


def render_service(
    body: dict[str, Any], catalog: AcceleratorCatalog,
    metrics_scrapers: tuple[NetworkPolicyPeer, ...] = DEFAULT_METRICS_SCRAPERS,
) -> list[dict[str, Any]]:
    """Validates an InferenceService object and renders its children (InvalidSpec if it can't)."""
    spec = validate_service(body, catalog)
    metadata = body.get("metadata") or {}
    owner = Owner(
        name=str(metadata["name"]), namespace=metadata.get("namespace"), uid=metadata.get("uid")
    )
    return render_children(owner, spec, catalog, metrics_scrapers)


def parse_scrapers(text: str) -> tuple[NetworkPolicyPeer, ...]:
    """`--metrics-scrapers`: a JSON list of NetworkPolicy peers (ValueError naming what is wrong)."""
    try:
        peers = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(peers, list):
        raise ValueError("a JSON list of NetworkPolicy peers, e.g. "
                         '[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]')
    try:
        return tuple(NetworkPolicyPeer.model_validate(peer) for peer in peers)
    except ValidationError as error:
        raise ValueError("; ".join(f"[{'.'.join(str(p) for p in e['loc'])}] {e['msg']}"
                                   for e in error.errors())) from None


__all__ = ["Owner", "Placement", "parse_scrapers", "place", "render_children", "render_service", "render_unplaced",
           "revision_of"]
