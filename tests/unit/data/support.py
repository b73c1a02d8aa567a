"""Helpers shared by the regfit.data tests: copies of the real-digit files, local mirrors."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from regfit.data import MNISTDataModule

REPO_ROOT = Path(__file__).resolve().parents[3]
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def copy_files(src: Path, dst: Path, names=FILES) -> Path:
    """The four files without ``MD5SUMS``, so only the IDX structure is checked."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def with_md5s(folder: Path, **overrides: str) -> type[MNISTDataModule]:
    """An MNISTDataModule whose 'official' MD5s are those of the files in ``folder``."""

    class LocalMNIST(MNISTDataModule):
        md5s = {name: md5(folder / name) for name in FILES} | {
            name.replace("_", "-") + ".gz": value for name, value in overrides.items()
        }

    return LocalMNIST


def loaded(dm: MNISTDataModule, stage: str | None = None) -> MNISTDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


# ----------------------------------------------------------------------------------------------
# Local mirrors
# ----------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and logs nothing; subclasses misbehave on purpose."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@contextlib.contextmanager
def http_mirror(directory: Path, handler: type[QuietHandler] = QuietHandler) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (ephemeral port) from a thread; yield its base URL."""
    handler = functools.partial(handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def raw_listing(data_dir: Path) -> list[str]:
    raw = data_dir / "MNIST" / "raw"
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []
