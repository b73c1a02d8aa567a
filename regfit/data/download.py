"""Downloading one file: each mirror in turn, transient failures retried, MD5 checked, moved atomically.

`pooch <https://www.fatiando.org/pooch>`_ handles the file: :func:`pooch.retrieve` streams the
download into a temporary file in the destination folder, checks its MD5, and only then moves
it onto the destination, so an MD5 mismatch or a broken transfer leaves nothing behind. Two
parts are regfit's own, for reasons measured against pooch 1.9:

- **Bytes are stored as sent.** pooch's ``HTTPDownloader`` reads through requests'
  ``iter_content``, which undoes a ``Content-Encoding: gzip`` header. A server that labels
  ``.gz`` files that way (Apache's ``AddEncoding x-gzip .gz``) would give the decompressed file
  and fail the published MD5 (measured with a local server: "MD5 hash of downloaded file
  (f.gz) does not match the known hash"). :class:`RawHTTPDownloader` asks for
  ``Accept-Encoding: identity``, stores the raw bytes, and fsyncs them before pooch's move.
- **Only transient failures are retried.** pooch's ``retry_if_failed`` retries every failure
  -- an unknown host, a refused connection, HTTP 404, an MD5 mismatch -- pausing 1 s, 2 s, …
  in between: offline, 2 retries cost 3 s per mirror before the error (measured: 3.01 s vs
  0.00 s). Here a transfer cut off or stalled mid-way and HTTP 408/429/5xx are retried
  (``retries`` times, pausing ``RETRY_PAUSE_S``, then twice that, …); anything else moves on to
  the next mirror at once, and the error lists why each mirror failed.

``http(s)://`` mirrors use :class:`RawHTTPDownloader`, ``file://`` mirrors (a local copy) are
copied, and ``ftp://`` mirrors go to pooch's ``FTPDownloader``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pooch

__all__ = ["RETRY_PAUSE_S", "RawHTTPDownloader", "download"]

log = logging.getLogger(__name__)

#: Seconds before the first retry of a transient failure; the n-th retry waits n times this.
RETRY_PAUSE_S = 1.0


class RawHTTPDownloader:
    """A pooch downloader that stores an HTTP(S) body exactly as the server sent it.

    Args:
        timeout: Seconds to wait for the connection, and then for each read.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def __call__(self, url: str, output_file: str | Any, pooch: Any = None, check_only: bool = False) -> bool | None:
        """Download ``url`` into ``output_file`` (a path or a binary file object), pooch's protocol."""
        import requests  # pooch's own HTTP client; imported on first download only

        headers = {"User-Agent": "regfit", "Accept-Encoding": "identity"}
        if check_only:
            return requests.head(url, timeout=self.timeout, headers=headers, allow_redirects=True).ok
        with requests.get(url, timeout=self.timeout, headers=headers, stream=True) as response:
            response.raise_for_status()
            with _binary(output_file) as f:
                # decode_content=False: the published MD5 is of these bytes, whatever the headers say.
                for chunk in response.raw.stream(1 << 20, decode_content=False):
                    f.write(chunk)
                f.flush()
                with contextlib.suppress(OSError, AttributeError):  # not a real file: nothing to sync
                    os.fsync(f.fileno())
        return None


def _copy_local(url: str, output_file: str | Any, pooch: Any = None) -> None:
    """A pooch downloader for ``file://`` URLs: copy the file."""
    source = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    with open(source, "rb") as src, _binary(output_file) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def _binary(output_file: str | Any) -> Iterator[Any]:
    """``output_file`` as a binary file object (opened here when pooch gives a path)."""
    if hasattr(output_file, "write"):
        yield output_file
    else:
        with open(output_file, "w+b") as f:
            yield f


def _downloader(url: str, timeout: float) -> Any:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        return RawHTTPDownloader(timeout)
    if scheme == "ftp":
        return pooch.FTPDownloader(timeout=timeout)
    if scheme == "file":
        return _copy_local
    raise ValueError(f"unsupported URL scheme {scheme!r}; give http(s)://, ftp:// or file:// mirrors")


def _is_transient(exc: BaseException) -> bool:
    """Worth trying the same URL again: a server error, or a transfer cut off or stalled mid-way.

    A refused connection, an unknown host or a connect timeout is not: offline, each retry
    would only add its pause (and a connect timeout its ``timeout``) before the error.
    """
    import requests
    import urllib3

    if isinstance(exc, requests.HTTPError):
        code = exc.response.status_code if exc.response is not None else 0
        return code in (408, 429) or code >= 500
    if isinstance(exc, requests.ConnectTimeout):
        return False
    if isinstance(exc, (requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError)):
        return True
    if isinstance(exc, requests.ConnectionError):  # reset after connecting, not refused
        return isinstance(getattr(exc.args[0] if exc.args else None, "reason", None), urllib3.exceptions.ProtocolError)
    return False


# urllib3 names the connection object first: "<…HTTPConnection object at 0x…>: " or "HTTPConnection(host=…): ".
_OBJECT_PREFIX = re.compile(r"^(<[^>]*>|\w+\([^)]*\)): ")
_POOCH_MISMATCH = re.compile(r"expected md5:(\w+) but got (\w+)")


def _reason(exc: BaseException) -> str:
    """One line for a failed download, without the socket traceback."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, ValueError) and (m := _POOCH_MISMATCH.search(str(exc))):
        return f"MD5 mismatch (got {m[2]}, expected {m[1]})"
    if isinstance(exc, requests.ConnectionError) and exc.args:
        cause = getattr(exc.args[0], "reason", exc.args[0])  # urllib3's MaxRetryError wraps the cause
        return _OBJECT_PREFIX.sub("", str(cause))
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _quiet_pooch() -> Iterator[None]:
    """pooch logs each download at INFO to stderr on its own; regfit logs its own line."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def download(
    name: str, dest: Path, mirrors: Sequence[str], md5: str | None, timeout: float, retries: int = 2
) -> list[str] | None:
    """Download ``name`` from the first mirror that serves it intact into ``dest``.

    Args:
        name: File name on the mirrors (appended to each base URL).
        dest: Destination path; written only once the whole file is there and matches ``md5``.
        mirrors: Base URLs, tried in order.
        md5: Expected MD5, or ``None`` to accept any content.
        timeout: Seconds to wait for a connection and for each read.
        retries: Further tries of one mirror after a transient failure.

    Returns:
        ``None`` on success, else one reason per mirror (``"URL: why"``).
    """
    import requests
    import urllib3

    reasons = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        for attempt in range(retries + 1):
            log.info("Downloading %s", url)
            try:
                with _quiet_pooch():
                    pooch.retrieve(url, known_hash=None if md5 is None else f"md5:{md5}", fname=dest.name,
                                   path=dest.parent, downloader=_downloader(url, timeout), progressbar=False)
                return None
            except (OSError, ValueError, requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                if attempt < retries and _is_transient(exc):
                    pause = RETRY_PAUSE_S * (attempt + 1)
                    log.warning("%s: %s; trying again in %g s", url, _reason(exc), pause)
                    time.sleep(pause)
                    continue
                tries = f" ({attempt + 1} tries)" if attempt else ""
                reasons.append(f"{url}: {_reason(exc)}{tries}")
                break
    return reasons or ["no mirrors configured"]
