"""Checkpoints under faults: a read-only or full disk, a save cut short, and files given to
--ckpt_path that are not checkpoints (or not of this model). The run either works or stops
with exit 2 and one paragraph naming the file; nothing already saved is lost."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
from pathlib import Path

import pytest
import torch

from regfit.checkpointing import AtomicCheckpointIO, CheckpointError, read_checkpoint
from regfit.cli import main
from tests.reliability.harness import L2_CONFIG, QUIET, assert_one_paragraph, env_for_subprocess, regfit_command

SMALL = "--model.init_args.widths=[32]"


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)


def fit(mnist_dir: Path, ckpt_dir: Path, *extra: str, epochs: int = 1) -> list[str]:
    """A fit of a few batches that saves last.ckpt (and one per epoch) in ckpt_dir."""
    return ["fit", "--config", L2_CONFIG, f"--data.data_dir={mnist_dir}", SMALL, f"--trainer.max_epochs={epochs}",
            "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.logger=false", *QUIET,
            "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
            f"init_args: {{dirpath: {ckpt_dir}, save_last: true}}}}]", *extra]


@pytest.fixture(scope="module")
def saved(mnist_dir, tmp_path_factory) -> Path:
    """last.ckpt of a one-epoch fit of the small MLP."""
    folder = tmp_path_factory.mktemp("saved")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with _env(WANDB_MODE="disabled"):
            assert main(fit(mnist_dir, folder / "ckpt")) == 0
    finally:
        os.chdir(cwd)
    return folder / "ckpt" / "last.ckpt"


@contextlib.contextmanager
def _env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder this process cannot write to: chmod for a normal user; root writes anywhere, so
    for root a read-only tmpfs is mounted there (skipped where mounting is not allowed)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"running as root, which writes into any folder, and a read-only mount is not allowed here: "
                    f"{proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


# ---- saving ---------------------------------------------------------------------------------


def test_a_read_only_checkpoint_folder_stops_the_fit_before_training(mnist_dir, tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as folder:
        code = main(fit(mnist_dir, folder))
    err = capsys.readouterr().err
    assert code == 2, err  # was: exit 0, no checkpoint, nothing said
    assert_one_paragraph(err, str(folder), "not writable")


def test_a_read_only_log_folder_stops_the_run_before_training(mnist_dir, tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as folder:
        code = main(["fit", "--config", L2_CONFIG, f"--data.data_dir={mnist_dir}", SMALL, "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=2", *QUIET, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                     f"--trainer.logger.init_args.save_dir={folder}"])
    err = capsys.readouterr().err
    assert code == 2, err  # was a raw PermissionError at the first logged step
    assert_one_paragraph(err, str(folder), "CSVLogger", "not writable", "--trainer.logger.init_args.save_dir")


def test_a_file_size_limit_mid_save_is_an_error_and_keeps_the_last_checkpoint(saved, mnist_dir, tmp_path):
    """A full disk, as a process meets it (the write fails part-way): exit 2, one paragraph, the
    checkpoint saved before unchanged under its name, no temporary file left."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    last = folder / "last.ckpt"
    last.write_bytes(saved.read_bytes())
    before = last.read_bytes()
    limit = len(before) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(regfit_command(*fit(mnist_dir, folder, "--trainer.max_epochs=2", f"--ckpt_path={last}")),
                          cwd=tmp_path, env=env_for_subprocess(WANDB_MODE="disabled"), capture_output=True, text=True,
                          timeout=300, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_paragraph(proc.stderr, "could not save the checkpoint", "are unchanged", f"--ckpt_path={last}")
    assert last.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert read_checkpoint(last)["epoch"] == 0


@pytest.mark.parametrize("fault", ["write", "sync", "rename"])
def test_a_save_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch, fault):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 0}, path)
    before = path.read_bytes()
    full = OSError(errno.ENOSPC, "No space left on device")

    def fail(*args, **kwargs):
        raise full

    target = {"write": (Path, "write_bytes"), "sync": (os, "fsync"), "rename": (os, "replace")}[fault]
    if fault == "write":
        real_open = open

        class FullFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(bytes(data)[: len(data) // 2])
                raise full

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr("builtins.open", lambda p, *a, **k: FullFile(real_open(p, *a, **k)))
    else:
        monkeypatch.setattr(*target, fail)
    with pytest.raises(CheckpointError, match="the disk is full") as info:
        io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, path)
    monkeypatch.undo()
    assert str(path) in str(info.value) and f"unchanged (the newest is {path})" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_save_interrupted_by_ctrl_c_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "a.ckpt")
    assert list(tmp_path.iterdir()) == []


# ---- loading: --ckpt_path -------------------------------------------------------------------


def _corrupt(kind: str, saved: Path, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    data = saved.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint\n" * 10)
    elif kind == "zeros":
        path.write_bytes(bytes(4096))
    elif kind == "flipped":  # the archive's directory damaged
        path.write_bytes(data[:-200] + bytes(200))
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "state-dict-only":
        torch.save({"body.0.weight": torch.ones(2)}, path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


CORRUPT = {
    "empty": ["is empty"], "truncated": ["truncated or corrupt"], "garbage": ["not a checkpoint file"],
    "zeros": ["not a checkpoint file"], "flipped": ["truncated or corrupt"],
    "tensor": ["not a Lightning checkpoint"], "state-dict-only": ["not a Lightning checkpoint"],
    "folder": ["is a folder"], "missing": ["no such file"],
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_ckpt_path_that_is_not_a_checkpoint_is_named(kind, saved, mnist_dir, tmp_path, capsys):
    path = _corrupt(kind, saved, tmp_path)
    code = main(fit(mnist_dir, tmp_path / "new", f"--ckpt_path={path}"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_paragraph(err, str(path), *CORRUPT[kind])


def test_test_with_a_corrupt_checkpoint_is_named(saved, mnist_dir, tmp_path, capsys):
    path = _corrupt("truncated", saved, tmp_path)
    code = main(["test", "--config", L2_CONFIG, f"--data.data_dir={mnist_dir}", SMALL, "--trainer.logger=false",
                 "--trainer.limit_test_batches=1", *QUIET, f"--ckpt_path={path}"])
    assert code == 2
    assert_one_paragraph(capsys.readouterr().err, str(path), "truncated or corrupt")


def test_a_checkpoint_of_another_model_is_named(saved, mnist_dir, tmp_path, capsys):
    """Without hyperparameters to compare (a plain Trainer.save_checkpoint of another model),
    the weights do not fit: one paragraph naming the file, not a size-mismatch traceback."""
    ckpt = torch.load(saved, weights_only=False)
    ckpt.pop("hyper_parameters")
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    code = main(fit(mnist_dir, tmp_path / "new", "--model.init_args.widths=[16]", f"--ckpt_path={other}"))
    assert code == 2
    assert_one_paragraph(capsys.readouterr().err, str(other), "does not fit the model")


# ---- resume ---------------------------------------------------------------------------------


def test_a_model_override_that_contradicts_the_checkpoint_is_refused(saved, mnist_dir, tmp_path, capsys):
    """Lightning replaced --model.init_args.widths by the checkpoint's value without a word."""
    code = main(fit(mnist_dir, tmp_path / "new", "--model.init_args.widths=[64]", f"--ckpt_path={saved}"))
    assert code == 2
    assert_one_paragraph(capsys.readouterr().err, "widths: [32] → [64]", str(saved), "without --ckpt_path")


def test_a_config_value_the_checkpoint_replaces_is_named(saved, mnist_dir, tmp_path, caplog):
    """A value that only the config file gives is replaced by the checkpoint's, as Lightning does
    (so a run resumes with its plain config), and the warning says so."""
    from regfit.cli import run_cli

    config = tmp_path / "wide.yaml"
    config.write_text(Path(L2_CONFIG).read_text().replace("widths: [512, 256]", "widths: [64]"))
    args = [a for a in fit(mnist_dir, tmp_path / "new", f"--ckpt_path={saved}", "--trainer.max_epochs=2") if a != SMALL]
    args[args.index(L2_CONFIG)] = str(config)
    with caplog.at_level("WARNING", logger="regfit"):
        cli = run_cli(args)
    assert [m.out_features for m in cli.model.body if hasattr(m, "out_features")] == [32]
    assert "checkpoint's arguments, not the config's: widths: [64] → [32]" in caplog.text


def test_resuming_with_the_same_config_continues(saved, mnist_dir, tmp_path):
    from regfit.cli import run_cli

    cli = run_cli(fit(mnist_dir, tmp_path / "new", "--trainer.max_epochs=2", f"--ckpt_path={saved}"))
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 6
    assert read_checkpoint(tmp_path / "new" / "last.ckpt")["epoch"] == 1
