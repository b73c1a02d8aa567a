"""The IDX file format (LeCun's MNIST files): pure functions over bytes and paths.

An IDX file is 2 zero bytes, a type code (``0x08``: unsigned byte), the number of
dimensions, one big-endian uint32 size per dimension, then the data, row-major. The files
are usually published gzip'd; :func:`read_idx` accepts both.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np

from regfit.atomic import atomic_write
from regfit.data.errors import DataError

__all__ = ["IMAGES_MAGIC", "LABELS_MAGIC", "encode_idx", "parse_idx", "read_idx", "write_idx"]

# IDX magic = 0x0000 | type code (0x08: unsigned byte) | number of dimensions.
IMAGES_MAGIC = 0x0803  # 2051
LABELS_MAGIC = 0x0801  # 2049


def _magic_for(stem: str) -> int:
    return IMAGES_MAGIC if "-images-" in stem else LABELS_MAGIC


def parse_idx(data: bytes, source: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
    """Parse an uncompressed IDX (unsigned byte) buffer.

    Layout: 2 zero bytes, type code ``0x08``, ``ndim``; ``ndim`` big-endian uint32 sizes; the
    data, row-major. The buffer length must match the header exactly.

    Args:
        data: The raw (already decompressed) file content.
        source: Name used in error messages.

    Returns:
        A read-only ``uint8`` array viewing ``data``, of the shape the header declares.

    Raises:
        DataError: The header is not an unsigned-byte IDX header or the length does not match.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
        raise DataError(f"{source}: not an unsigned-byte IDX file (magic number {magic})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"{source}: {what}: header {dims} needs {expected} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    """File content, gunzipped when it starts with the gzip magic (whatever its suffix)."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # bad CRC, truncated stream
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None


def read_idx(path: str | os.PathLike[str], magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip'd or not) and check its magic number.

    The magic number fixes the number of dimensions; the sizes are whatever the header says
    (a data module checks them against the image shape and classes it declares).

    Args:
        path: The file.
        magic: Expected magic number: 2051 (images, ``(N, rows, columns)``) or 2049 (labels,
            ``(N,)``). ``None`` infers it from an MNIST file name (``-images-`` or not).

    Returns:
        The ``uint8`` array.

    Raises:
        DataError: Naming the file, when it is corrupt, truncated or of the wrong kind.
    """
    path = Path(path)
    if magic is None:
        magic = _magic_for(path.name)
    try:
        data = _read_bytes(path)
        array = parse_idx(data, path)
        found = int.from_bytes(data[:4], "big")
        if found != magic:
            raise DataError(f"{path}: magic number {found}, expected {magic}")
    except DataError as exc:
        raise DataError(
            f"{exc} -- delete {path} to download it again (download=True), or replace it"
        ) from None
    return array


def encode_idx(array: np.ndarray, compress: bool = False) -> bytes:
    """The bytes of an IDX file holding a ``uint8`` array, gzip'd when ``compress``.

    The gzip header carries no timestamp, so equal arrays give equal bytes (and MD5s).

    Args:
        array: Unsigned-byte data, 1 to 255 dimensions.
        compress: gzip the file (level 6: 9 is 15x slower for 2% less).
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.tobytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """Write a ``uint8`` array as an IDX file, gzip'd when the name ends in ``.gz``.

    The gzip header carries no timestamp, so equal arrays give equal bytes (and MD5s).

    Args:
        path: Destination; written atomically.
        array: Unsigned-byte data, 1 to 255 dimensions.

    Returns:
        The MD5 of the written file.
    """
    path = Path(path)
    data = encode_idx(array, compress=path.suffix == ".gz")
    atomic_write(path, data)
    return hashlib.md5(data).hexdigest()
