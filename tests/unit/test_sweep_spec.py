"""Sweep files: validation, the W&B → Optuna mapping, and the agent's argument list."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

import optuna

from regfit.sweep_spec import (  # noqa: E402
    DISTRIBUTIONS,
    Hyperband,
    SweepSpecError,
    load_sweep,
    make_pruner,
    make_sampler,
    parse_sweep,
    suggest,
    trial_argv,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SWEEP_FILES = sorted((REPO_ROOT / "configs" / "sweeps").glob("*.yaml"))
COMMAND = ["${env}", "regfit", "fit", "--config", "configs/mnist_l2.yaml", "${args}"]


def sweep(**overrides):
    config = {
        "method": "bayes",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"regularization.strength": {"distribution": "log_uniform_values", "min": 1e-6, "max": 0.1}},
        "command": list(COMMAND),
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def test_repository_sweep_files_parse():
    assert {p.name for p in SWEEP_FILES} >= {"mnist_l2_lambda_lr.yaml", "mnist_penalties_grid.yaml"}
    bayes = load_sweep(REPO_ROOT / "configs/sweeps/mnist_l2_lambda_lr.yaml")
    assert bayes.method == "bayes" and bayes.metric.name == "val/acc" and bayes.metric.goal == "maximize"
    strength, lr = bayes.parameter("regularization.strength"), bayes.parameter("optimizer.lr")
    assert strength.distribution == lr.distribution == "log_uniform_values"
    assert strength.bounds[0] <= 1e-6 and strength.bounds[1] >= 1e-1
    assert bayes.early_terminate == Hyperband(min_resource=1, max_resource="auto", reduction_factor=3)
    # --config before ${args}: jsonargparse applies arguments in order.
    assert bayes.command.index("--config") < bayes.command.index("${args}")
    grid = load_sweep(REPO_ROOT / "configs/sweeps/mnist_penalties_grid.yaml")
    assert grid.method == "grid"
    assert [p.name for p in grid.swept] == ["regularization.penalty", "regularization.strength"]


def wandb_violations(config) -> list[str]:
    """What W&B's server says of a sweep config: its JSON schema (vendored from W&B's `sweeps`
    package, whose numpy < 2 pin must not hold back the test environment) checked as its
    validator checks it (draft 7, with its float/integer formats), plus the checks it adds in
    code: `parameters` present, min < max."""
    import json
    import numbers

    import jsonschema

    schema = json.loads((Path(__file__).parent / "wandb_sweep_schema.json").read_text())
    formats = jsonschema.FormatChecker()
    formats.checks("float")(lambda v: isinstance(v, float))
    formats.checks("integer")(lambda v: isinstance(v, int))
    found = [e.message for e in jsonschema.Draft7Validator(schema, format_checker=formats).iter_errors(config)]
    if "parameters" not in config:
        found.append("`parameters` is required")
    for name, spec in (config.get("parameters") or {}).items():
        lo, hi = spec.get("min"), spec.get("max")
        if isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real) and lo >= hi:
            found.append(f"{name}: min {lo} is not less than max {hi}")
    return found


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_pass_wandb_schema(path):
    """W&B's own sweep-config schema (the one wandb's server validates against)."""
    config = yaml.safe_load(path.read_text())
    assert wandb_violations(config) == []


@pytest.mark.parametrize("bad", [
    sweep(method="annealing"),
    sweep(parameters={"optimizer.lr": {"distribution": "log_uniform_valuez", "min": 1e-3, "max": 1.0}}),
    sweep(parameters={"optimizer.lr": {"min": 1.0, "max": 0.1}}),
    sweep(metric={"name": "val/acc", "goal": "up"}),
    sweep(parameters=None),
], ids=["method", "distribution", "min-max", "goal", "no-parameters"])
def test_wandb_schema_agrees_on_a_bad_file(bad):
    """The validator the test above relies on does reject what regfit rejects."""
    assert wandb_violations(bad)
    with pytest.raises(SweepSpecError):
        parse_sweep(bad)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (sweep(method="annealing"), "unknown method 'annealing'; use one of grid, random, bayes"),
        (sweep(metric=None), "method bayes needs a metric"),
        (sweep(metric={"name": "val/acc", "goal": "up"}), "goal 'up' must be minimize or maximize"),
        (
            sweep(parameters={"optimizer.lr": {"distribution": "normal", "mu": 0.1, "sigma": 0.01}}),
            "parameter 'optimizer.lr': distribution 'normal' is not supported by regfit sweep; supported: constant",
        ),
        (
            sweep(parameters={"optimizer.lr": {"distribution": "log_uniform_valuez", "min": 1e-3, "max": 1.0}}),
            "'log_uniform_valuez' is not a W&B distribution; supported:",
        ),
        (
            sweep(parameters={"optimizer.lr": {"values": [0.1, 0.2], "probabilities": [0.5, 0.5]}}),
            "'categorical_w_probabilities' is not supported",
        ),
        (
            sweep(parameters={"optimizer.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1.0}}),
            "min must be > 0",
        ),
        (sweep(parameters={"optimizer.lr": {"min": 1.0, "max": 0.1}}), "min (1.0) must be smaller than max (0.1)"),
        (  # the values themselves given to log_uniform, which W&B reads as ln bounds: λ ≈ 1.0…1.1
            sweep(parameters={"regularization.strength": {"distribution": "log_uniform", "min": 1e-6, "max": 0.1}}),
            "would sample e^1e-06…e^0.1 ≈ 1…1.11. For values from 1e-06 to 0.1 write `distribution: log_uniform_values`",
        ),
        (
            sweep(parameters={"regularization.strength": {"distribution": "log_uniform_values", "min": "1e-6", "max": 0.1}}),
            "got '1e-6' (YAML reads 1e-6 as a string: write it with a dot, 1.0e-06)",
        ),
        (sweep(parameters={}), "`parameters` must map dotted CLI names"),
        (sweep(parameters={"optimizer": {"parameters": {"lr": {"value": 1}}}}), "nested `parameters` are not supported"),
        (
            sweep(method="grid", parameters={"optimizer.lr": {"distribution": "uniform", "min": 0.1, "max": 1.0}}),
            "method grid needs `values: [...]`",
        ),
        (sweep(early_terminate={"type": "hyperband", "min_iter": 1, "eta": 2.5}), "eta must be an integer"),
        (sweep(early_terminate={"type": "hyperband", "eta": 3}), "give `min_iter`"),
        (sweep(early_terminate={"type": "median"}), "only `type: hyperband`"),
        (sweep(command=["regfit", "fit", "--config", "c.yaml"]), "must contain ${args}"),
        (sweep(command=["regfit", "fit", "${args}", "--config", "c.yaml"]), "put --config before ${args}"),
    ],
)
def test_malformed_sweep_files_are_named(config, message):
    with pytest.raises(SweepSpecError) as info:
        parse_sweep(config, source="bad.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("bad.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SweepSpecError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("method: [grid\n")
    with pytest.raises(SweepSpecError, match="not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")


def _distribution(spec: dict, method: str = "random"):
    """Sample ``spec`` once through :func:`suggest`; return (value, Optuna's distribution)."""
    parsed = parse_sweep(sweep(method=method, parameters={"x": spec}))
    study = optuna.create_study(sampler=make_sampler(parsed, seed=0))
    trial = study.ask()
    value = suggest(trial, parsed.parameter("x"))
    return value, trial.distributions.get("x")


def test_suggest_maps_each_wandb_distribution():
    dist = optuna.distributions
    value, d = _distribution({"distribution": "log_uniform_values", "min": 1e-6, "max": 0.1})
    assert d == dist.FloatDistribution(1e-6, 0.1, log=True) and 1e-6 <= value <= 0.1
    # W&B's log_uniform bounds are natural logs of the values.
    value, d = _distribution({"distribution": "log_uniform", "min": math.log(1e-4), "max": 0.0})
    assert d.log and math.isclose(d.low, 1e-4) and math.isclose(d.high, 1.0)
    _, d = _distribution({"distribution": "uniform", "min": 0.0, "max": 0.5})
    assert d == dist.FloatDistribution(0.0, 0.5)
    _, d = _distribution({"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25})
    assert d == dist.FloatDistribution(0.0, 1.0, step=0.25)
    value, d = _distribution({"min": 2, "max": 9})  # inferred int_uniform, as W&B infers it
    assert d == dist.IntDistribution(2, 9) and isinstance(value, int)
    value, d = _distribution({"values": ["l1", "l2"]})
    assert d == dist.CategoricalDistribution(["l1", "l2"]) and value in ("l1", "l2")
    value, d = _distribution({"distribution": "categorical", "values": [0.1, 0.2]})
    assert d == dist.CategoricalDistribution([0.1, 0.2])
    value, d = _distribution({"value": "proximal"})
    assert value == "proximal" and d is None  # fixed: never suggested
    value, d = _distribution({"distribution": "q_log_uniform_values", "min": 8, "max": 512, "q": 8})
    assert d == dist.FloatDistribution(8, 512, log=True) and value % 8 == 0


def test_every_supported_distribution_is_mapped():
    specs = {
        "constant": {"value": 1},
        "categorical": {"values": [1, 2]},
        "int_uniform": {"min": 1, "max": 3},
        "uniform": {"min": 0.1, "max": 0.3},
        "q_uniform": {"min": 0.0, "max": 1.0},
        "log_uniform_values": {"min": 0.1, "max": 1.0},
        "q_log_uniform_values": {"min": 1, "max": 100},
        "log_uniform": {"min": -2.0, "max": 0.0},
        "q_log_uniform": {"min": 0.0, "max": 5.0},
    }
    assert set(specs) == set(DISTRIBUTIONS)
    for name, spec in specs.items():
        value, _ = _distribution({"distribution": name, **spec})
        assert value is not None, name


def test_samplers_and_pruner():
    assert isinstance(make_sampler(parse_sweep(sweep())), optuna.samplers.TPESampler)
    assert isinstance(make_sampler(parse_sweep(sweep(method="random"))), optuna.samplers.RandomSampler)
    grid = parse_sweep(
        sweep(method="grid", parameters={"a": {"values": [1, 2, 3]}, "b": {"values": ["x", "y"]}, "c": {"value": 0}})
    )
    sampler = make_sampler(grid)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    study = optuna.create_study(sampler=sampler)
    seen = []
    study.optimize(lambda trial: seen.append(tuple(suggest(trial, p) for p in grid.parameters)) or 0.0, n_trials=20)
    assert len(seen) == 6  # the sampler stops the study when the grid is done
    assert set(seen) == {(a, b, 0) for a in (1, 2, 3) for b in ("x", "y")}

    assert isinstance(make_pruner(parse_sweep(sweep())), optuna.pruners.NopPruner)
    pruner = make_pruner(parse_sweep(sweep(early_terminate={"type": "hyperband", "max_iter": 27, "s": 2, "eta": 3})))
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    # W&B bands 27/3, 27/9 → Optuna rungs from 3 to 27 by factor 3.
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (3, 27, 3)


def test_trial_argv_is_what_the_wandb_agent_builds(monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    monkeypatch.setenv("REGFIT_SWEEP_CFG", "configs/other.yaml")
    spec = parse_sweep(sweep(command=["${env}", "regfit", "fit", "--config", "${envvar:REGFIT_SWEEP_CFG}", "${args}"]))
    values = {"regularization.strength": 3.2e-05, "regularization.penalty": "l1", "trainer.deterministic": True}
    argv = trial_argv(spec, values, ["--trainer.max_epochs=1"])
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    assert argv == ["fit", "--config", "configs/other.yaml", *flags, "--trainer.max_epochs=1"]
    assert flags == ["--regularization.strength=3.2e-05", "--regularization.penalty=l1", "--trainer.deterministic=True"]


@pytest.mark.parametrize(
    "command",
    [None, ["${env}", "${interpreter}", "${program}", "${args}"], ["${env}", "regfit", "test", "${args}"]],
)
def test_trial_argv_needs_a_regfit_fit_command(command):
    spec = parse_sweep(sweep(command=command))
    with pytest.raises(SweepSpecError, match=r"must be `\[\$\{env\}, regfit, fit, --config"):
        trial_argv(spec, {"regularization.strength": 1e-4})


def test_a_timescale_sweep_reaches_the_term(monkeypatch, tmp_path):
    """`regularization.timescale.epochs` in a sweep file: the agent's --name=value sets the term's timescale."""
    from regfit.lightning_cli import run_cli
    from regfit.regularization import regularizations

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec = load_sweep(REPO_ROOT / "configs/sweeps/mnist_timescale_grid.yaml")
    assert [p.name for p in spec.swept] == ["regularization.timescale.epochs", "data.init_args.batch_size"]
    argv = trial_argv(spec, {"regularization.timescale.epochs": 3, "data.init_args.batch_size": 256})
    assert argv[:3] == ["fit", "--config", "configs/mnist_timescale.yaml"]
    assert "--regularization.timescale.epochs=3" in argv
    cli = run_cli([*argv[1:], f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    (reg,) = regularizations(cli.trainer)
    assert reg.timescale == {"epochs": 3.0} and math.isnan(reg.strength)  # λ: at train start
    assert cli.datamodule.batch_size == 256
