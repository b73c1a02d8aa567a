"""Package-wide hygiene: every module compiles without warnings (e.g. a docstring with
``\\sum`` that is not a raw string is a SyntaxWarning today and an error in future Python),
its docstring examples hold, and the modules of ``regfit/`` import each other without
circles."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("regfit", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def _module_name(path: Path) -> str:
    """``regfit/data/batches.py`` -> ``regfit.data.batches``; a package's ``__init__.py`` -> its name."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PACKAGE = {_module_name(p): p for p in sorted((ROOT / "regfit").rglob("*.py"))}
# Every module but regfit/__init__.py and a __main__.py (importing one runs the command).
MODULES = sorted(name.split(".", 1)[1] for name, p in PACKAGE.items() if name != "regfit" and p.stem != "__main__")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_print_what_they_show(module):
    """The ``>>>`` examples in the docstrings are what the code returns today."""
    import doctest
    import importlib

    import torch

    mod = importlib.import_module(f"regfit.{module}")
    result = doctest.testmod(mod, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in regfit.{module} differ"


def _imports(name: str, path: Path) -> set[str]:
    """The regfit modules that ``name`` imports anywhere in its file (top level or inside a
    function: a lazy import still closes a circle, it only hides it until run time)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from regfit import functional` imports the submodule regfit.functional
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in PACKAGE}
            out |= subs or {module}
    return {m for m in out if m in PACKAGE and m != name}


def test_the_package_has_no_import_circles():
    """Walks the import graph of ``regfit/`` (every ``import`` statement, lazy ones included)
    and fails on the first circle, printed as ``a → b → a``."""
    graph = {name: _imports(name, path) for name, path in PACKAGE.items()}
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " → ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
