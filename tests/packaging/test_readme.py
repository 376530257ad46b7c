"""The field reference is the one the models generate; the README's two commands come first, and it stays short."""

from __future__ import annotations

import re

from disagg.api.reference import BEGIN, END, field_reference
from support.paths import REPO

README = REPO / "README.md"
REFERENCE = README.parent / "docs" / "reference.md"


def test_field_reference_is_current() -> None:
    text = REFERENCE.read_text()
    section = text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    assert section == field_reference(), "docs/reference.md is stale: regenerate it with `make crd`"


def test_readme_starts_with_the_two_commands() -> None:
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "exec make test" in ci


def test_readme_links_resolve() -> None:
    for doc in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([\w./-]+\.(?:md|png|json|yaml|py))(?:#[\w-]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_readme_is_read_in_five_minutes() -> None:
    assert len(README.read_text().splitlines()) <= 220, "the README grew: move details to docs/"
