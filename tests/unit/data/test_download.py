"""regfit.data.download: from local mirrors (an ``http.server`` on 127.0.0.1), verified, atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

from regfit.data import DataError
from tests.unit.data.support import FILES, QuietHandler, copy_files, http_mirror, loaded, md5, raw_listing, with_md5s


def test_download_verifies_and_leaves_only_the_files(mirror, dead_mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served)
    data_dir = tmp_path / "data"
    module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)  # no temporary files left behind
    for name in FILES:
        assert md5(data_dir / "MNIST" / "raw" / name) == md5(served / name)
    # Present and valid: no network needed any more.
    dm = loaded(module(data_dir=str(data_dir), mirrors=[dead_mirror]))
    assert len(dm.train_set.y) + len(dm.val_set.y) == 8000 and len(dm.test_set.y) == 2000


def test_bad_md5_from_mirror_is_rejected_without_partial_file(mirror, tmp_path) -> None:
    url, served = mirror
    module = with_md5s(served, train_labels_idx1_ubyte="0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="MD5 mismatch") as excinfo:
        module(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert "train-labels-idx1-ubyte.gz" in str(excinfo.value)
    assert raw_listing(data_dir) == ["train-images-idx3-ubyte.gz"]  # downloaded before it


def test_first_mirror_failing_falls_back_to_the_next(mirror, dead_mirror, tmp_path) -> None:
    url, served = mirror
    data_dir = tmp_path / "data"
    with_md5s(served)(data_dir=str(data_dir), mirrors=[dead_mirror, url]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)


# ----------------------------------------------------------------------------------------------
# Mirrors that misbehave: what is retried, what moves on, bytes as sent
# ----------------------------------------------------------------------------------------------


def misbehaving(faults: dict[str, list[str]]) -> tuple[type[QuietHandler], list[str]]:
    """A handler class that answers the n-th request of ``/name`` with ``faults[name][n]``
    (``cut``: half the body, then the connection closes; ``503``/``404``: that status;
    ``gzip-label``: the file with ``Content-Encoding: gzip``), and normally once they run out;
    and the list of paths it was asked for."""
    requests: list[str] = []

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            pending = faults.get(name, [])
            fault = pending[requests.count(self.path)] if requests.count(self.path) < len(pending) else None
            requests.append(self.path)
            if fault in ("503", "404"):
                self.send_error(int(fault))
                return
            if fault == "cut":
                body = Path(self.directory, name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.gzip_label = fault == "gzip-label"
            super().do_GET()

        def end_headers(self) -> None:
            if getattr(self, "gzip_label", False):
                self.send_header("Content-Encoding", "gzip")  # Apache's `AddEncoding x-gzip .gz`
            super().end_headers()

    return Handler, requests


def test_a_cut_transfer_and_a_server_error_are_retried(mnist_dir, tmp_path) -> None:
    served = copy_files(mnist_dir, tmp_path / "mirror")
    handler, requests = misbehaving({FILES[0]: ["cut"], FILES[2]: ["503"]})
    data_dir = tmp_path / "data"
    with http_mirror(served, handler) as url:
        with_md5s(served)(data_dir=str(data_dir), mirrors=[url]).prepare_data()
    assert requests == ["/" + FILES[0], "/" + FILES[0], "/" + FILES[1], "/" + FILES[2], "/" + FILES[2], "/" + FILES[3]]
    assert raw_listing(data_dir) == sorted(FILES)  # the cut-off part left nothing behind
    for name in FILES:
        assert md5(data_dir / "MNIST" / "raw" / name) == md5(served / name)


def test_retries_stop_after_the_configured_number(mnist_dir, tmp_path) -> None:
    served = copy_files(mnist_dir, tmp_path / "mirror")
    handler, requests = misbehaving({FILES[0]: ["503"] * 10})

    class OneRetry(with_md5s(served)):
        download_retries = 1

    with http_mirror(served, handler) as url, pytest.raises(DataError) as excinfo:
        OneRetry(data_dir=str(tmp_path / "data"), mirrors=[url]).prepare_data()
    assert requests == ["/" + FILES[0]] * 2
    assert f"{url}{FILES[0]}: HTTP 503 Service Unavailable (2 tries)" in str(excinfo.value)


def test_a_missing_file_or_a_bad_md5_moves_on_to_the_next_mirror_at_once(mnist_dir, tmp_path) -> None:
    served = copy_files(mnist_dir, tmp_path / "mirror")
    tampered = copy_files(mnist_dir, tmp_path / "tampered")
    (tampered / FILES[1]).write_bytes(b"not the labels")
    missing, missing_requests = misbehaving({FILES[0]: ["404"]})
    bad, bad_requests = misbehaving({})
    data_dir = tmp_path / "data"
    with http_mirror(served, missing) as first, http_mirror(tampered, bad) as second, http_mirror(served) as third:
        with_md5s(served)(data_dir=str(data_dir), mirrors=[first, second, third]).prepare_data()
    # Each mirror is asked once per file until one serves it intact: no retry of a 404 or an MD5 mismatch.
    assert missing_requests == ["/" + FILES[0], "/" + FILES[1], "/" + FILES[2], "/" + FILES[3]]
    assert bad_requests == ["/" + FILES[0]]  # its FILES[1] never asked: the first mirror served it
    assert raw_listing(data_dir) == sorted(FILES)


def test_a_gz_labelled_content_encoding_gzip_is_stored_as_sent(mnist_dir, tmp_path) -> None:
    """The published MD5 is of the .gz bytes; an HTTP client that decodes the label stores the
    decompressed file instead (pooch's own HTTPDownloader does: regfit.data.download)."""
    served = copy_files(mnist_dir, tmp_path / "mirror")
    handler, requests = misbehaving({name: ["gzip-label"] for name in FILES})
    data_dir = tmp_path / "data"
    with http_mirror(served, handler) as url:
        dm = loaded(with_md5s(served)(data_dir=str(data_dir), mirrors=[url]))
    assert len(requests) == 4 and len(dm.test_set.y) == 2000
    for name in FILES:
        assert md5(data_dir / "MNIST" / "raw" / name) == md5(served / name)


def test_a_local_folder_serves_as_a_file_url_mirror(mnist_dir, tmp_path) -> None:
    served = copy_files(mnist_dir, tmp_path / "mirror")
    data_dir = tmp_path / "data"
    with_md5s(served)(data_dir=str(data_dir), mirrors=[served.as_uri() + "/"]).prepare_data()
    assert raw_listing(data_dir) == sorted(FILES)
