"""Downloading one file from a list of mirrors, with an MD5 check and an atomic move."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from regfit.data.atomic import temp_path
from regfit.data.errors import DataError

__all__ = ["download"]

log = logging.getLogger(__name__)


def _fetch(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Stream ``url`` into ``dest`` atomically; ``md5`` mismatch leaves nothing behind."""
    request = urllib.request.Request(url, headers={"User-Agent": "regfit"})
    tmp = temp_path(dest)
    try:
        digest = hashlib.md5()
        with open(tmp, "xb") as f, urllib.request.urlopen(request, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(f"MD5 mismatch (got {digest.hexdigest()}, expected {md5})")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _reason(exc: BaseException) -> str:
    """One line for a failed download, without the socket traceback."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def download(
    name: str, dest: Path, mirrors: Sequence[str], md5: str | None, timeout: float
) -> list[str] | None:
    """Try each mirror in order; return ``None`` on success, else the reasons they failed."""
    reasons = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        log.info("Downloading %s", url)
        try:
            _fetch(url, dest, md5, timeout)
            return None
        # URLError, HTTPError and timeouts are OSErrors; a cut connection is an HTTPException.
        except (OSError, http.client.HTTPException, ValueError, DataError) as exc:
            reasons.append(f"{url}: {_reason(exc)}")
    return reasons or ["no mirrors configured"]
