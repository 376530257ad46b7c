#!/usr/bin/env python3
"""Prints the code's shape: the largest modules and functions, the kopf handlers' sizes, which modules
import `kubernetes` and `kopf`, where the code branches on an engine's kind outside the engine adapters,
and (with --image) the files the operator image installs from the wheel. Issue notes quote it before and
after a restructuring.

    python3 hack/figures.py [--top N] [--image] [ROOT ...]      (default roots: operator lab)
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def python_files(roots: list[str]) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py") if ".venv" not in p.parts)


def lines_of(node: ast.AST) -> int:
    return int(getattr(node, "end_lineno", 0) or 0) - int(getattr(node, "lineno", 0) or 0) + 1


def is_kopf_handler(node: ast.FunctionDef | ast.AsyncFunctionDef, registered: set[str]) -> bool:
    """Decorated with `kopf.on.<something>(...)`, or registered as `kopf.on.<something>(...)(function)`."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target).startswith("kopf.on."):
            return True
    return node.name in registered


def registered_handlers(tree: ast.AST) -> set[str]:
    """Names passed to `kopf.on.<something>(...)(name)`."""
    return {call.args[0].id for call in ast.walk(tree)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Call) and call.args
            and isinstance(call.args[0], ast.Name) and ast.unparse(call.func.func).startswith("kopf.on.")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", default=["operator", "lab"])
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--image", action="store_true", help="build the wheel the Dockerfile installs; list it")
    args = parser.parse_args()
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    handlers: list[tuple[int, str]] = []
    importers: dict[str, list[str]] = {"kubernetes": [], "kopf": []}
    for path in python_files(args.roots):
        text = path.read_text()
        where = str(path.relative_to(REPO))
        modules.append((len(text.splitlines()), where))
        tree = ast.parse(text)
        registered = registered_handlers(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((lines_of(node), f"{where}:{node.lineno} {node.name}"))
                if is_kopf_handler(node, registered):
                    body = lines_of(node) - (node.body[0].lineno - node.lineno)
                    handlers.append((body, f"{where}:{node.lineno} {node.name}"))
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in importers and where not in importers[top]:
                    importers[top].append(where)
    print(f"== largest modules (lines), of {len(modules)}")
    for count, where in sorted(modules, reverse=True)[: args.top]:
        print(f"{count:6d}  {where}")
    print(f"== largest functions (lines, nested ones included in their parent's count), of {len(functions)}")
    for count, where in sorted(functions, reverse=True)[: args.top]:
        print(f"{count:6d}  {where}")
    over = sum(1 for count, _ in functions if count > 60)
    print(f"   functions over 60 lines: {over}")
    print(f"== kopf handlers (body lines): {len(handlers)}")
    for count, where in sorted(handlers, reverse=True):
        print(f"{count:6d}  {where}")
    for package, found in importers.items():
        print(f"== modules importing {package}: {len(found)}")
        for where in found:
            print(f"        {where}")
    branches = engine_branches(args.roots)
    print(f"== comparisons with an engine kind outside operator/disagg/engines: {len(branches)}")
    for where in branches:
        print(f"        {where}")
    if args.image:
        image_files()
    return 0


ENGINE_BRANCH = re.compile(r"""(kind|engine)\s*[!=]=\s*["'](vllm|sglang|custom)["']""")


def engine_branches(roots: list[str]) -> list[str]:
    """Lines of operator code that compare an engine kind with a literal (the adapters are the place)."""
    found = []
    for path in python_files([r for r in roots if r == "operator"]):
        if "engines" in path.relative_to(REPO).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ENGINE_BRANCH.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:90]}")
    return found


def image_files() -> None:
    """The wheel the Dockerfile installs (`pip wheel --no-deps .`), by top-level folder."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out, str(REPO)],
                       check=True, capture_output=True)
        (wheel,) = Path(out).glob("*.whl")
        names = zipfile.ZipFile(wheel).namelist()
    folders: dict[str, int] = {}
    for name in names:
        parts = name.split("/")
        folder = "/".join(parts[:2]) if len(parts) > 2 else parts[0]
        folders[folder] = folders.get(folder, 0) + 1
    print(f"== image: {wheel.name}, {len(names)} files")
    for folder, count in sorted(folders.items()):
        print(f"{count:6d}  {folder}")


if __name__ == "__main__":
    sys.exit(main())
