"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The data is written to a hidden temporary name in the destination's folder (the same
filesystem, so ``os.replace`` is atomic) and renamed over the destination; a failure removes
the temporary file. :func:`atomic_write_all` does it for a set of files that belong together:
all are written before any is renamed, so a failure while writing (a full disk, a read-only
folder) leaves none of them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_all", "temp_path"]


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path``: same filesystem, so ``os.replace`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    atomic_write_all({path: data})


def atomic_write_all(contents: Mapping[Path, bytes]) -> None:
    """Write every ``{path: data}``: all to temporary files first, then rename each into place.

    Raises:
        OSError: From writing; no temporary file is left and no destination was touched.
    """
    staged: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            tmp = staged[path] = temp_path(path)
            with open(tmp, "xb") as f:  # unlike mkstemp's 0600, respects the umask
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():  # only those not renamed are still there
            with contextlib.suppress(OSError):
                os.unlink(tmp)
