"""A W&B sweep file, validated, and its translation to Optuna.

One sweep file serves two runners: ``wandb sweep FILE`` + ``wandb agent`` (W&B's servers
sample, the agent starts ``command`` with the sampled values as ``--name=value``), and
``regfit sweep FILE`` (Optuna samples, on this machine; see :mod:`regfit.sweep`). This
module only reads the file and maps it; it never trains.

The part of W&B's format that is understood::

    method: bayes                      # grid | random | bayes
    metric: {name: val/acc, goal: maximize}
    parameters:                        # dotted regfit CLI names
      regularization.strength: {distribution: log_uniform_values, min: 1.0e-6, max: 0.1}
      optimizer.lr: {distribution: log_uniform_values, min: 1.0e-3, max: 0.3}
    early_terminate: {type: hyperband, min_iter: 1, eta: 3}
    command: [${env}, regfit, fit, --config, configs/mnist_l2.yaml, ${args}]

``--config`` comes before ``${args}`` because jsonargparse applies arguments in order: a
config given after the sampled values would overwrite them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # optuna is an optional dependency (extra ``sweep``)
    import optuna

__all__ = [
    "DISTRIBUTIONS",
    "Hyperband",
    "Metric",
    "Parameter",
    "SweepSpec",
    "SweepSpecError",
    "UNSUPPORTED_DISTRIBUTIONS",
    "grid_search_space",
    "load_sweep",
    "make_pruner",
    "make_sampler",
    "parse_sweep",
    "suggest",
    "trial_argv",
]

Method = Literal["grid", "random", "bayes"]
METHODS: tuple[str, ...] = ("grid", "random", "bayes")

#: W&B distributions that ``regfit sweep`` maps to Optuna (see :func:`suggest`).
DISTRIBUTIONS: tuple[str, ...] = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "log_uniform",
    "q_log_uniform",
)
#: W&B distributions with no Optuna counterpart (Optuna samples bounded, unweighted spaces).
UNSUPPORTED_DISTRIBUTIONS: tuple[str, ...] = (
    "categorical_w_probabilities",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "beta",
    "q_beta",
)
_NEEDS_BOUNDS = frozenset(DISTRIBUTIONS) - {"constant", "categorical"}
_ARGS_MACRO = "${args}"
_ENV_MACRO = re.compile(r"\$\{envvar:[A-Z0-9_]*\}")


class SweepSpecError(ValueError):
    """A sweep file that W&B or ``regfit sweep`` cannot run; the message names the fix."""


@dataclass(frozen=True)
class Metric:
    """The metric a sweep optimizes: its logged name and whether bigger is better."""

    name: str
    goal: Literal["minimize", "maximize"] = "minimize"

    @property
    def direction(self) -> str:
        """Optuna's name for the goal."""
        return self.goal  # Optuna's ``direction`` uses the same two words


@dataclass(frozen=True)
class Hyperband:
    """Optuna's ``HyperbandPruner`` arguments for a W&B ``early_terminate: hyperband``.

    W&B stops a run at "bands" b_k (counted in metric reports, here validation epochs):
    ``min_iter`` gives b_k = min_iter·eta^k; ``max_iter`` with ``s`` gives
    b_k = max_iter/eta^k for k = 1…s. Optuna's successive halving uses the same
    geometric rungs between ``min_resource`` and ``max_resource``, so
    ``min_resource = min_iter`` (or ``⌊max_iter/eta^s⌋``), ``max_resource = max_iter``
    (or ``"auto"``: the length of the first finished trial), ``reduction_factor = eta``.
    The rungs match; the rule that stops a run differs slightly (W&B: below the band's
    1/eta quantile of all runs so far; Optuna: not in the top 1/eta of its bracket).
    """

    min_resource: int
    max_resource: int | Literal["auto"]
    reduction_factor: int


@dataclass(frozen=True)
class Parameter:
    """One swept parameter: its dotted CLI name, W&B distribution and the spec's fields."""

    name: str
    distribution: str
    value: Any = None
    values: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None
    q: float | None = None

    @property
    def log_scale(self) -> bool:
        """Whether the parameter is sampled on a log scale (plots use log axes for it)."""
        return "log_uniform" in self.distribution

    @property
    def bounds(self) -> tuple[float, float] | None:
        """The range of the sampled values (W&B's ``log_uniform`` bounds are natural logs)."""
        if self.min is None or self.max is None:
            return None
        if self.distribution in ("log_uniform", "q_log_uniform"):
            return math.exp(self.min), math.exp(self.max)
        return self.min, self.max


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file."""

    method: Method
    parameters: tuple[Parameter, ...]
    metric: Metric | None = None
    early_terminate: Hyperband | None = None
    command: tuple[str, ...] = ()
    name: str | None = None
    source: str = "<sweep>"

    def parameter(self, name: str) -> Parameter:
        """The parameter called ``name``."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def swept(self) -> tuple[Parameter, ...]:
        """The parameters that vary (``value:`` parameters are fixed)."""
        return tuple(p for p in self.parameters if p.distribution != "constant")


# --------------------------------------------------------------------------- parsing


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and validate a sweep YAML file (errors name the file and the fix)."""
    from regfit.configfile import read_yaml
    from regfit.errors import UsageError

    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep file {str(path)!r} not found (give the path of a YAML sweep file)")
    try:  # strictly: UTF-8, not empty, no key given twice (YAML would keep the last silently)
        config = read_yaml(path, what="sweep", example="configs/sweeps/mnist_l2_lambda_lr.yaml")
    except UsageError as exc:
        raise SweepSpecError(str(exc)) from None
    return parse_sweep(config, source=str(path))


def parse_sweep(config: Any, source: str = "<sweep>") -> SweepSpec:
    """Validate a sweep config (the parsed YAML) and return it as a :class:`SweepSpec`."""
    if not isinstance(config, Mapping):
        raise SweepSpecError(f"{source}: a sweep file is a mapping with method, metric and parameters")
    method = config.get("method")
    if method not in METHODS:
        raise SweepSpecError(
            f"{source}: unknown method {method!r}; use one of {', '.join(METHODS)} "
            "(grid: every combination of `values`; random; bayes: model-based)"
        )
    metric = _parse_metric(config.get("metric"), source)
    if metric is None and method == "bayes":
        raise SweepSpecError(
            f"{source}: method bayes needs a metric to model; add e.g. "
            "`metric: {name: val/acc, goal: maximize}`"
        )
    parameters = _parse_parameters(config.get("parameters"), source)
    if method == "grid":
        for p in parameters:
            if p.distribution not in ("constant", "categorical"):
                raise SweepSpecError(
                    f"{source}: parameter {p.name!r}: method grid needs `values: [...]` (or `value:`), "
                    f"not distribution {p.distribution!r}; list the grid points, or use method random/bayes"
                )
    early = _parse_early_terminate(config.get("early_terminate"), source)
    if early is not None and metric is None:
        raise SweepSpecError(f"{source}: early_terminate needs a metric to compare runs by; add `metric: {{name, goal}}`")
    command = _parse_command(config.get("command"), source)
    return SweepSpec(
        method=method,
        parameters=parameters,
        metric=metric,
        early_terminate=early,
        command=command,
        name=config.get("name"),
        source=source,
    )


def _parse_metric(metric: Any, source: str) -> Metric | None:
    if metric is None:
        return None
    if not isinstance(metric, Mapping) or not isinstance(metric.get("name"), str):
        raise SweepSpecError(f"{source}: metric must be a mapping with a name, e.g. `{{name: val/acc, goal: maximize}}`")
    goal = metric.get("goal", "minimize")  # W&B's default
    if goal not in ("minimize", "maximize"):
        raise SweepSpecError(f"{source}: metric goal {goal!r} must be minimize or maximize")
    return Metric(metric["name"], goal)


def _parse_parameters(parameters: Any, source: str) -> tuple[Parameter, ...]:
    if not isinstance(parameters, Mapping) or not parameters:
        raise SweepSpecError(
            f"{source}: `parameters` must map dotted CLI names to specs, e.g. "
            "`regularization.strength: {distribution: log_uniform_values, min: 1.0e-6, max: 0.1}`"
        )
    return tuple(_parse_parameter(str(name), spec, source) for name, spec in parameters.items())


def _infer_distribution(name: str, spec: Mapping[str, Any], where: str) -> str:
    """W&B's rule: ``value`` → constant, ``values`` → categorical, int bounds → int_uniform."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "parameters" in spec:
        raise SweepSpecError(
            f"{where}: nested `parameters` are not supported; name each leaf with its dotted CLI name "
            f"(e.g. `{name}.lr`)"
        )
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise SweepSpecError(f"{where}: give `value`, `values`, or `distribution` with `min`/`max`")


def _parse_parameter(name: str, spec: Any, source: str) -> Parameter:
    where = f"{source}: parameter {name!r}"
    if not isinstance(spec, Mapping):
        raise SweepSpecError(f"{where}: the spec must be a mapping, e.g. `{{values: [1, 2]}}` or `{{value: 3}}`")
    dist = _infer_distribution(name, spec, where)
    if dist in UNSUPPORTED_DISTRIBUTIONS or dist not in DISTRIBUTIONS:
        kind = "is not supported by regfit sweep" if dist in UNSUPPORTED_DISTRIBUTIONS else "is not a W&B distribution"
        raise SweepSpecError(
            f"{where}: distribution {dist!r} {kind}; supported: {', '.join(DISTRIBUTIONS)} "
            "(e.g. log_uniform_values for λ and lr)"
        )
    if dist == "constant":
        return Parameter(name, dist, value=spec.get("value"))
    if dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise SweepSpecError(f"{where}: `values` must be a non-empty list")
        return Parameter(name, dist, values=tuple(values))
    return _bounded_parameter(name, dist, spec, where)


def _bounded_parameter(name: str, dist: str, spec: Mapping[str, Any], where: str) -> Parameter:
    lo, hi = spec.get("min"), spec.get("max")
    for key, bound in (("min", lo), ("max", hi)):
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
            hint = ""
            if isinstance(bound, str):
                with contextlib.suppress(ValueError):
                    hint = f" (YAML reads {bound} as a string: write it with a dot, {float(bound):.1e})"
            raise SweepSpecError(f"{where}: distribution {dist} needs a finite number `{key}`, got {bound!r}{hint}")
    if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise SweepSpecError(f"{where}: int_uniform needs integer min/max, got {lo!r}, {hi!r}")
    if not lo < hi:
        raise SweepSpecError(f"{where}: min ({lo}) must be smaller than max ({hi})")
    if dist.endswith("log_uniform_values") and lo <= 0:
        raise SweepSpecError(
            f"{where}: {dist} takes the values themselves, so min must be > 0 (got {lo}); "
            "log_uniform takes natural-log bounds instead"
        )
    if dist.endswith("log_uniform") and 0 < lo < hi <= 1:
        raise SweepSpecError(
            f"{where}: {dist} takes natural-log bounds, so min: {lo}, max: {hi} would sample "
            f"e^{lo:g}…e^{hi:g} ≈ {math.exp(lo):.3g}…{math.exp(hi):.3g}. For values from {lo:g} to {hi:g} write "
            f"`distribution: {dist}_values`, or give log bounds: min: {math.log(lo):.2f}, max: {math.log(hi):.2f}"
        )
    q = spec.get("q")
    if dist.startswith("q_"):
        q = 1.0 if q is None else q  # W&B's default
        if not isinstance(q, (int, float)) or q <= 0:
            raise SweepSpecError(f"{where}: q must be a number > 0, got {q!r}")
    elif q is not None:
        raise SweepSpecError(f"{where}: `q` only applies to q_* distributions, not {dist}")
    return Parameter(name, dist, min=lo, max=hi, q=q)


def _parse_early_terminate(early: Any, source: str) -> Hyperband | None:
    if early is None:
        return None
    where = f"{source}: early_terminate"
    if not isinstance(early, Mapping) or early.get("type") != "hyperband":
        raise SweepSpecError(f"{where}: only `type: hyperband` exists, got {early!r}")
    eta = early.get("eta", 3)
    if not isinstance(eta, (int, float)) or eta != int(eta) or eta < 2:
        raise SweepSpecError(f"{where}: eta must be an integer ≥ 2 for Optuna's HyperbandPruner, got {eta!r}")
    eta = int(eta)
    if "min_iter" in early:
        min_iter = early["min_iter"]
        if not isinstance(min_iter, int) or min_iter < 1:
            raise SweepSpecError(f"{where}: min_iter must be an integer ≥ 1, got {min_iter!r}")
        return Hyperband(min_iter, "auto", eta)
    if "max_iter" in early and "s" in early:
        max_iter, s = early["max_iter"], early["s"]
        if not isinstance(max_iter, int) or max_iter < 1 or not isinstance(s, int) or s < 1:
            raise SweepSpecError(f"{where}: max_iter and s must be positive integers, got {max_iter!r}, {s!r}")
        smallest = max_iter // eta**s
        if smallest < 1:
            raise SweepSpecError(f"{where}: max_iter/eta^s = {max_iter}/{eta}^{s} < 1; lower s or eta, or raise max_iter")
        return Hyperband(smallest, max_iter, eta)
    raise SweepSpecError(f"{where}: give `min_iter` (first band), or `max_iter` and `s` (last band, number of bands)")


def _parse_command(command: Any, source: str) -> tuple[str, ...]:
    if command is None:
        return ()
    if not isinstance(command, Sequence) or isinstance(command, str):
        raise SweepSpecError(f"{source}: command must be a list, e.g. [${{env}}, regfit, fit, --config, FILE, ${{args}}]")
    command = tuple(str(c) for c in command)
    if _ARGS_MACRO not in command:
        raise SweepSpecError(f"{source}: command must contain ${{args}} (where the agent puts --name=value)")
    regfit_at = _regfit_index(command)
    if regfit_at is not None:
        after = command[regfit_at + 1 :]
        if command.index(_ARGS_MACRO) < regfit_at:
            raise SweepSpecError(f"{source}: ${{args}} must come after regfit in command")
        if "--config" in after and after.index("--config") > after.index(_ARGS_MACRO):
            raise SweepSpecError(
                f"{source}: put --config before ${{args}} in command: jsonargparse applies arguments in order, "
                "so a config given after ${args} overwrites the sampled values"
            )
    return command


def _regfit_index(command: Sequence[str]) -> int | None:
    """Where the ``regfit`` executable (or ``-m regfit``) sits in a sweep command."""
    for i, token in enumerate(command):
        if Path(token).name == "regfit":
            return i
    return None


# ------------------------------------------------------------------ Optuna mapping


def suggest(trial: optuna.Trial, parameter: Parameter) -> Any:
    """Sample one parameter in an Optuna trial, the way W&B would sample it.

    =========================  ======================================================
    W&B spec                   Optuna
    =========================  ======================================================
    ``value: v``               ``v`` (fixed; not suggested)
    ``values: [...]``          ``suggest_categorical(name, values)`` (also in a grid)
    ``categorical``            same as ``values``
    ``int_uniform``            ``suggest_int(name, min, max)``
    ``uniform``                ``suggest_float(name, min, max)``
    ``q_uniform``              ``suggest_float(name, min, max, step=q)``
    ``log_uniform_values``     ``suggest_float(name, min, max, log=True)``
    ``q_log_uniform_values``   ``suggest_float(..., log=True)`` rounded to a multiple of q
    ``log_uniform``            ``suggest_float(name, e^min, e^max, log=True)`` (W&B's
                               bounds are natural logs)
    ``q_log_uniform``          as ``log_uniform``, rounded to a multiple of q
    normal, log_normal, beta,  not supported: Optuna samples bounded, unweighted
    inv_log_uniform, q_* of    spaces; :func:`parse_sweep` rejects them
    those, probabilities
    =========================  ======================================================

    Optuna has no log-scale ``step``, so the q-log distributions are sampled continuously
    and rounded as W&B rounds them (``round(x/q)·q``); the model sees the raw value.
    """
    name, dist = parameter.name, parameter.distribution
    if dist == "constant":
        return parameter.value
    if dist == "categorical":
        return trial.suggest_categorical(name, list(parameter.values))
    lo, hi = parameter.bounds
    if dist == "int_uniform":
        return trial.suggest_int(name, lo, hi)
    if dist == "uniform":
        return trial.suggest_float(name, lo, hi)
    if dist == "q_uniform":
        return trial.suggest_float(name, lo, hi, step=parameter.q)
    x = trial.suggest_float(name, lo, hi, log=True)
    return round(x / parameter.q) * parameter.q if dist.startswith("q_") else x


def grid_search_space(spec: SweepSpec) -> dict[str, list[Any]]:
    """The ``GridSampler`` search space: each swept parameter's ``values``."""
    return {p.name: list(p.values) for p in spec.swept}


def make_sampler(spec: SweepSpec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """grid → ``GridSampler``, random → ``RandomSampler``, bayes → ``TPESampler``."""
    import optuna

    if spec.method == "grid":
        return optuna.samplers.GridSampler(grid_search_space(spec), seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """``early_terminate: hyperband`` → ``HyperbandPruner`` (see :class:`Hyperband`), else none."""
    import optuna

    hb = spec.early_terminate
    if hb is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.HyperbandPruner(
        min_resource=hb.min_resource, max_resource=hb.max_resource, reduction_factor=hb.reduction_factor
    )


# ------------------------------------------------------------------ command line


def trial_argv(spec: SweepSpec, values: Mapping[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The ``regfit`` arguments a W&B agent would run for ``values``, then ``extra``.

    The agent expands ``${envvar:NAME}`` with :func:`create_sweep_command` and turns the
    sampled values into ``--name=value`` with :func:`create_sweep_command_args`; this uses
    those same functions, so ``regfit sweep`` and ``wandb agent`` start identical fits.
    ``extra`` (e.g. ``--trainer.max_epochs=1``) follows the sampled values.
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = list(spec.command)
    at = _regfit_index(command)
    if at is None or command[at + 1 : at + 2] != ["fit"]:
        raise SweepSpecError(
            f"{spec.source}: regfit sweep runs the file's command locally, so it must be "
            "`[${env}, regfit, fit, --config, CONFIG.yaml, ${args}]`; got "
            f"{command or 'no command (W&B default: python program args)'}"
        )
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    argv: list[str] = []
    for token in create_sweep_command(command[at + 1 :]):
        if token == _ARGS_MACRO:
            argv += flags
        elif token.startswith("${") and not _ENV_MACRO.fullmatch(token):
            raise SweepSpecError(f"{spec.source}: regfit sweep only fills ${{args}} after regfit, not {token}")
        else:
            argv.append(token)
    return argv + list(extra)
