"""Where a dataset's files are, how they are checked, and how missing ones are downloaded.

``data_dir`` is searched in this order, and the first folder holding all the files wins:

1. ``data_dir`` itself -- a folder you filled: the ``*.gz`` files (or their uncompressed
   versions), e.g. one written by ``python -m regfit.data --from-test-set``;
2. ``data_dir/<name>/raw`` -- where downloads go. It is the layout torchvision uses, so an
   existing torchvision download is reused.

MD5 policy (``verify_md5=None``, the default): a MD5 guards a download, so files in the
download folder are checked against the official MD5s (a corrupt one is downloaded again);
files you put in ``data_dir`` yourself are checked against an ``MD5SUMS`` file beside them
when there is one, and otherwise only their structure is validated (when they are read).
``verify_md5=True`` requires the official files everywhere; ``verify_md5=False`` checks no
MD5 at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from regfit.data.checksums import MD5SUMS, file_md5, read_md5sums
from regfit.data.download import download
from regfit.data.errors import DataError

__all__ = ["DEFAULT_DATA_DIR", "ENV_DATA_DIR", "DatasetFiles", "find_file"]

log = logging.getLogger(__name__)

ENV_DATA_DIR = "REGFIT_DATA_DIR"
DEFAULT_DATA_DIR = "./data"

# Each way out must work as written with the shipped configs, which leave data_dir unset for
# that reason: a config's data_dir would win over the environment variable.
_FIX_HINT = (
    "To fix it, either pass `--data.data_dir DIR` (data_dir=DIR in Python) pointing at a folder "
    f"with the dataset files, or set {ENV_DATA_DIR}=DIR (read when no data_dir is given), or build a "
    "small MNIST split offline from the official test-set files: "
    "`python -m regfit.data --from-test-set SRC --out DIR`, then use `--data.data_dir DIR`."
)


def find_file(folder: Path, stem: str) -> Path | None:
    """``stem.gz`` (preferred: it is what MD5s are published for) or ``stem`` in ``folder``."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass(frozen=True)
class DatasetFiles:
    """Where the files of one dataset are, how to check them, how to get them.

    The dataset's files are the keys of ``md5s``: each is published gzip'd as ``<stem>.gz``;
    in a folder of your own, the uncompressed ``<stem>`` is accepted too.

    Args:
        data_dir: Searched first, for a folder of files you provide.
        name: Dataset name; downloads go to ``data_dir/<name>/raw``.
        md5s: Official MD5 of each downloadable (``.gz``) file, in download order.
        mirrors: Base URLs tried in order for each file.
        verify_md5: MD5 policy, see the module docstring.
        timeout: Seconds before a silent download connection is given up.
        retries: Further tries of a mirror after a transient failure (a transfer cut off or
            stalled, HTTP 5xx); see :mod:`regfit.data.download`.
    """

    data_dir: Path
    name: str
    md5s: Mapping[str, str]
    mirrors: tuple[str, ...]
    verify_md5: bool | None = None
    timeout: float = 30.0
    retries: int = 2

    @property
    def stems(self) -> tuple[str, ...]:
        """The dataset's files without the ``.gz`` suffix, in download order."""
        return tuple(name.removesuffix(".gz") for name in self.md5s)

    @property
    def download_dir(self) -> Path:
        """Where downloads go: ``data_dir/<name>/raw`` (torchvision's layout)."""
        return self.data_dir / self.name / "raw"

    @property
    def search_dirs(self) -> tuple[Path, ...]:
        """Folders searched, in order: your folder first, then the download folder."""
        return tuple(dict.fromkeys((self.data_dir, self.download_dir)))

    def locate(self, download: bool, offline_reason: str = "download=False") -> dict[str, Path]:
        """Paths of the files, by stem; download the missing or corrupt ones if asked.

        Args:
            download: Download into :attr:`download_dir` when no folder is complete and valid.
            offline_reason: Why not downloading, for the error message.

        Raises:
            DataError: Files are missing and not downloaded, or corrupt and not replaceable.
        """
        for folder in self.search_dirs:
            found = {stem: find_file(folder, stem) for stem in self.stems}
            if not all(found.values()):
                continue
            files = {stem: path for stem, path in found.items() if path is not None}
            expected = self._expected_md5s(folder)
            problems = [p for path in files.values() if (p := self._md5_problem(path, expected))]
            if not problems:
                return files
            if not (download and folder == self.download_dir):
                fix = (
                    "delete it to download it again (download=True)"
                    if folder == self.download_dir
                    else f"replace it, fix {folder / MD5SUMS}, or set verify_md5=False"
                )
                raise DataError(f"{self.name}: bad file: {'; '.join(problems)}; {fix}")
            break  # corrupt download: fetch it again below
        if not download:
            raise self._not_found(offline_reason)
        return self._download_all()

    def _expected_md5s(self, folder: Path) -> Mapping[str, str]:
        """``{file name: md5}`` the files in ``folder`` must match under the MD5 policy."""
        if self.verify_md5 is False:
            return {}
        if self.verify_md5 or folder == self.download_dir:
            return self.md5s
        return read_md5sums(folder)

    def _md5_problem(self, path: Path, expected: Mapping[str, str]) -> str | None:
        if self.verify_md5 and path.name not in expected:
            return (
                f"{path}: an uncompressed file cannot be checked against the official MD5 "
                "(published for the .gz); provide the .gz or set verify_md5=False"
            )
        want = expected.get(path.name)
        if want is not None and (got := file_md5(path)) != want:
            return f"{path}: MD5 {got}, expected {want}"
        return None

    def _download_all(self) -> dict[str, Path]:
        folder = self.download_dir
        created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"cannot create {folder} to download into ({exc.strerror or exc}): give a --data.data_dir you can "
                "write to, or one that already holds the dataset files"
            ) from None
        try:
            expected = self._expected_md5s(folder)
            for stem in self.stems:
                name = f"{stem}.gz"
                path = find_file(folder, stem)
                if path is not None and self._md5_problem(path, expected) is None:
                    continue
                if path is not None:
                    log.warning("%s fails its MD5 check; downloading it again", path)
                reasons = download(name, folder / name, self.mirrors, expected.get(name), self.timeout, self.retries)
                if reasons is not None:
                    raise self._not_found(f"downloading {name} failed: " + "; ".join(reasons))
        except DataError:
            for p in created:  # a mistyped data_dir leaves no empty folders behind
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise
        return {stem: find_file(folder, stem) or folder / f"{stem}.gz" for stem in self.stems}

    def _not_found(self, reason: str) -> DataError:
        missing = [
            f"{stem}.gz"
            for stem in self.stems
            if not any(find_file(folder, stem) for folder in self.search_dirs)
        ]
        what = ", ".join(missing) if missing else "a complete set of valid files"
        looked = " and ".join(str(folder) for folder in self.search_dirs)
        return DataError(
            f"{self.name} data not found: {what} (looked in {looked}); {reason}. {_FIX_HINT}"
        )
