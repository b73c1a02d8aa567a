"""MD5 checksums of data files, and ``MD5SUMS`` files (``md5sum`` output) that list them."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["MD5SUMS", "file_md5", "read_md5sums"]

MD5SUMS = "MD5SUMS"


def file_md5(path: Path) -> str:
    """The MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_md5sums(folder: Path) -> dict[str, str]:
    """``{file name: md5}`` from ``folder/MD5SUMS`` (``md5sum`` output format); empty if absent."""
    sums = folder / MD5SUMS
    if not sums.is_file():
        return {}
    table = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            table[parts[1].lstrip("*")] = parts[0].lower()
    return table
