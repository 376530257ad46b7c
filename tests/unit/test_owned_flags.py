"""Flags the operator sets cannot be overridden by spelling (issue 18, item 7).

The engines read a flag's name loosely: vLLM's FlexibleArgumentParser turns `_` into `-` and reads
`--flag.key=value` as a key of the JSON flag `--flag`; both parsers are argparse with abbreviations
allowed, so a unique prefix is the flag. Here a real argparse parser is built from each engine's
recorded option list (tests/data/engine_flags/) and every spelling is checked against what it sets.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
from typing import Any

import pytest

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.engines import (
    MULTINODE_FLAGS,
    OWNED_FLAGS,
    OWNED_WITH_CPU_TIER,
    OWNED_WITH_DISK_TIER,
    OWNED_WITH_OBJECT_STORAGE,
    owned_flag,
)
from disagg.render import render_service
from support.paths import REPO

DATA = REPO / "tests" / "data" / "engine_flags"
ALL_OWNED = {engine: {**OWNED_FLAGS[engine], **OWNED_WITH_OBJECT_STORAGE[engine], **OWNED_WITH_CPU_TIER[engine],
                      **OWNED_WITH_DISK_TIER[engine]} for engine in OWNED_FLAGS}
# option strings of one argparse action (the operator owns the action, so every name of it)
ALIASES: dict[str, list[tuple[str, ...]]] = {
    "vllm": [("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"), ("--data-parallel-size", "-dp"),
             ("--data-parallel-size-local", "-dpl"), ("--data-parallel-address", "-dpa"),
             ("--data-parallel-rpc-port", "-dpp"), ("--data-parallel-start-rank", "-dpr"), ("--nnodes", "-n"),
             ("--node-rank", "-r"), ("--enable-expert-parallel", "-ep")],
    "sglang": [("--tp-size", "--tensor-parallel-size"), ("--model-path", "--model"),
               ("--pp-size", "--pipeline-parallel-size"), ("--dp-size", "--data-parallel-size"),
               ("--ep-size", "--expert-parallel-size", "--ep")],
}
OWNED_SETS: dict[str, dict[str, dict[str, str]]] = {
    "always or with a feature": ALL_OWNED, "with several ranks or nodes": MULTINODE_FLAGS}


def options(engine: str) -> list[str]:
    lines = (DATA / f"{engine}.txt").read_text().splitlines()
    return [line for line in lines if line.startswith("-")]


def parser(engine: str) -> argparse.ArgumentParser:
    """argparse with the engine's option strings, each action's dest its first option string."""
    built = argparse.ArgumentParser(add_help=False, allow_abbrev=True, exit_on_error=False)
    grouped = {option for group in ALIASES[engine] for option in group}
    for group in ALIASES[engine]:
        built.add_argument(*group, dest=group[0], nargs="?", const=True)
    for option in options(engine):
        if option not in grouped:
            built.add_argument(option, dest=option, nargs="?", const=True)
    return built


def vllm_preprocess(arg: str) -> str:
    """What FlexibleArgumentParser hands argparse for one argument (the key of `--flag.key=v` is --flag)."""
    if arg.startswith("--"):
        key, sep, value = arg.partition("=")
        head, dot, rest = key[2:].partition(".")
        key = "--" + head.replace("_", "-") + dot + rest
        arg = key + sep + value
    if arg.startswith("-") and "." in arg.split("=", 1)[0]:
        return arg.split("=", 1)[0].split(".", 1)[0]  # appended later as `--flag '{json}'`
    return arg


def sets(engine: str, arg: str) -> str | None:
    """The action (by its first option string) the engine's parser sets for `arg`, or None."""
    if engine == "vllm":
        arg = vllm_preprocess(arg)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            namespace, rest = PARSERS[engine].parse_known_args([arg])
    except (argparse.ArgumentError, SystemExit):  # ambiguous: the engine stops; nothing is overridden
        return None
    found = [dest for dest, value in vars(namespace).items() if value is not None]
    return found[0] if len(found) == 1 and not rest else None


PARSERS = {engine: parser(engine) for engine in ("vllm", "sglang")}


def canonical(engine: str, option: str | None) -> str | None:
    for group in ALIASES[engine]:
        if option in group:
            return group[0]
    return option


def spellings(engine: str, owned: dict[str, str]) -> list[str]:
    """Every prefix of every owned flag, with '=' and '.', '_' forms and single-dash forms, plus near misses."""
    found: set[str] = set()
    for option in itertools.chain(owned, ["--max-model-len", "--disaggregation-mode", "--tp",
                                                        "--enable-metrics-for-all-schedulers"]):
        dashes = 2 if option.startswith("--") else 1
        for end in range(dashes + 1, len(option) + 1):
            prefix = option[:end]
            found |= {prefix, f"{prefix}=1", prefix.replace("-", "_").replace("__", "--", 1), f"{prefix}.key=1"}
    return sorted(found)


@pytest.mark.parametrize("flags", OWNED_SETS)
def test_shortest_prefixes_are_those_the_recorded_parsers_resolve(flags: str) -> None:
    for engine, owned in OWNED_SETS[flags].items():
        names = options(engine)
        same = {option: set(group) for group in ALIASES[engine] for option in group}
        for option, shortest in owned.items():
            long = option.startswith("--")
            for end in range(len(option), 0, -1):
                prefix = option[:end]
                matching = {o for o in names if o.startswith(prefix) and o.startswith("--") == long}
                if prefix != option and (prefix in names or not matching <= same.get(option, {option})):
                    break
                expected = prefix
            assert shortest == expected, (engine, option)


@pytest.mark.parametrize("flags", OWNED_SETS)
@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_every_spelling_is_owned_exactly_when_the_engines_parser_sets_an_owned_flag(engine: str, flags: str) -> None:
    owned = OWNED_SETS[flags][engine]
    owned_actions = {canonical(engine, option) for option in owned}
    wrong = []
    for arg in spellings(engine, owned):
        by_parser = canonical(engine, sets(engine, arg))
        expected = by_parser if by_parser in owned_actions else None
        found = canonical(engine, owned_flag(engine, arg, owned))
        if found != expected:
            wrong.append(f"{arg}: the parser sets {by_parser}, owned_flag says {found}")
    assert not wrong, "\n".join(wrong)


def service(kind: str = "vllm", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "disagg.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "svc", "namespace": "n"},
        "spec": {"model": {"name": "m", "uri": "hf://org/m"}, "engine": {"kind": kind},
                 "prefill": {"accelerator": {"type": "nvidia-h100"}},
                 "decode": {"accelerator": {"type": "nvidia-h200"}}},
    }
    body["spec"].update(copy.deepcopy(spec))
    return body


OVERRIDES = [
    ("vllm", "engine", "--tensor_parallel_size=8"), ("vllm", "prefill", "--kv-transfer-config.kv_role=kv_both"),
    ("vllm", "decode", "--kv_transfer_config.kv_connector"), ("vllm", "engine", "-t"), ("vllm", "engine", "--te"),
    ("vllm", "engine", "--served_model"), ("vllm", "engine", "-tp.x=1"), ("vllm", "decode", "--por=8001"),
    ("sglang", "prefill", "--disaggregation-mod=decode"), ("sglang", "engine", "--tp=8"),
    ("sglang", "decode", "--model-pa=x"), ("sglang", "engine", "--enable-metrics"), ("sglang", "engine", "--po"),
]


@pytest.mark.parametrize(("engine", "where", "arg"), OVERRIDES)
def test_an_owned_flag_in_any_spelling_is_refused_naming_the_argument(engine: str, where: str, arg: str) -> None:
    body = service(engine)
    body["spec"].setdefault(where, {})["extraArgs"] = ["--enforce-eager" if engine == "vllm" else "--trust-remote-code",
                                                       arg]
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert [e.field for e in caught.value.errors] == [f"spec.{where}.extraArgs[1]"], caught.value
    assert "set by the operator" in str(caught.value)


@pytest.mark.parametrize(("engine", "arg", "spec"), [
    ("vllm", "--load-format=auto", {"model": {"name": "m", "uri": "s3://bucket/m"}}),
    ("sglang", "--hicache-si=8", {"kvCache": {"cpuOffloadGiB": 16}}),
    ("sglang", "--hicache-storage-backend=file", {"kvCache": {"cpuOffloadGiB": 16, "disk": {"size": "10Gi"}}}),
])
def test_flags_owned_only_with_a_feature_are_refused_with_it_and_taken_without(engine: str, arg: str,
                                                                                spec: dict[str, Any]) -> None:
    with pytest.raises(InvalidSpec, match="set by the operator"):
        validate_service(service(engine, engine={"kind": engine, "extraArgs": [arg]}, **spec), DEFAULT_CATALOG)
    validate_service(service(engine, engine={"kind": engine, "extraArgs": [arg]}), DEFAULT_CATALOG)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("tiers", [False, True])
@pytest.mark.parametrize("uri", ["hf://org/m", "s3://bucket/m", "pvc://claim/m"])
def test_every_flag_the_operator_renders_is_one_it_owns(engine: str, tiers: bool, uri: str) -> None:
    if engine == "sglang" and uri.startswith("s3"):
        return
    spec: dict[str, Any] = {"model": {"name": "m", "uri": uri}, "kvTransfer": {"backend": "ucx"}}
    if tiers:
        spec["kvCache"] = {"cpuOffloadGiB": 16, "disk": {"size": "100Gi"}}
    body = service(engine, **spec)
    parsed = validate_service(copy.deepcopy(body), DEFAULT_CATALOG)
    for manifest in render_service(body, DEFAULT_CATALOG):
        if manifest["kind"] != "Deployment" or manifest["metadata"]["name"].endswith("-router"):
            continue
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        for token in container["args"]:
            if token.startswith("-"):
                assert owned_flag(engine, token, parsed.owned_flags()) is not None, (engine, token)


@pytest.mark.parametrize(("field", "value"), [
    ("model.name", "--trust-remote-code"), ("model.name", "-"), ("model.uri", "hf://--trust-remote-code"),
    ("model.uri", "hf://-"), ("model.revision", "-main"),
])
def test_values_the_engine_would_read_as_flags_are_refused(field: str, value: str) -> None:
    body = service()
    section, key = field.split(".")
    body["spec"][section][key] = value
    with pytest.raises(InvalidSpec) as caught:
        validate_service(body, DEFAULT_CATALOG)
    assert [e.field for e in caught.value.errors] == [f"spec.{field}"], caught.value


@pytest.mark.parametrize("backend", ["ucx", "libfabric"])
def test_sglang_honours_the_nixl_backend(backend: str) -> None:
    body = service("sglang", kvTransfer={"connector": "nixl", "backend": backend})
    pools = [m for m in render_service(body, DEFAULT_CATALOG)
             if m["kind"] == "Deployment" and not m["metadata"]["name"].endswith("-router")]
    assert len(pools) == 2
    for pool in pools:
        (container,) = pool["spec"]["template"]["spec"]["containers"]
        assert {"name": "SGLANG_DISAGGREGATION_NIXL_BACKEND", "value": backend.upper()} in container["env"]
