"""The ``regfit`` command end to end: every config trains, metrics land in a CSV log,
``regfit groups`` prints the table, and user mistakes exit 2 with one paragraph."""

from __future__ import annotations

import csv
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from regfit.cli import configure_wandb, main, run_cli, wandb_credentials_found

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
L2_CONFIG = str(REPO / "configs" / "mnist_l2.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.enable_checkpointing=false"]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No network, no login prompt, nothing written outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def short_fit_args(config: str | Path, mnist_dir: Path, log_dir: Path, *extra: str) -> list[str]:
    """A few training steps and 2 validation batches, logged to CSV."""
    return ["fit", "--config", str(config), "--data.data_dir", str(mnist_dir),
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger={{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {log_dir}}}}}",
            *QUIET, *extra]


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    (path,) = log_dir.glob("lightning_logs/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


# ---- every config runs as written (a few steps) ------------------------------------------


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"mnist_l2.yaml", "mnist_l1_proximal.yaml", "mnist_lhalf.yaml", "mnist_adamw_decoupled.yaml",
            "mnist_elasticnet_fan.yaml", "mnist_cnn_grouplasso.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_trains_and_logs_data_loss_and_penalty_separately(config, mnist_dir, tmp_path):
    cli = run_cli(short_fit_args(config, mnist_dir, tmp_path))
    terms = [cb.name for cb in cli.trainer.callbacks if type(cb).__name__ == "Regularization"]
    assert terms, "every config has at least the regularization: section"
    assert cli.trainer.global_step == 4

    rows = read_metrics(tmp_path)
    data, penalty, total = column(rows, "train/data_loss"), column(rows, "train/penalty"), column(rows, "train/loss")
    assert len(data) == len(penalty) == len(total) == 4
    for d, p, t in zip(data, penalty, total):
        assert p > 0 and math.isfinite(d)
        assert t == pytest.approx(d + p, rel=1e-5)
    per_term = [column(rows, f"train/penalty/{name}") for name in terms]
    for step in range(4):
        assert sum(v[step] for v in per_term) == pytest.approx(penalty[step], rel=1e-5)
    for name in terms:
        assert len(column(rows, f"weights/norm/{name}")) == 4
        assert len(column(rows, f"train/penalty_epoch/{name}")) == 1
    assert len(column(rows, "train/penalty_epoch")) == len(column(rows, "train/data_loss_epoch")) == 1
    (acc,) = column(rows, "val/acc")
    assert 0.0 <= acc <= 1.0
    assert column(rows, "val/data_loss")


def test_a_timescale_config_resolves_lambda_from_the_run(mnist_dir, tmp_path):
    cli = run_cli(short_fit_args(REPO / "configs" / "mnist_timescale.yaml", mnist_dir, tmp_path))
    (reg,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Regularization"]
    assert reg.timescale == {"epochs": 10.0}
    assert reg.strength * 1e-3 * 4 == pytest.approx(1 / 10)  # λ·η₀·steps_per_epoch = 1/τ (4 batches per epoch)
    rows = read_metrics(tmp_path)
    assert column(rows, "train/strength/l2") == pytest.approx([reg.strength] * 4)
    assert len(column(rows, "weights/angular_update/l2")) == len(column(rows, "weights/equilibrium_angle/l2")) == 4


def test_command_line_overrides_reach_the_term_and_optimizer(mnist_dir, tmp_path):
    cli = run_cli(short_fit_args(L2_CONFIG, mnist_dir, tmp_path, "--regularization.strength=0.5",
                                 "--regularization.mode=decoupled", "--regularization.exclude=[bias]",
                                 "--optimizer.lr=0.01"))
    (reg,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Regularization"]
    assert reg.term.strength == 0.5 and reg.term.mode.name == "decoupled"
    assert [a.name for a in reg.term.assignments] == ["body.0.weight", "body.2.weight", "head.weight"]
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.01
    # the logged penalty is λ·½‖w‖² over exactly those tensors
    rows = read_metrics(tmp_path)
    assert column(rows, "train/penalty/l2")[-1] > 0


# ---- regfit groups ------------------------------------------------------------------------


def test_groups_lists_every_parameter_with_term_coefficient_and_mode(capsys):
    assert main(["groups", "--plain", "--config", str(REPO / "configs" / "mnist_elasticnet_fan.yaml")]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("body.", "head."))}
    assert set(lines) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias"}
    # fan scale: c = (784 + 512) / (784·512), λ = 0.01
    name, shape, numel, term, penalty, coeff, mode, *_ = lines["body.0.weight"]
    assert (shape, numel, term, mode) == ("512×784", "401,408", "elasticnet", "coupled")
    assert float(coeff) == pytest.approx(0.01 * (784 + 512) / (784 * 512), rel=1e-3)
    assert lines["head.weight"][3:5] == ["-", "excluded"] and lines["body.0.bias"][4] == "excluded"
    assert "532,480 of 535,818 weights regularized (2 of 6 tensors)." in out


def test_groups_shows_both_terms_of_a_two_term_config(capsys):
    assert main(["groups", "--plain", "--config", str(REPO / "configs" / "mnist_cnn_grouplasso.yaml")]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("features.", "fc."))}
    assert rows["features.0.weight"][3:5] == ["grouplasso", "GroupLasso()"]
    assert rows["features.0.weight"][6] == "proximal"
    assert rows["fc.0.weight"][3] == "l2" and rows["fc.0.bias"][4] == "excluded"


def test_groups_shows_a_timescale_and_the_lambda_it_gives(capsys):
    adamw = str(REPO / "configs" / "mnist_adamw_decoupled.yaml")  # Adam, lr 0.001, decoupled L2
    assert main(["groups", "--plain", "--config", adamw, "--regularization.strength=null",
                 "--regularization.timescale.steps=2000"]) == 0
    out = capsys.readouterr().out
    assert "0.5 (τ=2000 steps)" in out  # λ = 1/(η₀·τ) = 1/(0.001·2000)
    assert next(ln for ln in out.splitlines() if ln.startswith("body.0.weight")).split()[5] == "0.5"
    # in epochs, without the data on disk: the steps per epoch are unknown, so is λ
    assert main(["groups", "--plain", "--config", adamw, "--data.data_dir=nowhere", "--regularization.strength=null",
                 "--regularization.timescale.epochs=5"]) == 0
    out = capsys.readouterr().out
    assert "τ=5 epochs" in out and next(ln for ln in out.splitlines() if ln.startswith("body.0.weight")).split()[5] == "-"


def test_groups_says_which_tensors_are_scale_invariant(mnist_dir, capsys):
    argv = ["groups", "--plain", "--config", L2_CONFIG, "--model=tests.helpers.LayerNormMLP", "--regularization.exclude=[]"]
    assert main([*argv, "--data.data_dir", str(mnist_dir)]) == 0  # probed on one training batch
    out = capsys.readouterr().out
    cells = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("body.", "head."))}
    assert cells["body.0.weight"][-1] == "yes"  # Linear without bias → LayerNorm
    assert cells["head.weight"][-1] == "no" and cells["body.1.weight"][-1] == "no"
    assert "not probed" not in out
    assert main([*argv, "--data.data_dir=nowhere"]) == 0  # no data on disk: not probed, and nothing downloaded
    out = capsys.readouterr().out
    assert {ln.split()[-1] for ln in out.splitlines() if ln.startswith("body.0.weight")} == {"?"}
    assert "scale invariance not probed" in out and "MNIST data not found" in out


def test_console_script_groups_runs_as_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from regfit.cli import main; sys.exit(main())",
                           "groups", "--config", L2_CONFIG, "--plain"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "body.0.weight" in proc.stdout and "excluded" in proc.stdout


def test_console_script_exits_2_with_one_paragraph_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(["regfit", "fit", "--config", L2_CONFIG, "--regularization.penalty=l3"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Unknown penalty 'l3'" in proc.stderr and "Traceback" not in proc.stderr


# ---- bad input: exit 2, one paragraph naming the value ------------------------------------

BAD_OVERRIDES = {
    "unknown-penalty": (["--regularization.penalty=l3"], ["'l3'", "l2"]),
    "unknown-mode": (["--regularization.mode=sideways"], ["regularization.mode", "'coupled', 'decoupled', 'proximal'"]),
    "negative-strength": (["--regularization.strength=-1"], ["strength=-1.0", "≥ 0"]),
    "nan-strength": (["--regularization.strength=nan"], ["regularization.strength", "nan"]),
    "unknown-keyword": (["--regularization.exclude=[biases]"], ["'biases'", "Did you mean 'bias'"]),
    "glob-matching-nothing": (["--regularization.include=[body.9.*]"], ["'body.9.*'", "matches no trainable parameter"]),
    "unknown-scale": (["--regularization.scale=mean"], ["regularization.scale", "'none', 'numel', 'fan'"]),
    "model-not-a-regmodule": (["--model=torch.nn.Linear"], ["torch.nn.Linear is not a regfit.RegModule subclass"]),
    "datamodule-as-model": (["--model.class_path=regfit.data.MNISTDataModule"], ["is not a regfit.RegModule subclass"]),
    "bad-model-argument": (["--model.init_args.widths=[0]"], ["widths=[0]", "positive integers"]),
    "list-without-brackets": (["--regularization.exclude=bias"], ["takes a list", "write --regularization.exclude=[bias]"]),
    "model-list-without-brackets": (["--model.init_args.widths=512"], ["write --model.init_args.widths=[512]"]),
    "unknown-option": (["--trainer.epochs=3"], ["--trainer.epochs=3"]),
    "strength-and-timescale": (["--regularization.timescale.epochs=5"], ["not both", "strength: null"]),
    "timescale-of-l1": (["--regularization.penalty=l1", "--regularization.strength=null",
                         "--regularization.timescale.epochs=5"], ["timescale", "L1 does not shrink w"]),
    "timescale-in-weeks": (["--regularization.strength=null", "--regularization.timescale.weeks=5"],
                           ["{'weeks': 5.0}", "{'epochs': τ}"]),
    "duplicate-term-names": (
        ['--trainer.callbacks=[{class_path: regfit.Regularization, init_args: {penalty: l2}}]'],
        ["named 'l2'", "distinct `name`"],
    ),
}


def assert_user_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("regfit: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_input_exits_2_with_a_clear_message(case, capsys):
    overrides, needles = BAD_OVERRIDES[case]
    code = main(["groups", "--config", L2_CONFIG, *overrides])
    assert_user_error(capsys, code, *needles)


@pytest.mark.parametrize("argv, needle", [
    (["groups"], "`regfit groups --config configs/mnist_l2.yaml"),
    (["groups", L2_CONFIG], f"run `regfit groups --config {L2_CONFIG}`"),
    (["fit", L2_CONFIG], f"run `regfit fit --config {L2_CONFIG}`"),
])
def test_a_config_without_config_flag_shows_the_right_call(argv, needle, capsys):
    assert_user_error(capsys, main(argv), needle)


def test_missing_config_file(capsys):
    assert_user_error(capsys, main(["fit", "--config", "no/such.yaml"]), "no/such.yaml", "does not exist")


def test_unreadable_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n  - : :\n")
    assert_user_error(capsys, main(["fit", "--config", str(bad)]), "bad.yaml")


def test_glob_matching_nothing_stops_fit_before_training(mnist_dir, tmp_path, capsys):
    code = main(short_fit_args(L2_CONFIG, mnist_dir, tmp_path, "--regularization.exclude=[body.7.weight]"))
    assert_user_error(capsys, code, "'body.7.weight'", "regfit groups")
    assert not list(tmp_path.glob("lightning_logs/version_*/metrics.csv"))


def test_a_model_built_for_other_data_names_the_option_to_change(mnist_dir, tmp_path, capsys):
    code = main(short_fit_args(L2_CONFIG, mnist_dir, tmp_path, "--model.init_args.in_features=100"))
    assert_user_error(capsys, code, "MLP(in_features=100)", "--model.init_args.in_features=784")
    code = main(short_fit_args(L2_CONFIG, mnist_dir, tmp_path, "--model.init_args.num_classes=5"))
    assert_user_error(capsys, code, "MLP(num_classes=5)", "--model.init_args.num_classes=")


def test_missing_data_offline_names_the_data_dir_option(tmp_path, capsys):
    code = main(["fit", "--config", L2_CONFIG, "--data.data_dir", str(tmp_path / "empty"),
                 "--data.download=false", "--trainer.logger=false", *QUIET])
    assert_user_error(capsys, code, "--data.data_dir")


@pytest.fixture
def dead_mirror() -> str:
    """A URL on a 127.0.0.1 port nothing listens on: the offline case, without the network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


def test_shipped_configs_leave_data_dir_unset():
    """A config's data_dir would win over REGFIT_DATA_DIR, which the missing-data message offers."""
    for config in CONFIGS:
        data = yaml.safe_load(config.read_text()).get("data") or {}
        assert "data_dir" not in (data.get("init_args") or {}) and "data_dir" not in data, config.name


def test_missing_data_advice_works_as_written_with_a_shipped_config(mnist_dir, dead_mirror, tmp_path, monkeypatch,
                                                                    capsys):
    """Offline with no files, each way out the message names finds the files when followed to the
    letter: the environment variable (it applies because the configs leave data_dir unset) and the option."""
    monkeypatch.delenv("REGFIT_DATA_DIR", raising=False)
    offline = [f"--data.init_args.mirrors=[{dead_mirror}]"]  # the shipped mirrors, unreachable
    code = main(["fit", "--config", L2_CONFIG, *offline, "--trainer.logger=false", *QUIET])
    err = assert_user_error(capsys, code, "MNIST data not found", str(tmp_path / "data"), dead_mirror)
    variable = re.search(r"set (\w+)=DIR\b", err)[1]
    option = re.search(r"pass `(--data\.\S+) DIR`", err)[1]

    monkeypatch.setenv(variable, str(mnist_dir))
    by_variable = run_cli(["--config", L2_CONFIG, *offline], run=False).datamodule
    monkeypatch.delenv(variable)
    by_option = run_cli(["--config", L2_CONFIG, *offline, option, str(mnist_dir)], run=False).datamodule
    for dm in (by_variable, by_option):
        dm.prepare_data()  # found: nothing to download (the mirror is dead)
        dm.setup("fit")
        assert len(dm.train_set.y) + len(dm.val_set.y) == 8000
    assert not (tmp_path / "data").exists()


def test_the_environment_variable_alone_trains_a_shipped_config(mnist_dir, dead_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("REGFIT_DATA_DIR", str(mnist_dir))
    args = [a for a in short_fit_args(L2_CONFIG, mnist_dir, tmp_path) if a not in ("--data.data_dir", str(mnist_dir))]
    cli = run_cli([*args, f"--data.init_args.mirrors=[{dead_mirror}]"])
    assert cli.trainer.global_step == 4 and cli.datamodule.files.data_dir == mnist_dir


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="Unknown penalty 'l3'"):
        main(["groups", "--config", L2_CONFIG, "--regularization.penalty=l3", "--debug"])


def test_sweep_without_the_sweep_module_is_a_clear_error(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def no_sweep(name, *args):
        if name == "regfit.sweep":
            raise ModuleNotFoundError("No module named 'regfit.sweep'", name="regfit.sweep")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_sweep)
    assert_user_error(capsys, main(["sweep", "sweep.yaml"]), "regfit sweep", "not available")


# ---- W&B: never a login prompt --------------------------------------------------------------


def test_wandb_goes_offline_without_credentials(tmp_path):
    env = {"NETRC": str(tmp_path / "none")}
    assert not wandb_credentials_found(env)
    assert configure_wandb(env) and env["WANDB_MODE"] == "offline"


def test_wandb_stays_online_with_a_key_or_netrc_or_an_explicit_mode(tmp_path):
    assert not configure_wandb({"WANDB_API_KEY": "x" * 40})
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    env = {"NETRC": str(netrc)}
    assert wandb_credentials_found(env) and not configure_wandb(env) and "WANDB_MODE" not in env
    env = {"NETRC": str(tmp_path / "none"), "WANDB_MODE": "disabled"}
    assert not configure_wandb(env) and env["WANDB_MODE"] == "disabled"


def test_wandb_offline_run_holds_the_resolved_config_and_weight_histograms(mnist_dir, tmp_path, monkeypatch, caplog):
    from regfit.cli import RegfitSaveConfig

    monkeypatch.setattr(RegfitSaveConfig, "offline_notice_shown", False)
    save_dir = tmp_path / "logs"
    with caplog.at_level("WARNING", logger="regfit"):
        cli = run_cli(["fit", "--config", L2_CONFIG, "--data.data_dir", str(mnist_dir), "--trainer.max_epochs=1",
                 "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
                 f"--trainer.logger.init_args.save_dir={save_dir}", "--regularization.strength=0.000321", *QUIET])
    # One run per command: closed when the command ends, so a next in-process command
    # (a notebook cell, a sweep trial) starts its own run.
    import wandb

    assert wandb.run is None and cli.trainer.logger.experiment.id
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    assert "wandb sync" in caplog.text and str(run_dir.name) in caplog.text
    saved = (run_dir / "files" / "regfit-config.yaml").read_text()
    assert "strength: 0.000321" in saved and "class_path: regfit.models.MLP" in saved
    # The run file is protobuf records; its keys and JSON values are stored verbatim. W&B's
    # service writes it in the background after finish(): wait for the run's last records.
    (record_file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 60
    while b"weights/hist/l2/body.2.weight" not in (data := record_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b'{"penalty":"l2","strength":0.000321' in data  # the run config's regularization section
    for name in (b"body.0.weight", b"body.2.weight"):
        assert b"weights/hist/l2/" + name in data
    assert b"weights/hist/l2/head.weight" not in data  # excluded: no histogram
    assert b"train/penalty/l2" in data and b"train/data_loss" in data
