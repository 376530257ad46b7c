"""Every engine and router flag the operator renders is one the engine or router really accepts.

The documented lists under tests/data/engine_flags/ are extracted from the engines' and routers' own
packages by hack/extract-engine-flags.py (re-run it when the default images move to a new release).
For every rendered manifest, from every example and from a grid of generated specs, this checks:
- each `--flag` of the engine command of the prefill and decode Deployments, and of the router
  Deployment, is in that engine's or router's list;
- vLLM's --kv-transfer-config JSON parses, uses only KVTransferConfig keys, names registered connectors
  with the kv_role each pool needs (producer on prefill, consumer on decode, also inside
  MultiConnector), and only extra-config keys the connector reads;
- flag values with a fixed set of choices (SGLang's disaggregation mode and transfer backend, the
  routers' policy and kv-connector) are allowed values;
- every VLLM_*, LMCACHE_* and SGLANG_* env var we set is one the engine reads;
- the prefill pods carry the bootstrap-port annotation the router's Kubernetes discovery reads.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from support.paths import REPO

DATA = REPO / "tests" / "data" / "engine_flags"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
ROLE_LABEL = "disagg.dev/role"
ENV_PREFIXES = ("VLLM_", "LMCACHE_", "SGLANG_")

render_module = pytest.importorskip("disagg.render", reason="the renderer (disagg.render) is not there yet")
catalog_module = pytest.importorskip("disagg.catalog.accelerators")
if not hasattr(render_module, "render_service"):  # pragma: no cover - only while the renderer is written
    pytest.skip("disagg.render.render_service is not there yet", allow_module_level=True)
DEFAULT_CATALOG = catalog_module.DEFAULT_CATALOG


# --- the documented lists -----------------------------------------------------------------------


def _lines(name: str) -> list[str]:
    path = DATA / name
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]


FLAG_LISTS: dict[str, frozenset[str]] = {
    name: frozenset(_lines(f"{name}.txt")) for name in ("vllm", "sglang", "vllm-router", "sglang-router")
}


def _facts() -> dict[str, dict[str, str]]:
    """kind -> name -> source, from env.txt."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for line in _lines("env.txt"):
        kind, name, source = line.split(" ", 2)
        out[kind][name] = source
    return out


FACTS = _facts()


def _choices() -> dict[tuple[str, str], frozenset[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for line in _lines("choices.txt"):
        listname, flag, value = line.split(" ", 2)
        out[(listname, flag)].add(value)
    return {key: frozenset(values) for key, values in out.items()}


CHOICES = _choices()


# --- the manifests under test -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One InferenceService to render."""

    id: str
    body: dict[str, Any]

    @property
    def engine(self) -> str:
        return str(self.body["spec"].get("engine", {}).get("kind", "vllm"))

    @property
    def connector(self) -> str:
        return str(self.body["spec"].get("kvTransfer", {}).get("connector", "nixl"))


def _example_cases() -> Iterator[Case]:
    for path in EXAMPLES:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if isinstance(doc, dict) and doc.get("kind") == "InferenceService":
                yield Case(f"{path.name}#{index}", doc)


def _generated_cases() -> Iterator[Case]:
    for engine, connector, tiers, tp in itertools.product(
        ("vllm", "sglang"), ("nixl", "mooncake"), (False, True), (1, 2, 8)
    ):
        if (engine, connector) == ("vllm", "mooncake"):
            continue  # refused by validation (see test_vllm_mooncake_is_refused)
        pool = {
            "replicas": 1,
            "accelerator": {"type": "nvidia-h100", "count": tp},
            "parallelism": {"tensor": tp},
        }
        transfer: dict[str, Any] = {"connector": connector}
        if connector == "nixl" and tp == 2:  # SGLang takes a NIXL backend from SGLANG_DISAGGREGATION_NIXL_BACKEND
            transfer["backend"] = "libfabric"
        spec: dict[str, Any] = {
            "model": {"name": "org/model", "uri": "hf://org/model"},
            "engine": {"kind": engine},
            "kvTransfer": transfer,
            "prefill": pool,
            "decode": dict(pool, replicas=2),
        }
        if tiers:
            spec["kvCache"] = {"cpuOffloadGiB": 32, "disk": {"size": "200Gi"}}
        name = f"gen-{engine}-{connector}-{'tiers' if tiers else 'notiers'}-tp{tp}"
        body = {
            "apiVersion": "disagg.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": name, "namespace": "flags", "uid": "00000000-0000-0000-0000-000000000000"},
            "spec": spec,
        }
        yield Case(name, body)


CASES = [*_example_cases(), *_generated_cases()]


@dataclass(frozen=True)
class Workload:
    """One Deployment whose engine or router command we check."""

    case: Case
    name: str
    role: str  # prefill, decode or router
    listname: str  # which documented list applies
    tokens: list[str]  # command-line tokens after the program (and `-m module`)
    env: list[dict[str, Any]]
    pod_annotations: dict[str, str]

    def where(self) -> str:
        return f"Deployment {self.name} ({self.role}, case {self.case.id})"

    def flags(self) -> Iterator[str]:
        for token in self.tokens:
            if token.startswith("-") and len(token) > 1 and not token[1].isdigit():
                yield token.split("=", 1)[0]

    def value(self, flag: str) -> str | None:
        """The value of the last occurrence of a flag (`--f v` or `--f=v`)."""
        found = None
        for i, token in enumerate(self.tokens):
            if token == flag and i + 1 < len(self.tokens):
                found = self.tokens[i + 1]
            elif token.startswith(flag + "="):
                found = token.split("=", 1)[1]
        return found


def _arguments(container: dict[str, Any]) -> list[str]:
    command = [str(t) for t in container.get("command") or []]
    args = [str(t) for t in container.get("args") or []]
    if len(command) >= 3 and command[0].startswith("python") and command[1] == "-m":
        return command[3:] + args
    return command[1:] + args


def _workloads(case: Case) -> list[Workload]:
    manifests: list[dict[str, Any]] = render_module.render_service(case.body, DEFAULT_CATALOG)
    out: list[Workload] = []
    for manifest in manifests:
        if manifest.get("kind") != "Deployment":
            continue
        labels = manifest["metadata"].get("labels") or {}
        role = labels.get(ROLE_LABEL)
        if role not in ("prefill", "decode", "router"):
            continue
        template = manifest["spec"]["template"]
        containers = template["spec"]["containers"]
        main = next((c for c in containers if c.get("name") in ("engine", "router")), containers[0])
        listname = case.engine if role != "router" else f"{case.engine}-router"
        out.append(
            Workload(
                case=case,
                name=manifest["metadata"]["name"],
                role=role,
                listname=listname,
                tokens=_arguments(main),
                env=[e for c in containers for e in c.get("env") or []],
                pod_annotations=template["metadata"].get("annotations") or {},
            )
        )
    return out


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def workloads(request: pytest.FixtureRequest) -> list[Workload]:
    case: Case = request.param
    found = _workloads(case)
    roles = sorted(w.role for w in found)
    assert roles == ["decode", "prefill", "router"], (
        f"case {case.id}: expected one prefill, one decode and one router Deployment "
        f"(label {ROLE_LABEL}), got {roles}"
    )
    return found


# --- the checks ---------------------------------------------------------------------------------


def test_lists_are_extracted() -> None:
    for name, flags in FLAG_LISTS.items():
        assert len(flags) > 20, f"tests/data/engine_flags/{name}.txt looks empty: re-run hack/extract-engine-flags.py"
    for kind in ("env", "connector", "kv_transfer_config_key", "kv_role", "bootstrap_port_annotation"):
        assert FACTS.get(kind), f"tests/data/engine_flags/env.txt has no `{kind}` lines"


def test_engine_command_matches_engine(workloads: list[Workload]) -> None:
    for w in workloads:
        if w.role == "router":
            continue
        if w.listname == "vllm":
            assert w.tokens[:1] == ["serve"], f"{w.where()}: vLLM must run `vllm serve <model>`, got {w.tokens[:2]}"
        else:
            assert "--model-path" in w.tokens, f"{w.where()}: SGLang needs --model-path"


def _undocumented_flags(workloads: list[Workload]) -> list[str]:
    return [
        f"{flag!r} in {w.where()} is not in tests/data/engine_flags/{w.listname}.txt"
        for w in workloads
        for flag in w.flags()
        if flag not in FLAG_LISTS[w.listname]
    ]


def test_every_flag_is_documented(workloads: list[Workload]) -> None:
    problems = _undocumented_flags(workloads)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_an_undocumented_flag_is_caught(engine: str) -> None:
    """The check itself works: an extra argument that is no real flag is reported by name."""
    case = next(c for c in CASES if c.id == f"gen-{engine}-nixl-notiers-tp1")
    body = json.loads(json.dumps(case.body))
    body["spec"]["engine"]["extraArgs"] = ["--not-a-real-flag=1"]
    problems = _undocumented_flags(_workloads(Case("bad-flag", body)))
    assert problems and all("'--not-a-real-flag'" in p and f"{engine}.txt" in p for p in problems), problems


def test_every_engine_env_var_is_documented(workloads: list[Workload]) -> None:
    documented = FACTS["env"]
    problems = [
        f"env {e['name']!r} in {w.where()} is not read by the engine (not in tests/data/engine_flags/env.txt)"
        for w in workloads
        for e in w.env
        if str(e.get("name", "")).startswith(ENV_PREFIXES) and e["name"] not in documented
    ]
    assert not problems, "\n".join(problems)


def _check_transfer_config(config: Any, role: str, where: str, problems: list[str], nested: bool) -> None:
    if not isinstance(config, dict):
        problems.append(f"{where}: a kv-transfer-config entry is not a JSON object: {config!r}")
        return
    unknown = set(config) - set(FACTS["kv_transfer_config_key"])
    if unknown:
        problems.append(f"{where}: unknown KVTransferConfig keys {sorted(unknown)} "
                        f"(env.txt kv_transfer_config_key lines)")
    connector = config.get("kv_connector")
    if connector not in FACTS["connector"]:
        problems.append(f"{where}: kv_connector {connector!r} is not a registered vLLM connector")
    kv_role = config.get("kv_role")
    if kv_role not in FACTS["kv_role"]:
        problems.append(f"{where}: kv_role {kv_role!r} is not one of {sorted(FACTS['kv_role'])}")
    extra = config.get("kv_connector_extra_config", {})
    if not isinstance(extra, dict):
        problems.append(f"{where}: kv_connector_extra_config is not an object")
        return
    if connector == "MultiConnector":
        children = extra.get("connectors")
        if not isinstance(children, list) or not children:
            problems.append(f"{where}: MultiConnector needs kv_connector_extra_config.connectors (a list)")
            return
        for child in children:
            _check_transfer_config(child, role, f"{where} > MultiConnector child", problems, nested=True)
        if "connectors" not in FACTS.get("extra_config_key:MultiConnector", {}):
            problems.append(f"{where}: MultiConnector no longer reads the `connectors` key")
        pd = [c for c in children if isinstance(c, dict) and c.get("kv_connector") in PD_CONNECTORS]
        if len(pd) != 1:
            problems.append(f"{where}: MultiConnector must hold exactly one P/D connector, got {len(pd)}")
        return
    if connector in PD_CONNECTORS:
        wanted = "kv_producer" if role == "prefill" else "kv_consumer"
        if kv_role != wanted:
            deprecated = FACTS.get(f"deprecated_kv_role:{connector}", {})
            note = " (kv_both is deprecated for this connector)" if kv_role in deprecated else ""
            problems.append(f"{where}: {connector} on {role} must have kv_role {wanted!r}, got {kv_role!r}{note}")
        readable = FACTS.get(f"extra_config_key:{connector}", {})
        for key in extra:
            if key not in readable:
                problems.append(f"{where}: {connector} does not read kv_connector_extra_config key {key!r}")
        backends = extra.get("backends")
        if backends is not None and not (isinstance(backends, list) and all(isinstance(b, str) for b in backends)):
            problems.append(f"{where}: NIXL backends must be a list of names, got {backends!r}")
    del nested


PD_CONNECTORS = {"NixlConnector", "MooncakeConnector"}


def test_vllm_kv_transfer_config(workloads: list[Workload]) -> None:
    problems: list[str] = []
    for w in workloads:
        if w.listname != "vllm":
            continue
        raw = w.value("--kv-transfer-config")
        if raw is None:
            problems.append(f"{w.where()}: no --kv-transfer-config")
            continue
        try:
            config = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"{w.where()}: --kv-transfer-config is not JSON ({exc}): {raw}")
            continue
        _check_transfer_config(config, w.role, w.where(), problems, nested=False)
        connectors = {config.get("kv_connector")} | {
            c.get("kv_connector") for c in config.get("kv_connector_extra_config", {}).get("connectors", [])
        }
        wanted = "NixlConnector" if w.case.connector == "nixl" else "MooncakeConnector"
        if wanted not in connectors:
            problems.append(f"{w.where()}: kvTransfer.connector {w.case.connector} but no {wanted} in {raw}")
    assert not problems, "\n".join(problems)


CHOICE_FLAGS = {
    "sglang": ("--disaggregation-mode", "--disaggregation-transfer-backend", "--hicache-storage-backend"),
    "vllm-router": ("--policy", "--prefill-policy", "--decode-policy", "--kv-connector"),
    "sglang-router": ("--policy", "--prefill-policy", "--decode-policy"),
}


def test_flag_values_are_allowed(workloads: list[Workload]) -> None:
    problems: list[str] = []
    for w in workloads:
        for flag in CHOICE_FLAGS.get(w.listname, ()):
            value = w.value(flag)
            allowed = CHOICES.get((w.listname, flag))
            if value is None or allowed is None:
                continue
            if value not in allowed:
                problems.append(f"{w.where()}: {flag} {value!r} is not one of {sorted(allowed)} "
                                "(tests/data/engine_flags/choices.txt)")
        if w.listname == "sglang":
            mode = w.value("--disaggregation-mode")
            if mode != w.role:
                problems.append(f"{w.where()}: --disaggregation-mode must be {w.role!r}, got {mode!r}")
            backend = w.value("--disaggregation-transfer-backend")
            if backend != w.case.connector:
                problems.append(f"{w.where()}: --disaggregation-transfer-backend must be "
                                f"{w.case.connector!r}, got {backend!r}")
        if w.listname == "vllm-router":
            connector = w.value("--kv-connector")
            if connector != w.case.connector:
                problems.append(f"{w.where()}: --kv-connector must be {w.case.connector!r}, got {connector!r}")
        if w.role == "router":
            disaggregation = "--vllm-pd-disaggregation" if w.listname == "vllm-router" else "--pd-disaggregation"
            if disaggregation not in w.tokens:
                problems.append(f"{w.where()}: the router runs without {disaggregation}")
    assert not problems, "\n".join(problems)


def _annotation(listname: str) -> str:
    sources = FACTS["bootstrap_port_annotation"]
    matches = [name for name, source in sources.items() if source.startswith(f"{listname}-")]
    assert len(matches) == 1, f"env.txt should name one bootstrap_port_annotation for {listname}: {matches}"
    return matches[0]


def test_sglang_prefill_bootstrap_annotation(workloads: list[Workload]) -> None:
    """SGLang: the router reads each prefill pod's bootstrap port from its annotation."""
    for w in workloads:
        if w.listname != "sglang" or w.role != "prefill":
            continue
        key = _annotation("sglang-router")
        port = w.value("--disaggregation-bootstrap-port") or "8998"
        assert w.pod_annotations.get(key) == port, (
            f"{w.where()}: pod annotation {key!r} must be the bootstrap port {port}, "
            f"got {w.pod_annotations.get(key)!r}"
        )


def test_vllm_mooncake_is_refused() -> None:
    """vllm-router gives discovered prefill pods no Mooncake bootstrap data: the combination is refused."""
    from disagg.api.validate import InvalidSpec

    body = {
        "apiVersion": "disagg.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "vm", "namespace": "flags"},
        "spec": {
            "model": {"name": "org/model", "uri": "hf://org/model"},
            "engine": {"kind": "vllm"},
            "kvTransfer": {"connector": "mooncake"},
            "prefill": {"accelerator": {"type": "nvidia-h100"}},
            "decode": {"accelerator": {"type": "nvidia-h200"}},
        },
    }
    with pytest.raises(InvalidSpec, match=r"spec\.kvTransfer\.connector"):
        render_module.render_service(body, DEFAULT_CATALOG)


def test_router_metrics_reachable(workloads: list[Workload]) -> None:
    """A router whose metrics bind to loopback by default needs --prometheus-host to be scraped."""
    loopback = {"127.0.0.1", "localhost", "::1"}
    for w in workloads:
        if w.role != "router" or w.value("--prometheus-port") is None:
            continue
        host = w.value("--prometheus-host")
        assert host not in loopback, f"{w.where()}: --prometheus-host {host} cannot be scraped"
        default = CHOICES.get((f"{w.listname}:default", "--prometheus-host"), frozenset())
        assert not (host is None and default & loopback), (
            f"{w.where()} passes --prometheus-port but not --prometheus-host, and "
            f"{w.listname} binds metrics to {sorted(default)} by default: add --prometheus-host 0.0.0.0"
        )
