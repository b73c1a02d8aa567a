"""Fixtures of the regfit.data tests: a local mirror of the four files and a dead one."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.data.support import copy_files, http_mirror


@pytest.fixture
def mirror(mnist_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of a local mirror holding the four files."""
    served = copy_files(mnist_dir, tmp_path / "mirror")
    with http_mirror(served) as url:
        yield url, served


@pytest.fixture
def dead_mirror() -> str:
    """A URL on a 127.0.0.1 port nothing listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
