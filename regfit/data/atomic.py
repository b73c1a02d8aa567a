"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The data is written to a hidden temporary name in the destination's folder (the same
filesystem, so ``os.replace`` is atomic) and renamed over the destination; a failure removes
the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

__all__ = ["atomic_write", "temp_path"]


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path``: same filesystem, so ``os.replace`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # unlike mkstemp's 0600, respects the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
