"""The paths a new user takes first: `regfit sweep` right after the README's plain install, the
test environment's numpy (the one users get), a quiet start, and the non-finite guard's error
reported like any other user error."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from regfit.cli import SWEEP_EXTRA, main
from tests.reliability.harness import L2_CONFIG, REPO, assert_one_paragraph, env_for_subprocess, regfit_command, tiny_fit


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)


def test_sweep_without_optuna_names_the_sweep_extra(monkeypatch, capsys):
    """The README's first command installs regfit without Optuna (was: a raw ModuleNotFoundError)."""
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    code = main(["sweep", str(REPO / "configs" / "sweeps" / "mnist_l2_lambda_lr.yaml")])
    assert code == 2
    assert_one_paragraph(capsys.readouterr().err, "optuna", SWEEP_EXTRA)


def test_the_readme_names_the_sweep_extra():
    readme = (REPO / "README.md").read_text()
    assert SWEEP_EXTRA in readme
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {Requirement(r).name for r in extras["sweep"]} >= {"optuna", "matplotlib"}


def _numpy_caps(extra: str) -> list[str]:
    """The installed packages the extra pulls (transitively) that forbid numpy 2."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    todo = [Requirement(r) for r in extras[extra]]
    seen, caps = set(), []
    while todo:
        req = todo.pop()
        if req.name in seen:
            continue
        seen.add(req.name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            if sub.marker is not None and not sub.marker.evaluate({"extra": ""}):
                continue
            if sub.name == "numpy" and sub.specifier and not sub.specifier.contains("2.0.0"):
                caps.append(f"{req.name} requires {text}")
            todo.append(sub)
    return caps


@pytest.mark.parametrize("extra", ["test", "sweep"])
def test_the_extras_let_numpy_be_what_users_get(extra):
    """Users get numpy 2 with `pip install regfit`; nothing an extra pulls may cap it at 1
    (`sweeps`, W&B's validator in the test extra, did: CI tested numpy 1.26)."""
    assert _numpy_caps(extra) == []


def test_startup_is_quiet(mnist_dir, tmp_path):
    """No advertising tips, no wandb "anonymous" deprecation, no torch pytree FutureWarning."""
    proc = subprocess.run(regfit_command("fit", "--config", L2_CONFIG, f"--data.data_dir={mnist_dir}",
                                         "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                                         "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                                         "--trainer.enable_model_summary=false",
                                         f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"),
                          cwd=tmp_path, env=env_for_subprocess(WANDB_MODE="offline", NETRC=str(tmp_path / "none")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in ("💡 Tip", "litlogger", "litmodels", "anonymous setting", "LeafSpec"):
        assert noise not in output, output
    assert re.search(r"W&B is offline \(WANDB_MODE=offline\)", output)


def test_a_diverging_term_is_a_user_error(mnist_dir, capsys):
    """The guard's message is already one paragraph; the command now exits 2 without a traceback
    (was: the same text under a traceback, exit 1)."""
    code = main(["fit", "--config", L2_CONFIG, *tiny_fit(mnist_dir),
                 "--regularization.penalty=tests.reliability.plugins.Exploding"])
    assert code == 2
    assert_one_paragraph(capsys.readouterr().err, "Term 'exploding'", "non-finite", "on_nonfinite='skip'")


def test_a_diverging_term_with_skip_trains_on(mnist_dir, capsys):
    code = main(["fit", "--config", L2_CONFIG, *tiny_fit(mnist_dir),
                 "--regularization.penalty=tests.reliability.plugins.Exploding", "--regularization.on_nonfinite=skip"])
    assert code == 0
