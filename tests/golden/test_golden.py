"""Golden tests: each example and each edge case renders to exactly the YAML under tests/golden/output.

Regenerate after an intended change with `UPDATE_GOLDEN=1 pytest tests/golden/test_golden.py` and
review the diff like code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.render import render_service
from disagg.yamlio import dump_all
from support.paths import REPO

ROOT = REPO
GOLDEN = ROOT / "tests" / "golden"
INPUTS = sorted((ROOT / "examples").glob("*.yaml")) + sorted((GOLDEN / "input").glob("*.yaml"))


@pytest.mark.parametrize("source", INPUTS, ids=[p.stem for p in INPUTS])
def test_render_matches_golden(source: Path) -> None:
    body = yaml.safe_load(source.read_text())
    rendered = dump_all(render_service(body, DEFAULT_CATALOG))
    expected_path = GOLDEN / "output" / f"{source.stem}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        expected_path.write_text(rendered)
    assert expected_path.exists(), f"no golden file {expected_path}; run with UPDATE_GOLDEN=1"
    assert rendered == expected_path.read_text(), f"{source.name} renders differently from {expected_path.name}"


def test_rendering_is_deterministic() -> None:
    body = yaml.safe_load(INPUTS[0].read_text())
    assert dump_all(render_service(body, DEFAULT_CATALOG)) == dump_all(render_service(body, DEFAULT_CATALOG))
