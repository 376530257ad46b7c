"""The `disagg` CLI never prints a traceback on input (issue 18, item 8): each bad file through the real
command in a subprocess, with its exit code and message. A file is read one document at a time, so its
size costs time, not memory (bench/cli_large_file.py times 50 MB)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from disagg import cli as cli_module
from support.paths import REPO

EXAMPLE = (REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text()
SERVICE = textwrap.dedent("""\
    apiVersion: disagg.dev/v1alpha1
    kind: InferenceService
    metadata: {name: NAME}
    spec:
      model: {name: m, uri: hf://org/m}
      prefill: {accelerator: {type: nvidia-h100}}
      decode: {accelerator: {type: nvidia-h200}}
    """)
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def service(name: str) -> str:
    return SERVICE.replace("NAME", name)


def disagg(*args: str, stdin: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "disagg.cli", *args], input=stdin, capture_output=True,
                          timeout=timeout, check=False)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                         proc.stderr.decode(errors="replace"))
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return result


def peak_rss_mib(*args: str) -> tuple[float, str]:
    """Peak RSS of `disagg args...` in its own process (measured by a parent that runs only it), and
    its output."""
    probe = ("import resource, subprocess, sys; out = subprocess.run([sys.executable, '-m', 'disagg.cli', "
             "*sys.argv[1:]], capture_output=True, text=True).stdout; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(out, end='')")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True, timeout=600)
    rss, _, stdout = out.stdout.partition("\n")
    return int(rss) / 1024, stdout


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("metadata a list", SERVICE.replace("metadata: {name: NAME}", "metadata: [a, b]").encode(),
     "metadata: must be an object, not a list"),
    ("metadata a string", SERVICE.replace("metadata: {name: NAME}", "metadata: svc").encode(),
     "metadata: must be an object, not a string"),
    ("metadata null", SERVICE.replace("metadata: {name: NAME}", "metadata:").encode(), "metadata.name: required"),
    ("a document that is a list", b"- a\n- b\n", "must be an object (a YAML mapping), not a list"),
    ("a document that is a string", b"just words\n", "must be an object (a YAML mapping), not a string"),
    ("latin-1", service("caf\xe9").encode("latin-1"), "not UTF-8 text (byte 0xe9)"),
    ("UTF-16", service("svc").encode("utf-16"), "not UTF-8 text"),
    ("binary", bytes(range(256)) * 8, "not UTF-8 text"),
    ("NUL bytes", b"apiVersion: v1\x00\x00\n", "control characters are not allowed"),
    ("an ELF header", b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56, "control characters are not allowed"),
    ("alias bomb", BOMB.encode(), "expands aliases excessively"),
    ("deep nesting", b"a: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "line 1:"),
    ("a tab where YAML wants spaces", b"a:\n\tb: 1\n", "line 2:"),
    ("an unclosed quote", b"a: 'open\n", "line"),
    ("duplicate keys", (service("svc") + "spec: {}\n").encode(), "key 'spec' already set in map"),
    ("another apiVersion", service("svc").replace("v1alpha1", "v1beta1").encode(),
     "apiVersion: 'disagg.dev/v1beta1' is not 'disagg.dev/v1alpha1'"),
    ("another kind", service("svc").replace("kind: InferenceService", "kind: Deployment").encode(),
     "kind: 'Deployment' is not 'InferenceService'"),
    ("a number where an integer goes", service("svc").replace("{accelerator: {type: nvidia-h100}}",
                                                              "{replicas: '3', accelerator: {type: nvidia-h100}}")
     .encode(), "spec.prefill.replicas: Input should be a valid integer"),
    ("a bad document separator", ("--- x\n" + service("svc")).encode(), "invalid document separator"),
    ("an unknown top-level field", (service("svc") + "replicas: 2\n").encode(), "replicas: unknown field"),
    ("a number too large for JSON", service("svc").replace("name: m,", "name: m, x: .inf,").encode(), "inf"),
]


RENDERED_TOO = {"metadata a list", "latin-1", "alias bomb", "duplicate keys", "a number where an integer goes"}


@pytest.mark.parametrize(("what", "content", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_gets_one_line_errors_and_exit_1(tmp_path: Path, what: str, content: bytes, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    # render reads as validate does: checked on a few (each run is a Python start, ~0.5 s)
    for command in ("validate", "render") if what in RENDERED_TOO else ("validate",):
        result = disagg(command, "-f", str(path))
        assert result.returncode == 1, (command, result)
        assert message in result.stderr, (command, result.stderr)
        assert result.stdout == "" or command == "validate", result.stdout  # render writes all or nothing
        assert all(line.startswith("error: ") for line in result.stderr.splitlines()), result.stderr


def test_the_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 1024
    disagg("validate", "-f", str(path), timeout=20)  # 9^9 expansions took 3 GB and over a minute before
    assert peak_rss_mib("validate", "-f", str(path))[0] < 150


def test_missing_files_directories_and_empty_input_say_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n---\n---\n")
    cases = [
        (["validate", "-f", str(tmp_path / "missing.yaml")], "cannot read", None),
        (["render", "-f", str(tmp_path)], "is a directory", None),
        (["validate", "-f", str(empty)], "holds no InferenceService", None),
        (["validate", "-f", "-"], "holds no InferenceService", b""),
        (["render", "-f", "-"], "not UTF-8", b"\xff\xfe\xfd"),
    ]
    for args, message, stdin in cases:
        result = disagg(*args, stdin=stdin)
        assert result.returncode == 1 and message in result.stderr, (args, result)


def test_empty_documents_between_services_are_skipped_and_stdin_works(tmp_path: Path) -> None:
    text = "---\n# a comment only\n---\n" + service("one") + "---\n---\n" + service("two") + "...\n"
    result = disagg("validate", "-f", "-", stdin=text.encode())
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["InferenceService one: valid", "InferenceService two: valid"]
    rendered = disagg("render", "-f", "-", stdin=text.encode())
    names = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout)}
    assert ("Deployment", "one-prefill") in names and ("Deployment", "two-decode") in names


def test_generate_name_validates_but_render_needs_a_name(tmp_path: Path) -> None:
    path = tmp_path / "generated.yaml"
    path.write_text(service("x").replace("name: x", "generateName: svc-"))
    assert disagg("validate", "-f", str(path)).returncode == 0
    rendered = disagg("render", "-f", str(path))
    assert rendered.returncode == 1 and "metadata.name: render needs a name" in rendered.stderr, rendered


def test_a_kubectl_list_and_json_are_read_too(tmp_path: Path) -> None:
    items = [yaml.safe_load(service("listed-a")), yaml.safe_load(service("listed-b"))]
    listing = tmp_path / "list.json"
    listing.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    result = disagg("validate", "-f", str(listing))
    assert result.returncode == 0 and "listed-b: valid" in result.stdout, result


def test_one_bad_service_fails_the_file_and_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(service("good") + "---\n" + service("bad").replace("nvidia-h200", "nvidia-h999"))
    result = disagg("validate", "-f", str(path))
    assert result.returncode == 1
    assert "InferenceService good: valid" in result.stdout
    assert "error: InferenceService bad: spec.decode.accelerator.type: unknown accelerator type" in result.stderr
    rendered = disagg("render", "-f", str(path))
    assert rendered.returncode == 1 and rendered.stdout == ""


def test_memory_does_not_grow_with_the_number_of_services(tmp_path: Path) -> None:
    small, large = tmp_path / "small.yaml", tmp_path / "large.yaml"
    small.write_text("---\n".join(EXAMPLE.replace("llama-70b", f"s-{i}", 1) for i in range(10)))
    large.write_text("---\n".join(EXAMPLE.replace("llama-70b", f"s-{i}", 1) for i in range(2000)))
    assert large.stat().st_size > 2 * 2**20
    large_rss, out = peak_rss_mib("validate", "-f", str(large))
    assert out.count(": valid\n") == 2000
    # one document at a time: the large file's peak is the small one's, within noise
    assert large_rss < peak_rss_mib("validate", "-f", str(small))[0] + 20


def test_a_bug_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: object) -> int:
        raise KeyError("something the code did not expect")

    monkeypatch.setattr(cli_module, "cmd_validate", broken)
    monkeypatch.delenv("DISAGG_DEBUG", raising=False)
    assert cli_module.main(["validate", "-f", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: internal error: KeyError") and "Traceback" not in err and err.count("\n") == 1
