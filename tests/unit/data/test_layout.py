"""The regfit.data package: the names users import from it, and modules that import in one direction."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import regfit.data
from tests.unit.data.support import REPO_ROOT

PACKAGE = REPO_ROOT / "regfit" / "data"

# ``regfit.data.__all__`` of the single-module regfit/data.py, and the names outside it that
# the repository imports (notebooks/_setup.py: FILE_STEMS) or that were importable constants.
PUBLIC = ["DataError", "DatasetFiles", "FashionMNISTDataModule", "MNISTDataModule", "ShardedOrder",
          "TensorBatches", "TensorPair", "build_split_from_test_set", "main", "parse_idx", "read_idx",
          "split_indices", "write_idx"]
CONSTANTS = ["FILE_STEMS", "TRAIN_IMAGES", "TRAIN_LABELS", "TEST_IMAGES", "TEST_LABELS", "IMAGES_MAGIC",
             "LABELS_MAGIC", "IMAGE_SIZE", "NUM_CLASSES", "ENV_DATA_DIR", "DEFAULT_DATA_DIR", "MD5SUMS"]


def test_every_public_name_is_still_importable_from_regfit_data():
    assert set(PUBLIC) <= set(regfit.data.__all__)
    for name in PUBLIC + CONSTANTS:
        assert getattr(regfit.data, name) is not None, name


def _imports_within_the_package(path: Path) -> set[str]:
    """The ``regfit.data.<module>`` names that ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name == "regfit.data" or name.startswith("regfit.data.")}
    return found


def test_modules_import_each_other_without_a_cycle():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {}
    for stem, path in modules.items():
        imported = _imports_within_the_package(path)
        # The package itself would run __init__, which imports every module: a cycle in waiting.
        assert "regfit.data" not in imported, f"regfit/data/{stem}.py imports the package; import the module"
        graph[stem] = {name.removeprefix("regfit.data.") for name in imported}
        assert graph[stem] <= set(modules), f"regfit/data/{stem}.py imports {graph[stem] - set(modules)}"
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert set(order) == set(modules)
