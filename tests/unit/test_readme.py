"""The README's field reference is the one the models generate; its two commands come first."""

from __future__ import annotations

from pathlib import Path

from disagg.api.reference import BEGIN, END, field_reference

README = Path(__file__).parents[2] / "README.md"


def test_field_reference_is_current() -> None:
    text = README.read_text()
    section = text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    assert section == field_reference(), "README field reference is stale: regenerate it with `disagg reference`"


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "exec make test" in ci
