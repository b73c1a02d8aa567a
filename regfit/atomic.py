"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The data is written to a hidden temporary name in the destination's folder (the same
filesystem, so ``os.replace`` is atomic), synced, and renamed over the destination; a
failure (a full disk, a read-only folder, Ctrl+C) removes the temporary file and leaves the
destination as it was. :func:`atomic_write_all` does it for a set of files that belong
together: all are written before any is renamed, so a failure while writing leaves none of
them. Used for dataset files (:mod:`regfit.data`), checkpoints
(:mod:`regfit.checkpointing`) and exported models (``regfit thin``).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_all", "atomic_save", "temp_path"]


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
        for folder in {path.parent for path in staged}:
            _sync_folder(folder)
    finally:
        for tmp in staged.values():  # only those not renamed are still there
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically: serialized in memory, then :func:`atomic_write`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(Path(path), buffer.getvalue())


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
