"""SIGTERM (a scheduler preempting the job) and SIGINT (Ctrl+C): the exit status says the
command was stopped (143 / 130, never 0), the fit's state is kept in a checkpoint that loads
and resumes, and a sweep writes its results so far."""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path

import pytest

from regfit.checkpointing import INTERRUPTED_CHECKPOINT, read_checkpoint
from tests.reliability.harness import (
    L2_CONFIG,
    QUIET,
    assert_one_paragraph,
    count_trials,
    env_for_subprocess,
    grid_file,
    regfit_command,
    spawn,
    sweep_fit_args,
    wait_for,
)
from tests.reliability.plugins import HOLD_ENV

ENV = env_for_subprocess(WANDB_MODE="disabled")


def long_fit(mnist_dir: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    """A fit that logs every step and runs long enough to be stopped in its first epoch."""
    return regfit_command("fit", "--config", L2_CONFIG, f"--data.data_dir={mnist_dir}", "--model.init_args.widths=[64]",
                          "--trainer.max_epochs=5", "--trainer.logger=false", *QUIET,
                          "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
                          f"init_args: {{dirpath: {ckpt_dir}}}}}]",
                          "--trainer.callbacks+=tests.reliability.plugins.AnnounceSteps", *extra)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_fit_exits_non_zero_and_keeps_a_checkpoint_that_resumes(signum, code, mnist_dir, tmp_path):
    ckpt_dir, out = tmp_path / "ckpt", tmp_path / "fit.txt"
    proc = spawn(long_fit(mnist_dir, ckpt_dir), out, cwd=tmp_path, env={**ENV, HOLD_ENV: "1"})
    wait_for(out, "training step 3", proc)
    proc.send_signal(signum)
    assert proc.wait(120) == code, out.read_text()[-3000:]  # was 0 (SIGTERM) and 1 (SIGINT)
    text = out.read_text()
    saved = ckpt_dir / INTERRUPTED_CHECKPOINT
    assert_one_paragraph(text, f"stopped by {signal.Signals(signum).name} at epoch 0", f"--ckpt_path={saved}")
    ckpt = read_checkpoint(saved)
    assert ckpt["global_step"] >= 3 and ckpt["epoch"] == 0
    if signum == signal.SIGTERM:  # the checkpoint resumes
        proc = subprocess.run(long_fit(mnist_dir, tmp_path / "resumed", f"--ckpt_path={saved}",
                                       "--trainer.max_epochs=1", "--trainer.limit_train_batches=10"),
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Restored all states" in proc.stdout + proc.stderr


def test_sigterm_before_training_is_not_a_success(tmp_path):
    out = tmp_path / "fit.txt"
    proc = spawn(regfit_command("fit", "--config", L2_CONFIG, "--print_config"), out, cwd=tmp_path, env=ENV)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) in (143, -signal.SIGTERM)  # killed by the signal, or stopped by regfit
    assert "Traceback" not in out.read_text()


def test_a_stopped_sweep_writes_its_results_and_the_rerun_finishes_the_grid(mnist_dir, tmp_path):
    storage, results = f"sqlite:///{tmp_path / 'sweep.db'}", tmp_path / "results"
    grid = grid_file(tmp_path, strengths=[1e-5, 1e-4])  # 4 points
    args = regfit_command("sweep", str(grid), "--storage", storage, "--out", str(results), "--",
                          *sweep_fit_args(mnist_dir, tmp_path / "logs", batches=6),
                          "--trainer.callbacks=[tests.reliability.plugins.AnnounceSteps]")
    out = tmp_path / "sweep.txt"
    proc = spawn(args, out, env={**ENV, HOLD_ENV: "2"})
    wait_for(out, "training step 3", proc, count=2)  # one trial done, the second training (and held there)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143, out.read_text()[-3000:]  # was 0, and no trials.csv
    assert_one_paragraph(out.read_text(), "stopped by SIGTERM", str(results), "run the same command again",
                         prefix="regfit sweep")
    with (results / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows].count("COMPLETE") >= 1
    assert any(r["state"] == "FAIL" and "stopped by SIGTERM" in r["error"] for r in rows)

    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_point, states = count_trials("grid", storage)
    assert len(per_point) == 4 and set(per_point.values()) == {1}  # none lost, none run twice
