"""MD5 checksums of data files, and ``MD5SUMS`` files (``md5sum`` output) that list them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from regfit.data.errors import DataError

__all__ = ["MD5SUMS", "file_md5", "read_md5sums"]

MD5SUMS = "MD5SUMS"


def file_md5(path: Path) -> str:
    """The MD5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# md5sum's output: the hex digest, a space, " " (text) or "*" (binary mode), the file name.
_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


def read_md5sums(folder: Path) -> dict[str, str]:
    """``{file name: md5}`` from ``folder/MD5SUMS`` (``md5sum`` output format); empty if absent.

    Raises:
        DataError: The file cannot be read, is not UTF-8 text, or has a line that is not
            ``md5sum`` output -- naming the file and how to fix it, rather than checking
            nothing or failing with a bare codec error.
    """
    sums = folder / MD5SUMS
    if not sums.is_file():
        return {}
    fix = f"regenerate it (cd {folder} && md5sum *.gz > {MD5SUMS}) or delete it"
    try:
        text = sums.read_bytes().decode("utf-8")
    except OSError as exc:
        raise DataError(f"{sums}: cannot be read ({exc.strerror or exc}); {fix}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{sums}: not a text file of MD5 sums (byte {exc.start} is not UTF-8); {fix}") from None
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not (m := _LINE.match(line)):
            raise DataError(f"{sums}: line {number} is not md5sum output ('<32 hex digits>  <file name>'): "
                            f"{line[:80]!r}; {fix}")
        table[m[2]] = m[1].lower()
    return table
