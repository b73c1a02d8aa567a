"""Package-wide hygiene: every module compiles without warnings (e.g. a docstring with
``\\sum`` that is not a raw string is a SyntaxWarning today and an error in future Python)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# regfit's subpackages (regfit/data/) too; the other folders at their top level.
SOURCES = sorted([*(ROOT / "regfit").rglob("*.py"), *(p for d in ("benchmarks", "tests") for p in (ROOT / d).glob("*.py"))])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def _module_name(path: Path) -> str:
    """``regfit/data/batches.py`` -> ``data.batches``; a subpackage's ``__init__.py`` -> ``data``."""
    parts = path.relative_to(ROOT / "regfit").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Every module but regfit/__init__.py and a __main__.py (importing one runs the command).
MODULES = sorted(name for p in (ROOT / "regfit").rglob("*.py") if (name := _module_name(p)) and p.stem != "__main__")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_print_what_they_show(module):
    """The ``>>>`` examples in the docstrings are what the code returns today."""
    import doctest
    import importlib

    import torch

    mod = importlib.import_module(f"regfit.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in regfit.{module} differ"
