"""Package-wide hygiene: every module compiles without warnings (e.g. a docstring with
``\\sum`` that is not a raw string is a SyntaxWarning today and an error in future Python)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("regfit", "benchmarks", "tests") for p in (ROOT / d).glob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
