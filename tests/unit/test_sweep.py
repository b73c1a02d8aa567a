"""Sweeps end to end: the W&B agent's command line runs regfit, and `regfit sweep` runs offline."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import yaml

import optuna

from regfit import Regularization
from regfit.cli import main as regfit_main
from regfit.cli import run_cli
from regfit.sweep import Objective
from regfit.sweep_spec import load_sweep, make_sampler, suggest, trial_argv

REPO_ROOT = Path(__file__).resolve().parents[2]
L2_SWEEP = REPO_ROOT / "configs" / "sweeps" / "mnist_l2_lambda_lr.yaml"
LAMBDA, LR = "regularization.strength", "optimizer.lr"


def fast(mnist_dir: Path, log_dir: Path, csv_logger: bool = True) -> list[str]:
    """Overrides that make a fit take a second: a narrow MLP, a few batches, no progress bar."""
    args = [
        f"--data.data_dir={mnist_dir}",
        "--model.init_args.widths=[32]",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if csv_logger:
        args.append("--trainer.logger=lightning.pytorch.loggers.CSVLogger")
    return [*args, f"--trainer.logger.init_args.save_dir={log_dir}"]


@pytest.fixture
def in_repo(monkeypatch):
    """Sweep commands name configs relative to the repository root, as `wandb agent` runs them."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)


def sampled_values(seed: int = 3) -> dict:
    """λ and lr as a sampler draws them from the sweep file's distributions."""
    spec = load_sweep(L2_SWEEP)
    trial = optuna.create_study(sampler=make_sampler(spec, seed=seed)).ask()
    return {p.name: suggest(trial, p) for p in spec.parameters}


def wandb_agent_command(values: dict, monkeypatch, wandb_dir: Path) -> tuple[list[str], dict]:
    """The command and environment wandb's own agent code builds for one run of the sweep."""
    from wandb import wandb_agent

    started = {}

    class Recorder:  # stands in for the child process only; everything before it is wandb's
        def __init__(self, command=None, env=None, **_):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    for var in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them; restore after
        monkeypatch.setenv(var, "")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep123")
    agent._sweep_command = yaml.safe_load(L2_SWEEP.read_text())["command"]  # as agent.run() reads it
    agent._command_run({"run_id": "run42", "program": "regfit", "args": {k: {"value": v} for k, v in values.items()}})
    return started["command"], started["env"]


def test_wandb_agent_arguments_reach_regularization_optimizer_and_config(mnist_dir, tmp_path, monkeypatch, in_repo):
    values = sampled_values()
    command, _ = wandb_agent_command(values, monkeypatch, tmp_path)
    assert command[:2] == ["/usr/bin/env", "regfit"]
    argv = command[2:]
    assert argv == trial_argv(load_sweep(L2_SWEEP), values)  # regfit sweep starts the very same fit

    cli = run_cli([*argv, "--trainer.max_steps=3", *fast(mnist_dir, tmp_path)])

    (reg,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Regularization)]
    assert reg.term.strength == values[LAMBDA]
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == values[LR]
    assert cli.trainer.global_step == 3
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["regularization"]["strength"] == values[LAMBDA]
    assert saved["optimizer"]["init_args"]["lr"] == values[LR]


def test_under_wandb_agent_the_logger_joins_the_agents_run(mnist_dir, tmp_path, monkeypatch, in_repo):
    import wandb

    values = sampled_values(seed=5)
    command, env = wandb_agent_command(values, monkeypatch, tmp_path)
    for var in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(var, env[var])  # what the agent's child process sees
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb reads WANDB_* once per process into its settings singleton; the agent's child is
    # a fresh process, so start from a fresh singleton as it would (earlier tests made one).
    wandb.teardown()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli([*command[2:], "--trainer.max_steps=2", *fast(mnist_dir, tmp_path, csv_logger=False)])
    run = cli.trainer.logger.experiment
    assert wandb.run is None  # the command closed its run, so the next one starts fresh
    assert (run.id, run.sweep_id) == ("run42", "sweep123")
    # The agent's values (as W&B stores them) and the resolved config both reach the run.
    assert run.config[LAMBDA] == values[LAMBDA] == run.config["regularization"]["strength"]
    assert run.config[LR] == values[LR] == run.config["optimizer"]["init_args"]["lr"]
    assert not [w for w in caught if "already in progress" in str(w.message)]


def test_local_sweep_three_trials(mnist_dir, tmp_path, in_repo, capsys):
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    out = tmp_path / "results"
    rc = regfit_main(
        ["sweep", str(L2_SWEEP), "--count", "3", "--storage", storage, "--study-name", "l2", "--seed", "0",
         "--out", str(out), "--", "--trainer.max_epochs=2", *fast(mnist_dir, tmp_path)]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "val/acc" in table and "regularization.strength" in table

    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert (out / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    study = optuna.load_study(study_name="l2", storage=storage)  # read back from storage
    best = study.best_trial
    assert 1e-6 <= best.params[LAMBDA] <= 1e-1 and 1e-3 <= best.params[LR] <= 0.3
    assert best.value == max(t.value for t in study.trials if t.state.name == "COMPLETE")
    best_row = rows[best.number]
    assert float(best_row[LAMBDA]) == best.params[LAMBDA] and float(best_row["val/acc"]) == best.value
    for t in study.trials:  # each trial was a real fit with its own λ and lr
        saved = yaml.safe_load((Path(t.user_attrs["log_dir"]) / "config.yaml").read_text())
        assert saved["regularization"]["strength"] == t.params[LAMBDA]
        assert saved["optimizer"]["init_args"]["lr"] == t.params[LR]


def test_a_pruned_trial_stops_its_fit(mnist_dir, tmp_path, in_repo):
    spec = load_sweep(L2_SWEEP)
    # Prunes any accuracy below 1.1, i.e. always: the trial must stop after its first validation.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.1))
    objective = Objective(spec, spec.metric, "prune", ["--trainer.max_epochs=5", *fast(mnist_dir, tmp_path)])
    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    rows = list(csv.DictReader((Path(trial.user_attrs["log_dir"]) / "metrics.csv").open()))
    assert max(int(r["epoch"]) for r in rows) == 0  # one epoch of five


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        ("method: hyperopt\nparameters: {optimizer.lr: {values: [0.1]}}\n", [], "unknown method 'hyperopt'"),
        (
            "method: random\nmetric: {name: val/acc}\nparameters:\n  optimizer.lr: {distribution: normal, mu: 0, sigma: 1}\n",
            [],
            "parameter 'optimizer.lr': distribution 'normal' is not supported",
        ),
        ("method: bayes\nparameters: {optimizer.lr: {min: 0.01, max: 0.1}}\n", [], "method bayes needs a metric"),
        (
            "method: random\nmetric: {name: val/acc}\nparameters: {optimizer.lr: {min: 0.01, max: 0.1}}\n"
            "command: [regfit, fit, --config, configs/mnist_l2.yaml, '${args}']\n",
            [],
            "give the number of trials with --count N",
        ),
        (
            "method: grid\nmetric: {name: val/acc}\nparameters: {optimizer.lr: {values: [0.1]}}\n"
            "command: [regfit, fit, --config, configs/mnist_l2.yaml, '${args}']\n",
            ["--", "--optimizer.lr=0.5"],
            "sets the swept parameter 'optimizer.lr'",
        ),
        ("method: grid\nmetric: {name: val/acc}\nparameters: {optimizer.lr: {values: [0.1]}}\n", [], "must be `[${env}, regfit, fit"),
    ],
    ids=["method", "distribution", "bayes-metric", "count", "override", "command"],
)
def test_malformed_sweep_is_a_clear_error(tmp_path, capsys, in_repo, text, extra, message):
    assert regfit_main(["sweep", write(tmp_path, text), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_metric_that_is_never_logged_is_named(mnist_dir, tmp_path, in_repo, capsys):
    text = L2_SWEEP.read_text().replace("name: val/acc", "name: val/accuracy")
    rc = regfit_main(["sweep", write(tmp_path, text), "--count", "1", "--out", str(tmp_path),
                      "--", "--trainer.max_epochs=1", *fast(mnist_dir, tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'val/accuracy' was never logged" in err and "val/acc" in err


def test_a_bad_trial_keeps_the_results_of_those_before_it(mnist_dir, tmp_path, in_repo, capsys):
    """A grid point the CLI refuses ends the sweep with that trial's error in one paragraph;
    the trials that finished are still printed and written."""
    text = (
        "method: grid\nmetric: {name: val/acc, goal: maximize}\n"
        "parameters: {regularization.strength: {values: [1.0e-4, -1.0]}}\n"
        "command: ['${env}', regfit, fit, --config, configs/mnist_l2.yaml, '${args}']\n"
    )
    out = tmp_path / "results"
    # --seed 1: the grid sampler takes 1e-4 first, then -1 (its order is a seeded shuffle)
    rc = regfit_main(["sweep", write(tmp_path, text), "--seed", "1", "--out", str(out), "--",
                      "--trainer.max_epochs=1", *fast(mnist_dir, tmp_path)])
    assert rc == 2
    captured = capsys.readouterr()
    assert "trial 1 (regularization.strength=-1" in captured.err and "≥ 0" in captured.err
    assert "Traceback" not in captured.err
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "FAIL")]
    assert float(rows[0]["val/acc"]) > 0 and "val/acc" in captured.out


def test_storage_that_is_not_a_url_names_the_fix(tmp_path, capsys, in_repo):
    assert regfit_main(["sweep", str(L2_SWEEP), "--count", "1", "--storage", str(tmp_path / "sweep.db")]) == 2
    err = capsys.readouterr().err
    assert f"for a file write --storage sqlite:///{tmp_path / 'sweep.db'}" in err and "Traceback" not in err
