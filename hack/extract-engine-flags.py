#!/usr/bin/env python3
"""Extract the real command-line flags (and the env vars and connector names) of the engines and routers.

Writes tests/data/engine_flags/{vllm,sglang,vllm-router,sglang-router}.txt (one accepted flag per line,
sorted), env.txt (environment variables, KV connector names, kv-transfer-config keys, router discovery
annotations, with the file each came from) and choices.txt (allowed values of flags whose value we
render), each under a first comment line naming the package version and the date.
tests/unit/test_engine_flags.py checks every flag the operator renders against these lists.

How each list is obtained:

- vLLM (`vllm serve`): a static read of the wheel's source (no vLLM dependency is installed).
  vLLM derives most flags from config dataclass fields: `EngineArgs.add_cli_args` calls
  `group.add_argument("--flag", **get_kwargs(SomeConfig)["field"])`, and `FrontendArgs.add_cli_args`
  adds `--<field-name>` for every field of the frontend dataclasses. Boolean fields get
  `argparse.BooleanOptionalAction`, which vLLM's `FlexibleArgumentParser` replaces with its
  `EnableDisableAction`: `--x` also accepts `--no-x`, and `--enable-x` also `--disable-x` (and the other
  way round). This script replays exactly that: literal option strings of every `add_argument` call,
  field names of the frontend dataclasses, and the field types (read from vllm/config/*.py and the
  frontend module) to decide which flags get the negative forms. The static read needs no GPU stack
  and is exact for vLLM 0.33.0: `--live-python PY` cross-checks it against the parser vLLM really
  builds (imported with the given interpreter, one with vLLM and its ~5 GB of dependencies
  installed), and for 0.33.0 both gave the same 485 option strings. A difference fails the run, and
  an `add_argument` call the replay cannot follow stops it: a silent partial list is never written.
- SGLang (`python -m sglang.launch_server`): also static. `ServerArgs.add_cli_args` registers every
  `A[T, "help"]` / `A[T, Arg(...)]` field of the namespace classes listed in `_INPUT_NAMESPACES`
  (as `--field-name`, or `Arg(cli_name=...)`, plus `Arg(aliases=[...])`, skipping `Arg(no_cli=True)`),
  then a few literal `add_argument` calls. The script replays that, again with the negative forms of
  `BooleanOptionalAction` (plain argparse here: `--no-x`). For 0.5.23 it equals the live parser
  (561 option strings; `--live-python` imports the extracted SGLang source with that interpreter).
- vllm-router and sglang-router: installed into throwaway virtualenvs under the work directory and
  their `--help` output parsed (every option invocation line of the help text).

The wheels and virtualenvs stay in the work directory (default /tmp/disagg-engine-flags); only the
text files are meant to be committed.

Usage: .venv/bin/python hack/extract-engine-flags.py [--work DIR] [--out DIR] [--live-python PY]
       [--vllm-version V] [--sglang-version V] [--lmcache-version V]
       [--vllm-router-version V] [--sglang-router-version V]
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import re
import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "engine_flags"
DEFAULT_WORK = Path("/tmp/disagg-engine-flags")
SCRIPT = "hack/extract-engine-flags.py"

# Env vars the operator sets; every one must be found in the engines' sources or the run fails.
RELIED_ON_ENV = {
    "vllm": ["VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT", "VLLM_MOONCAKE_BOOTSTRAP_PORT"],
    "lmcache": [
        "LMCACHE_LOCAL_CPU",
        "LMCACHE_MAX_LOCAL_CPU_SIZE",
        "LMCACHE_LOCAL_DISK",
        "LMCACHE_MAX_LOCAL_DISK_SIZE",
        "LMCACHE_CHUNK_SIZE",
    ],
    "sglang": ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", "SGLANG_DISAGGREGATION_NIXL_BACKEND"],
}
RELIED_ON_CONNECTORS = ["NixlConnector", "MooncakeConnector", "LMCacheConnectorV1", "MultiConnector"]
# SGLang flags whose allowed values we record in choices.txt
SGLANG_CHOICE_FLAGS = [
    "--disaggregation-mode",
    "--disaggregation-transfer-backend",
    "--hicache-storage-backend",
    "--hicache-write-policy",
    "--hicache-io-backend",
    "--hicache-mem-layout",
]


# --- small helpers ------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[extract-engine-flags] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs: object) -> str:
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    return str(result.stdout)


def parse_file(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def const_str(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def long_negatives(options: Iterable[str], enable_disable: bool) -> set[str]:
    """The extra option strings BooleanOptionalAction (or vLLM's EnableDisableAction) accepts."""
    extra: set[str] = set()
    for opt in options:
        if not opt.startswith("--"):
            continue
        extra.add("--no-" + opt[2:])
        if enable_disable:
            if opt.startswith("--enable-"):
                extra.add("--disable-" + opt.removeprefix("--enable-"))
            elif opt.startswith("--disable-"):
                extra.add("--enable-" + opt.removeprefix("--disable-"))
    return extra


def is_boolean_optional_action(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return text in {"argparse.BooleanOptionalAction", "BooleanOptionalAction"}


# --- fetching -----------------------------------------------------------------------------------


def download_wheel(package: str, version: str | None, wheels: Path) -> Path:
    """`pip download --no-deps` one wheel (kept in the work directory, reused when present)."""
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    if version is None:
        existing = sorted(wheels.glob(f"{stem}-*.whl"))
        spec = package
    else:
        existing = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        spec = f"{package}=={version}"
    if not existing or version is None:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheels), spec])
        existing = sorted(wheels.glob(f"{stem}-{version or '*'}-*.whl"))
    if not existing:
        raise SystemExit(f"no wheel of {spec} in {wheels}")
    # the newest version when several are present
    return max(existing, key=lambda p: version_key(wheel_version(p)))


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def version_key(version: str) -> tuple[int | str, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"[.+]", version))


def extract(wheel: Path, dest: Path) -> Path:
    marker = dest / ".extracted-from"
    if marker.exists() and marker.read_text() == wheel.name:
        return dest
    log(f"extracting {wheel.name}")
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".py") or ".dist-info/" in m]
        archive.extractall(dest, members)
    marker.write_text(wheel.name)
    return dest


def router_help(package: str, version: str | None, work: Path, help_cmd: list[str]) -> tuple[str, str, Path]:
    """Install a router into its own virtualenv and return (version, --help text, site-packages)."""
    env_dir = work / f"venv-{package}"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.create(env_dir, with_pip=True)
    spec = package if version is None else f"{package}=={version}"
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", spec])
    installed = run([str(python), "-c",
                     f"import importlib.metadata as m; print(m.version({package!r}))"]).strip()
    command = [str(env_dir / "bin" / help_cmd[0]), *help_cmd[1:]] if help_cmd[0] != "python" else [
        str(python), *help_cmd[1:]]
    text = run(command)
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    return installed, text, site


# --- vLLM ---------------------------------------------------------------------------------------


@dataclass
class ClassInfo:
    name: str
    module: Path
    bases: list[str]
    fields: dict[str, ast.expr]
    is_dataclass: bool


@dataclass
class ModuleAliases:
    aliases: dict[str, ast.expr] = field(default_factory=dict)


class VllmSource:
    """Enough of vLLM's source, read statically, to replay how `vllm serve` builds its parser."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pkg = root / "vllm"
        self.classes: dict[str, ClassInfo] = {}
        self.aliases: dict[Path, dict[str, ast.expr]] = {}
        files = sorted((self.pkg / "config").rglob("*.py"))
        files += [self.pkg / "engine" / "arg_utils.py", self.pkg / "entrypoints" / "common" / "cli_args.py"]
        for path in files:
            self._index(path)

    def _index(self, path: Path) -> None:
        tree = parse_file(path)
        aliases: dict[str, ast.expr] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                aliases[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                if ast.unparse(node.annotation) in {"TypeAlias", "typing.TypeAlias"}:
                    aliases[node.target.id] = node.value
            elif type(node).__name__ == "TypeAlias":  # `type X = ...` (Python 3.12+ syntax)
                aliases[node.name.id] = node.value  # type: ignore[attr-defined]
            elif isinstance(node, ast.ClassDef):
                fields: dict[str, ast.expr] = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        if "ClassVar" in ast.unparse(stmt.annotation):
                            continue
                        fields[stmt.target.id] = stmt.annotation
                decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
                info = ClassInfo(
                    name=node.name,
                    module=path,
                    bases=[ast.unparse(b).split(".")[-1] for b in node.bases],
                    fields=fields,
                    is_dataclass=bool(decorators & {"config", "dataclass", "dataclasses.dataclass",
                                                    "pydantic.dataclasses.dataclass"}),
                )
                # the config package defines each config class once; keep the first definition
                self.classes.setdefault(node.name, info)
        self.aliases[path] = aliases

    def all_fields(self, cls: str) -> dict[str, tuple[ast.expr, Path]]:
        """Fields in MRO order (base classes first), like dataclasses.fields()."""
        info = self.classes.get(cls)
        if info is None:
            raise SystemExit(f"vLLM class {cls} not found in the indexed sources")
        out: dict[str, tuple[ast.expr, Path]] = {}
        for base in info.bases:
            if base in self.classes:
                out.update(self.all_fields(base))
        for name, annotation in info.fields.items():
            out[name] = (annotation, info.module)
        return out

    def type_names(self, annotation: ast.expr, module: Path, depth: int = 0) -> set[str]:
        """The flattened set of type names of an annotation, as vLLM's get_type_hints() sees them."""
        if depth > 5:
            return {ast.unparse(annotation)}
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            return self.type_names(ast.parse(annotation.value, mode="eval").body, module, depth + 1)
        if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
            return self.type_names(annotation.left, module, depth) | self.type_names(annotation.right, module,
                                                                                     depth)
        if isinstance(annotation, ast.Subscript):
            head = ast.unparse(annotation.value).split(".")[-1]
            if head in {"Union", "Optional"}:
                elts = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
                names: set[str] = set()
                for elt in elts:
                    names |= self.type_names(elt, module, depth)
                if head == "Optional":
                    names.add("None")
                return names
            if head == "Annotated":
                first = annotation.slice.elts[0] if isinstance(annotation.slice, ast.Tuple) else annotation.slice
                return self.type_names(first, module, depth)
            return {head}
        if isinstance(annotation, ast.Name):
            alias = self.aliases.get(module, {}).get(annotation.id)
            if alias is not None and not isinstance(alias, ast.Call):
                return self.type_names(alias, module, depth + 1)
            return {annotation.id}
        if isinstance(annotation, ast.Constant) and annotation.value is None:
            return {"None"}
        return {ast.unparse(annotation).split(".")[-1]}

    def field_is_boolean_flag(self, cls: str, field_name: str) -> bool:
        """Mirrors vllm.engine.arg_utils._compute_kwargs: does the field get BooleanOptionalAction?"""
        fields = self.all_fields(cls)
        if field_name not in fields:
            raise SystemExit(f"vLLM: {cls} has no field {field_name}")
        annotation, module = fields[field_name]
        names = self.type_names(annotation, module)
        if any(self.classes.get(n) is not None and self.classes[n].is_dataclass for n in names):
            return False  # parsed as a JSON dataclass
        if names == {"bool", "str", "None"}:
            return False  # optional-valued flag (nargs="?")
        return "bool" in names


def _function(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    parts = qualname.split(".")
    body: list[ast.stmt] = tree.body
    node: ast.AST | None = None
    for part in parts:
        node = next((n for n in body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == part), None)
        if node is None:
            raise SystemExit(f"{qualname} not found")
        body = node.body
    assert isinstance(node, ast.FunctionDef)
    return node


def vllm_flags_static(root: Path) -> set[str]:
    src = VllmSource(root)
    arg_utils = parse_file(src.pkg / "engine" / "arg_utils.py")
    cli_args = parse_file(src.pkg / "entrypoints" / "common" / "cli_args.py")
    flags: set[str] = {"-h", "--help"}

    def replay(func: ast.FunctionDef) -> None:
        kwargs_of: dict[str, str] = {}  # variable -> config class of get_kwargs(cls)
        field_of: dict[str, tuple[str, str]] = {}  # variable -> (class, field) of get_kwargs(cls)["f"]
        action_set: dict[str, bool] = {}  # kwargs expression -> whether `expr["action"] = ...` is boolean
        for node in ast.walk(func):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            target_node, value = node.targets[0], node.value
            if isinstance(target_node, ast.Subscript) and const_str(target_node.slice) == "action":
                action_set[ast.unparse(target_node.value)] = is_boolean_optional_action(value)
            if not isinstance(target_node, ast.Name):
                continue
            target = target_node.id
            if isinstance(value, ast.Call) and ast.unparse(value.func) == "get_kwargs":
                kwargs_of[target] = ast.unparse(value.args[0])
            elif isinstance(value, ast.Subscript):
                key = const_str(value.slice)
                if isinstance(value.value, ast.Call) and ast.unparse(value.value.func) == "get_kwargs":
                    assert key is not None
                    field_of[target] = (ast.unparse(value.value.args[0]), key)
                elif isinstance(value.value, ast.Name) and value.value.id in kwargs_of:
                    assert key is not None
                    field_of[target] = (kwargs_of[value.value.id], key)

        def boolean(expr: ast.expr) -> bool | None:
            """Whether a `**expr` kwargs mapping carries BooleanOptionalAction (None: no action info)."""
            if ast.unparse(expr) in action_set:
                return action_set[ast.unparse(expr)]
            if isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Name) and expr.value.id in kwargs_of:
                key = const_str(expr.slice)
                assert key is not None, ast.unparse(expr)
                return src.field_is_boolean_flag(kwargs_of[expr.value.id], key)
            if isinstance(expr, ast.Name) and expr.id in field_of:
                return src.field_is_boolean_flag(*field_of[expr.id])
            if isinstance(expr, ast.Dict):
                result: bool | None = None
                for key_node, value in zip(expr.keys, expr.values, strict=True):
                    if key_node is None:
                        inner = boolean(value)
                        if inner is not None:
                            result = inner
                    elif const_str(key_node) == "action":
                        result = is_boolean_optional_action(value)
                return result
            raise SystemExit(f"vLLM: cannot follow **{ast.unparse(expr)} in {func.name}")

        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            options = [s for a in node.args if (s := const_str(a)) is not None and s.startswith("-")]
            if any(not isinstance(a, ast.Constant) for a in node.args):
                continue  # the generic dataclass loop, handled by frontend_flags()
            if not options:
                continue  # a positional argument
            is_bool = False
            for kw in node.keywords:
                if kw.arg == "action":
                    is_bool = is_boolean_optional_action(kw.value)
                elif kw.arg is None:
                    is_bool = bool(boolean(kw.value))
            flags.update(options)
            if is_bool:
                flags.update(long_negatives(options, enable_disable=True))

    def frontend_flags(cls: str) -> None:
        """BaseFrontendArgs.add_cli_args: `--<field>` for every field, bools with negative forms."""
        for name in src.all_fields(cls):
            option = "--" + name.replace("_", "-")
            flags.add(option)
            if src.field_is_boolean_flag(cls, name):
                flags.update(long_negatives([option], enable_disable=True))

    make_arg_parser = _function(cli_args, "make_arg_parser")
    replay(make_arg_parser)
    generic = _function(cli_args, "BaseFrontendArgs.add_cli_args")
    if "replace" not in ast.unparse(generic):
        raise SystemExit("vLLM: BaseFrontendArgs.add_cli_args no longer derives flags from field names")
    for call in ast.walk(make_arg_parser):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "add_cli_args"):
            owner = ast.unparse(call.func.value)
            if owner == "AsyncEngineArgs":
                replay(_function(arg_utils, "EngineArgs.add_cli_args"))
                replay(_function(arg_utils, "AsyncEngineArgs.add_cli_args"))
            elif owner in src.classes:
                frontend_flags(owner)
            else:
                raise SystemExit(f"vLLM: make_arg_parser calls unknown {owner}.add_cli_args")
    return flags


LIVE_VLLM = """
import json, sys
sys.argv = ["vllm", "serve"]
from vllm.platforms import current_platform
# without an accelerator the platform is unspecified and DeviceConfig() refuses to build; the option
# strings do not depend on it
current_platform.device_type = current_platform.device_type or "cpu"
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.common.cli_args import make_arg_parser
parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
print(json.dumps(sorted(parser._option_string_actions)))
"""


def vllm_flags_live(python: str, root: Path) -> set[str]:
    out = run([python, "-c", LIVE_VLLM], cwd=str(root))
    return set(json.loads(out.strip().splitlines()[-1]))


# --- SGLang -------------------------------------------------------------------------------------

LIVE_SGLANG = """
import argparse, json, sys
sys.path.insert(0, sys.argv[1])
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser(prog="sglang serve")  # as prepare_server_args() builds it
ServerArgs.add_cli_args(parser)
print(json.dumps(sorted(parser._option_string_actions)))
"""


def sglang_flags_live(python: str, root: Path) -> set[str]:
    out = run([python, "-c", LIVE_SGLANG, str(root)], cwd=str(root.parent))
    return set(json.loads(out.strip().splitlines()[-1]))



def _module_lists(tree: ast.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.List | ast.Tuple)):
            values = [const_str(e) for e in node.value.elts]
            if all(v is not None for v in values):
                out[node.targets[0].id] = [v for v in values if v is not None]
    return out


def sglang_flags_static(root: Path) -> tuple[set[str], dict[str, list[str]]]:
    """(accepted flags, allowed values per flag where declared literally)."""
    srt = root / "sglang" / "srt"
    server_args = parse_file(srt / "server_args.py")
    namespaces: list[str] = []
    for node in server_args.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in node.targets
        ):
            assert isinstance(node.value, ast.List)
            namespaces = [ast.unparse(e) for e in node.value.elts]
    if not namespaces:
        raise SystemExit("SGLang: _INPUT_NAMESPACES not found in server_args.py")
    choice_lists: dict[str, list[str]] = {}
    for path in sorted((srt / "arg_groups").glob("*.py")):
        choice_lists.update(_module_lists(parse_file(path)))
    classes: dict[str, ast.ClassDef] = {}
    for path in sorted((srt / "arg_groups" / "fields").glob("*.py")):
        tree = parse_file(path)
        choice_lists.update(_module_lists(tree))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node

    flags: set[str] = {"-h", "--help"}
    choices: dict[str, list[str]] = {}
    for ns in namespaces:
        cls = classes.get(ns)
        if cls is None:
            raise SystemExit(f"SGLang: namespace class {ns} not found under arg_groups/fields")
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            ann = stmt.annotation
            if not (isinstance(ann, ast.Subscript) and ast.unparse(ann.value) in {"A", "Annotated"}
                    and isinstance(ann.slice, ast.Tuple)):
                continue  # no CLI metadata: add_cli_args_from_dataclass skips it
            inner, metas = ann.slice.elts[0], ann.slice.elts[1:]
            arg: ast.Call | None = None
            has_help = False
            for meta in metas:
                if isinstance(meta, ast.Call) and ast.unparse(meta.func) == "Arg":
                    arg = meta
                    break
                if isinstance(meta, ast.Constant | ast.JoinedStr | ast.BinOp):
                    has_help = True
                    break
            if arg is None and not has_help:
                continue
            kws = {kw.arg: kw.value for kw in (arg.keywords if arg else []) if kw.arg}
            if "no_cli" in kws and ast.unparse(kws["no_cli"]) == "True":
                continue
            name = stmt.target.id
            cli_name = const_str(kws.get("cli_name")) or "--" + name.replace("_", "-")
            names = [cli_name]
            if "aliases" in kws:
                aliases = kws["aliases"]
                assert isinstance(aliases, ast.List), ast.unparse(aliases)
                names += [s for e in aliases.elts if (s := const_str(e)) is not None]
            flags.update(names)
            if "action" in kws and is_boolean_optional_action(kws["action"]):
                flags.update(long_negatives(names, enable_disable=False))
            values: list[str] | None = None
            if "choices" in kws:
                declared = kws["choices"]
                if isinstance(declared, ast.List):
                    values = [s for e in declared.elts if (s := const_str(e)) is not None]
                elif isinstance(declared, ast.Name):
                    values = choice_lists.get(declared.id)
            else:
                base = inner
                if isinstance(base, ast.Subscript) and ast.unparse(base.value) == "Optional":
                    base = base.slice
                if isinstance(base, ast.Subscript) and ast.unparse(base.value) == "Literal":
                    elts = base.slice.elts if isinstance(base.slice, ast.Tuple) else [base.slice]
                    values = [s for e in elts if (s := const_str(e)) is not None]
            if values:
                for option in names:
                    choices[option] = values

    add_cli_args = _function(server_args, "ServerArgs.add_cli_args")
    for call in ast.walk(add_cli_args):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument":
            options = [s for a in call.args if (s := const_str(a)) is not None and s.startswith("-")]
            flags.update(options)
            for kw in call.keywords:
                if kw.arg == "action" and is_boolean_optional_action(kw.value):
                    flags.update(long_negatives(options, enable_disable=False))
    return flags, choices


# --- routers ------------------------------------------------------------------------------------


def help_flags(text: str) -> tuple[set[str], dict[str, list[str]], dict[str, str]]:
    """Option strings, `{a,b}` choices and `(default: x)` defaults of argparse --help output."""
    flags: set[str] = set()
    choices: dict[str, list[str]] = {}
    defaults: dict[str, str] = {}
    current: list[str] = []
    description: list[str] = []

    def close() -> None:
        found = re.findall(r"\(default: ([^()]*)\)", " ".join(" ".join(description).split()))
        if found:
            for option in current:
                defaults[option] = found[-1]

    for line in text.splitlines():
        if not re.match(r"^  -", line):
            if current and line.startswith("   "):
                description.append(line.strip())
            else:
                close()
                current, description = [], []
            continue
        close()
        current, description = [], []
        invocation, *rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        description = list(rest)
        for part in invocation.split(", "):
            tokens = part.split(" ", 1)
            option = tokens[0]
            if not re.fullmatch(r"--?[A-Za-z0-9][A-Za-z0-9_.-]*", option):
                continue
            flags.add(option)
            current.append(option)
            if len(tokens) > 1 and (m := re.match(r"\{([^}]*)\}", tokens[1])):
                choices[option] = m.group(1).split(",")
    close()
    usage = set(re.findall(r"\[(--?[A-Za-z0-9][A-Za-z0-9_-]*)", text.split("\n\n", 1)[0]))
    missing = usage - flags
    if missing:
        raise SystemExit(f"flags in the usage line but not in the option list: {sorted(missing)}")
    return flags, choices, defaults


def router_annotation(site: Path, module: str) -> tuple[str, str]:
    """The default Kubernetes annotation the router reads the prefill bootstrap port from."""
    path = site / module / "router_args.py"
    tree = parse_file(path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.target.id == "bootstrap_port_annotation"):
            value = const_str(node.value)
            if value:
                return value, f"{module}/router_args.py"
    raise SystemExit(f"no bootstrap_port_annotation default in {path}")


# --- env vars and connector facts ---------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Fact:
    kind: str
    name: str
    source: str

    def line(self) -> str:
        return f"{self.kind} {self.name} {self.source}"


def vllm_facts(root: Path) -> Iterator[Fact]:
    pkg = root / "vllm"
    envs_py = "vllm/envs.py"
    for node in ast.walk(parse_file(pkg / "envs.py")):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == "environment_variables":
                assert isinstance(node.value, ast.Dict)
                for key in node.value.keys:
                    name = const_str(key)
                    if name:
                        yield Fact("env", name, envs_py)
    kvc = pkg / "distributed" / "kv_transfer" / "kv_connector"
    factory = "vllm/distributed/kv_transfer/kv_connector/factory.py"
    for node in ast.walk(parse_file(kvc / "factory.py")):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("register_connector"):
            name = const_str(node.args[0]) if node.args else None
            if name:
                yield Fact("connector", name, factory)
    kv_transfer = "vllm/config/kv_transfer.py"
    tree = parse_file(pkg / "config" / "kv_transfer.py")
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "KVTransferConfig":
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    yield Fact("kv_transfer_config_key", stmt.target.id, kv_transfer)
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in {"KVProducer", "KVConsumer"}):
            for const in ast.walk(node.value):
                role = const_str(const)
                if role:
                    yield Fact("kv_role", role, kv_transfer)
    # keys each connector reads from kv_connector_extra_config
    for path in sorted(kvc.rglob("*.py")):
        rel = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        connector = None
        if "/nixl/" in rel:
            connector = "NixlConnector"
        elif rel.endswith("multi_connector.py"):
            connector = "MultiConnector"
        elif "/mooncake/" in rel and "store" not in rel:
            connector = "MooncakeConnector"
        if connector is None:
            continue
        for key in sorted(set(re.findall(r"get_from_extra_config\(\s*[\"']([A-Za-z0-9_]+)[\"']", text))
                          | set(re.findall(r"kv_connector_extra_config\s*\.get\(\s*[\"']([A-Za-z0-9_]+)[\"']",
                                           text))):
            yield Fact(f"extra_config_key:{connector}", key, rel)
        if connector == "NixlConnector":
            for node in ast.walk(parse_file(path)):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and ast.unparse(node.targets[0]) == "self.side_channel_port"):
                    expr = re.sub(r"\s+", "", ast.unparse(node.value))
                    yield Fact("nixl_side_channel_port", expr, rel)
                if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("get_from_extra_config")
                        and len(node.args) > 1 and const_str(node.args[0]) == "backends"):
                    default = re.sub(r"\s+", "", ast.unparse(node.args[1]))
                    yield Fact("nixl_default_backends", default, rel)
        if connector == "MooncakeConnector" and "VLLM_MOONCAKE_BOOTSTRAP_PORT" in text:
            yield Fact("reads_env:MooncakeConnector", "VLLM_MOONCAKE_BOOTSTRAP_PORT", rel)
    # kv_role values NixlConnector warns about
    nixl_connector = kvc / "v1" / "nixl" / "connector.py"
    if nixl_connector.exists() and "Using kv_role='kv_both' with NixlConnector is deprecated" in (
        nixl_connector.read_text(encoding="utf-8")
    ):
        yield Fact("deprecated_kv_role:NixlConnector", "kv_both", str(nixl_connector.relative_to(root)))


def lmcache_facts(root: Path) -> Iterator[Fact]:
    rel = "lmcache/v1/config.py"
    tree = parse_file(root / rel)
    for node in tree.body:
        target: ast.expr
        value: ast.expr | None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign):
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "_CONFIG_DEFINITIONS":
            assert isinstance(value, ast.Dict)
            for key in value.keys:
                name = const_str(key)
                if name:
                    yield Fact("env", f"LMCACHE_{name.upper()}", rel)
    text = (root / rel).read_text(encoding="utf-8")
    if 'f"LMCACHE_{attr_name.upper()}"' not in text and "LMCACHE_" not in text:
        raise SystemExit("LMCache: the LMCACHE_<NAME> env convention is no longer in config.py")
    yield Fact("env", "LMCACHE_CONFIG_FILE", rel)


def sglang_facts(root: Path) -> Iterator[Fact]:
    rel = "sglang/srt/environ.py"
    tree = parse_file(root / rel)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Envs":
            for stmt in ast.walk(node):
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                        and isinstance(stmt.targets[0], ast.Name) and isinstance(stmt.value, ast.Call)
                        and ast.unparse(stmt.value.func).startswith("Env")):
                    yield Fact("env", stmt.targets[0].id, rel)


# --- output -------------------------------------------------------------------------------------


def write_list(path: Path, header: str, lines: Iterable[str]) -> None:
    body = sorted(set(lines))
    path.write_text(f"# {header}\n" + "".join(f"{line}\n" for line in body), encoding="utf-8")
    log(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} ({len(body)} lines)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="wheels, sources and venvs go here")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--live-python", help="an interpreter that can import vLLM (installed) and SGLang (from "
                        "the extracted wheel: its dependencies installed), to cross-check the static reads")
    for package in ("vllm", "sglang", "lmcache", "vllm-router", "sglang-router"):
        parser.add_argument(f"--{package}-version", help=f"pin {package} (default: newest)")
    args = parser.parse_args()
    work: Path = args.work
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    wheels = work / "wheels"

    def header(package: str, version: str, extra: str = "") -> str:
        return f"{package} {version}, extracted by {SCRIPT} on {today}{extra}"

    # vLLM
    vllm_wheel = download_wheel("vllm", args.vllm_version, wheels)
    vllm_version = wheel_version(vllm_wheel)
    vllm_root = extract(vllm_wheel, work / "src" / f"vllm-{vllm_version}")
    vllm = vllm_flags_static(vllm_root)
    checked = ""
    if args.live_python:
        live = vllm_flags_live(args.live_python, work)
        if live != vllm:
            raise SystemExit(
                "vLLM static and live flag sets differ:\n"
                f"  only static: {sorted(vllm - live)}\n  only live: {sorted(live - vllm)}"
            )
        checked = " (static read, equal to the live parser)"
    write_list(out / "vllm.txt", header("vllm", vllm_version, checked + "; accepted `vllm serve` options"), vllm)

    # SGLang
    sglang_wheel = download_wheel("sglang", args.sglang_version, wheels)
    sglang_version = wheel_version(sglang_wheel)
    sglang_root = extract(sglang_wheel, work / "src" / f"sglang-{sglang_version}")
    sglang, sglang_choices = sglang_flags_static(sglang_root)
    checked = ""
    if args.live_python:
        live = sglang_flags_live(args.live_python, sglang_root)
        if live != sglang:
            raise SystemExit(
                "SGLang static and live flag sets differ:\n"
                f"  only static: {sorted(sglang - live)}\n  only live: {sorted(live - sglang)}"
            )
        checked = " (static read, equal to the live parser)"
    write_list(out / "sglang.txt",
               header("sglang", sglang_version, checked + "; accepted `python -m sglang.launch_server` options"),
               sglang)

    # LMCache (env vars only)
    lmcache_wheel = download_wheel("lmcache", args.lmcache_version, wheels)
    lmcache_version = wheel_version(lmcache_wheel)
    lmcache_root = extract(lmcache_wheel, work / "src" / f"lmcache-{lmcache_version}")

    # routers
    vr_version, vr_help, vr_site = router_help("vllm-router", args.vllm_router_version, work,
                                               ["vllm-router", "--help"])
    vr_flags, vr_choices, vr_defaults = help_flags(vr_help)
    write_list(out / "vllm-router.txt", header("vllm-router", vr_version, "; `vllm-router --help`"), vr_flags)
    sr_version, sr_help, sr_site = router_help(
        "sglang-router", args.sglang_router_version, work,
        ["python", "-m", "sglang_router.launch_router", "--help"])
    sr_flags, sr_choices, sr_defaults = help_flags(sr_help)
    write_list(out / "sglang-router.txt",
               header("sglang-router", sr_version, "; `python -m sglang_router.launch_router --help`"), sr_flags)

    # env vars, connectors, annotations
    facts = {
        *(Fact(f.kind, f.name, f"vllm-{vllm_version}:{f.source}") for f in vllm_facts(vllm_root)),
        *(Fact(f.kind, f.name, f"lmcache-{lmcache_version}:{f.source}") for f in lmcache_facts(lmcache_root)),
        *(Fact(f.kind, f.name, f"sglang-{sglang_version}:{f.source}") for f in sglang_facts(sglang_root)),
    }
    for site, module, version, package in ((vr_site, "vllm_router", vr_version, "vllm-router"),
                                           (sr_site, "sglang_router", sr_version, "sglang-router")):
        annotation, source = router_annotation(site, module)
        facts.add(Fact("bootstrap_port_annotation", annotation, f"{package}-{version}:{source}"))
        flag_name = "--bootstrap-port-annotation"
        facts.add(Fact("bootstrap_port_annotation_flag",
                       "yes" if flag_name in (vr_flags if package == "vllm-router" else sr_flags) else "no",
                       f"{package}-{version}:--help"))
    names = {(f.kind, f.name) for f in facts}
    missing = [n for group in RELIED_ON_ENV.values() for n in group if ("env", n) not in names]
    missing += [c for c in RELIED_ON_CONNECTORS if ("connector", c) not in names]
    if missing:
        raise SystemExit(f"names the operator relies on are not in the engines' sources: {missing}")
    write_list(out / "env.txt",
               f"vllm {vllm_version}, sglang {sglang_version}, lmcache {lmcache_version}, vllm-router "
               f"{vr_version}, sglang-router {sr_version}, extracted by {SCRIPT} on {today}; "
               "lines: <kind> <name> <package-version>:<file>",
               (f.line() for f in facts))

    choice_lines = [f"sglang {flag} {value}" for flag in SGLANG_CHOICE_FLAGS
                    for value in sglang_choices.get(flag, [])]
    choice_lines += [f"vllm-router {flag} {value}" for flag, values in vr_choices.items() for value in values]
    choice_lines += [f"sglang-router {flag} {value}" for flag, values in sr_choices.items() for value in values]
    choice_lines += [f"vllm-router:default {flag} {value}" for flag, value in vr_defaults.items()]
    choice_lines += [f"sglang-router:default {flag} {value}" for flag, value in sr_defaults.items()]
    write_list(out / "choices.txt",
               f"sglang {sglang_version}, vllm-router {vr_version}, sglang-router {sr_version}, extracted by "
               f"{SCRIPT} on {today}; lines: <list> <flag> <allowed value>, or <list>:default <flag> <default "
               "from --help>",
               choice_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
