"""regfit.report: `regfit report RUN_DIR` draws one page from a real CSV run and reads W&B
run files; a folder it cannot use is a user error naming the fix."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

from regfit.cli import main, run_cli
from regfit.report import _wandb_records, load_run, read_wandb_run, summary

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def csv_run(mnist_dir, tmp_path_factory) -> Path:
    """A real `regfit fit` on MNIST digits, logged to CSV: LayerNorm MLP, decoupled L2 from a timescale."""
    logs = tmp_path_factory.mktemp("logs")
    run_cli(["fit", "--config", str(REPO / "configs" / "mnist_timescale.yaml"), "--data.data_dir", str(mnist_dir),
             "--data.init_args.batch_size=128", "--trainer.max_epochs=2", "--trainer.limit_train_batches=30",
             "--trainer.limit_val_batches=4", "--trainer.log_every_n_steps=2", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false",
             f"--trainer.logger={{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {logs}}}}}"])
    (folder,) = logs.glob("lightning_logs/version_*")
    return folder


def test_the_report_renders_from_a_real_csv_run(csv_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(csv_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.html"), str(out / "report.png")]
    from matplotlib.image import imread

    image = imread(out / "report.png")
    assert image.shape[:2] == (1500, 1300) and image[..., :3].std() > 0.05  # drawn, not blank
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "<td>l2</td>" in page and "timescale" in page  # the config
    run = load_run(csv_run)
    assert run.kind == "csv" and run.terms == ["l2"]
    assert len(run.get("weights/angular_update/l2")[0]) == 30  # 60 steps, every second one logged
    (row,) = summary(run)
    assert 0 < row["angular update (rad/step)"] < 1 and row["predicted θ_eq"] > 0
    assert row["λ"] == pytest.approx(1 / (1e-3 * 10 * 30))  # τ = 10 epochs of 30 steps


def test_report_writes_into_the_run_folder_by_default(csv_run, tmp_path):
    import shutil

    copy = tmp_path / "version_0"
    shutil.copytree(csv_run, copy)
    assert main(["report", str(copy / "metrics.csv")]) == 0  # the file names its folder
    assert (copy / "report.png").is_file() and (copy / "report.html").is_file()


def test_a_wandb_offline_run_is_read_from_its_run_file(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="regfit-test", dir=str(tmp_path), mode="offline")
    for step in range(40):
        run.log({"trainer/global_step": 10 * step, "train/data_loss": 2.0 / (step + 1),
                 "weights/angular_update/l2": 0.01 * step, "note": "text"})
    run.finish()
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + 60  # W&B's service writes the file in the background
    while len(read_wandb_run(folder).get("train/data_loss")[0]) < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    read = load_run(folder)
    assert read.kind == "wandb"
    assert read.get("train/data_loss") == ([10.0 * s for s in range(40)], [2.0 / (s + 1) for s in range(40)])
    assert read.get("weights/angular_update/l2")[1][-1] == pytest.approx(0.39)
    assert "note" not in read.series  # not a number: not a curve
    assert main(["report", str(folder), "--out", str(tmp_path / "r")]) == 0


def _record(kind: int, data: bytes) -> bytes:
    return struct.pack("<IHB", zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, len(data), kind) + data


def test_records_split_across_blocks_are_joined():
    """The run file's framing: a record larger than a 32 KiB block comes in first/middle/last pieces."""
    big = bytes(range(256)) * 300  # 76,800 bytes: three blocks
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    out += _record(1, b"small")
    pieces = [big[:32768 - len(out) - 7], big[32768 - len(out) - 7:]]
    out += _record(2, pieces[0])  # fills the first block exactly
    rest = pieces[1]
    out += _record(3, rest[:32761]) + _record(4, rest[32761:])
    out += b"\x00" * 3  # a block tail too short for a header
    assert list(_wandb_records(bytes(out))) == [b"small", big]


# ---- folders it cannot use ----------------------------------------------------------------


def assert_exit_2(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("regfit: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_folders_without_a_run_name_the_fix(csv_run, tmp_path, capsys):
    assert_exit_2(capsys, ["report", str(tmp_path / "nope")], "no such folder", "metrics.csv")
    assert_exit_2(capsys, ["report", str(tmp_path)], "holds no metrics.csv", "CSVLogger")
    assert_exit_2(capsys, ["report", str(csv_run.parents[1])], "runs in subfolders", f"regfit report {csv_run}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.csv").write_text("epoch,step\n")
    assert_exit_2(capsys, ["report", str(tmp_path / "empty")], "logged no metric")
    bad = tmp_path / "offline-run-x"
    bad.mkdir()
    (bad / "run-x.wandb").write_bytes(b"not a wandb file at all")
    assert_exit_2(capsys, ["report", str(bad)], "cannot be read as a W&B run file", "CSVLogger")
