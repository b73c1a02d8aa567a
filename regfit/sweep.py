"""``regfit sweep``: run a W&B sweep file on this machine, offline, with Optuna.

::

    regfit sweep configs/sweeps/mnist_l2_lambda_lr.yaml --count 20
    regfit sweep FILE --count 3 --storage sqlite:///sweep.db --study-name l2 -- --trainer.max_epochs=2

Each trial is an ordinary ``regfit fit``, in this process, with the arguments a
``wandb agent`` would use: the file's ``command`` after ``regfit``, ``${args}`` replaced by
``--name=value`` for the sampled values (built by wandb's own functions), then whatever
follows ``--``. W&B runs are offline (unless ``WANDB_MODE`` says otherwise), grouped by
study name, one per trial; a CSV logger logs as usual.

Sampling and early stopping map to Optuna (:mod:`regfit.sweep_spec`): grid → GridSampler,
random → RandomSampler, bayes → TPESampler, ``early_terminate: hyperband`` →
HyperbandPruner fed with the metric after every validation. A trial's value is the last
value of the metric, as in a W&B run's summary.

With ``--storage`` (``sqlite:///sweep.db`` or any SQLAlchemy database URL) several
processes, on one machine or many, work on one study; ``--count`` is the number of
trials *this* process runs, as with ``wandb agent --count``. At the end: a table of all
the study's trials, ``trials.csv`` and ``trials.png`` (the metric against each swept
parameter) in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from regfit.sweep_spec import (
    Metric,
    Parameter,
    SweepSpec,
    SweepSpecError,
    grid_search_space,
    load_sweep,
    make_pruner,
    make_sampler,
    suggest,
    trial_argv,
)

if TYPE_CHECKING:
    import optuna

__all__ = ["SweepError", "TrialReporter", "main", "results", "run_sweep", "write_csv", "write_plot"]

log = logging.getLogger(__name__)

#: ``fit(argv, callbacks)`` runs one ``regfit`` command (``argv[0]`` is ``fit``).
FitFn = Callable[[Sequence[str], Sequence[Callback]], pl.Trainer]


class SweepError(RuntimeError):
    """A sweep that cannot go on (a trial without the metric, a bad override). ``study`` is
    the study so far when trials ran before it stopped, so their results are still written."""

    study: optuna.Study | None = None


# ------------------------------------------------------------------ one trial


class TrialReporter(Callback):
    """Report the sweep metric to an Optuna trial after every validation; stop a pruned fit.

    The step is the number of validations so far, W&B hyperband's "iteration" (one per
    logged value of the metric). A pruned fit is stopped with ``trainer.should_stop``
    rather than an exception, so Lightning ends it normally (loggers closed, config
    saved); the caller then raises ``optuna.TrialPruned``.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.history: list[float] = []
        self.pruned = False
        self.available: list[str] | None = None  # set when the metric was not logged

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            self.available = sorted(trainer.callback_metrics)
            trainer.should_stop = True
            return
        self.history.append(float(value))
        self.trial.report(self.history[-1], step=len(self.history))
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


def fit_in_process(argv: Sequence[str], callbacks: Sequence[Callback]) -> pl.Trainer:
    """``regfit ARGV`` (``fit …``) in this process, with ``callbacks`` added to the trainer.
    The command closes its W&B run when it ends, so each trial gets its own."""
    from regfit.lightning_cli import run_cli

    return run_cli(argv, extra_callbacks=callbacks).trainer


@contextlib.contextmanager
def _environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for ``None``, unset) environment variables for the duration of a block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: Mapping[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _trial_environ(study_name: str, number: int) -> dict[str, str | None]:
    """W&B settings of a local trial: offline, its own run, grouped under the study."""
    return {
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "WANDB_RUN_GROUP": study_name,
        "WANDB_NAME": f"{study_name}-{number}",
        "WANDB_JOB_TYPE": "sweep",
        # one line per trial (see _log_trial) instead of wandb's summary of every run
        "WANDB_SILENT": os.environ.get("WANDB_SILENT", "true"),
        # a run id or sweep left in the shell would make every trial resume one run
        "WANDB_RUN_ID": None,
        "WANDB_SWEEP_ID": None,
        "WANDB_SWEEP_PARAM_PATH": None,
    }


@dataclass
class Objective:
    """Optuna objective: sample, build the agent's argv, fit, return the last metric value."""

    spec: SweepSpec
    metric: Metric
    study_name: str
    extra: Sequence[str] = ()
    fit: FitFn = fit_in_process

    def __call__(self, trial: optuna.Trial) -> float:
        values = {p.name: suggest(trial, p) for p in self.spec.parameters}
        argv = trial_argv(self.spec, values, self.extra)
        trial.set_user_attr("values", values)
        trial.set_user_attr("argv", argv)
        reporter = TrialReporter(trial, self.metric.name)
        start = time.perf_counter()
        with _environ(_trial_environ(self.study_name, trial.number)):
            try:
                trainer = self.fit(argv, [reporter])
            except Exception as exc:
                from regfit.errors import format_error, is_user_error

                if not is_user_error(exc):
                    raise
                raise SweepError(f"trial {trial.number} ({_shown(values)}): {format_error(exc, argv)}") from exc
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        if trainer.log_dir:
            trial.set_user_attr("log_dir", str(trainer.log_dir))
        _log_trial(trial.number, values, self.metric.name, reporter)
        return self._value(trial.number, reporter)

    def _value(self, number: int, reporter: TrialReporter) -> float:
        """The trial's value, or why it has none."""
        import optuna

        if reporter.available is not None:
            raise SweepError(
                f"trial {number}: the sweep metric {self.metric.name!r} was never logged; logged metrics: "
                f"{', '.join(reporter.available) or 'none'}. Fix `metric.name` in {self.spec.source}."
            )
        if reporter.pruned:
            raise optuna.TrialPruned(f"pruned after {len(reporter.history)} validations")
        if not reporter.history:
            raise SweepError(
                f"trial {number}: no validation ran, so there is no {self.metric.name}; "
                "check trainer.limit_val_batches / check_val_every_n_epoch"
            )
        return reporter.history[-1]


def _log_trial(number: int, values: Mapping[str, Any], metric: str, reporter: TrialReporter) -> None:
    result = _fmt(reporter.history[-1]) if reporter.history else "-"
    log.info("trial %d: %s → %s=%s%s", number, _shown(values), metric, result, " (pruned)" if reporter.pruned else "")


def _shown(values: Mapping[str, Any]) -> str:
    """A trial's parameters as ``key=value`` pairs."""
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------ the study


def _remaining_grid(spec: SweepSpec, study: optuna.Study) -> int:
    """Grid points no trial of the study has taken yet (GridSampler's own bookkeeping)."""
    space = grid_search_space(spec)
    total = math.prod(len(v) for v in space.values())
    taken = {tuple(t.params.get(k) for k in space) for t in study.trials if t.params}
    return total - len(taken)


def run_sweep(
    spec: SweepSpec,
    count: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    extra: Sequence[str] = (),
    seed: int | None = None,
    fit: FitFn = fit_in_process,
) -> optuna.Study:
    """Run ``count`` trials of ``spec`` (a grid: at most its remaining points) and return the study."""
    import optuna

    if spec.metric is None:
        raise SweepError(
            f"{spec.source}: regfit sweep ranks trials by a metric; add e.g. `metric: {{name: val/acc, goal: maximize}}`"
        )
    _check_extra(spec, extra)
    trial_argv(spec, {p.name: None for p in spec.parameters})  # the command is runnable, before any study
    name = study_name or spec.name or Path(spec.source).stem
    if storage is not None and "://" not in storage:
        raise SweepError(f"--storage {storage!r} is not a database URL; for a file write --storage sqlite:///{storage}")
    if storage and storage.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(storage[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=make_sampler(spec, seed),
            pruner=make_pruner(spec),
            direction=spec.metric.direction,
            load_if_exists=True,
        )
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's URL and driver errors have no common base we import
        if storage is None:
            raise
        raise SweepError(f"--storage {storage!r}: {exc} (e.g. --storage sqlite:///sweep.db)") from exc
    if spec.method == "grid":
        remaining = _remaining_grid(spec, study)
        count = remaining if count is None else min(count, remaining)
    elif count is None:
        raise SweepError(f"method {spec.method} never ends by itself: give the number of trials with --count N")
    if count > 0:
        objective = Objective(spec, spec.metric, name, tuple(extra), fit)
        try:
            study.optimize(objective, n_trials=count)
        except SweepError as exc:
            exc.study = study  # the trials that finished are still results
            raise
    return study


def _check_extra(spec: SweepSpec, extra: Sequence[str]) -> None:
    if extra and not extra[0].startswith("--"):
        raise SweepError(f"extra argument {extra[0]!r} after `--` must be a regfit fit option like --trainer.max_epochs=1")
    swept = {p.name for p in spec.parameters}
    for arg in extra:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        if key in swept:
            raise SweepError(f"extra argument {arg!r} sets the swept parameter {key!r}; remove it or the parameter")


# ------------------------------------------------------------------ results


def results(study: optuna.Study, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial of the study: number, the parameters used, metric, state."""
    metric = spec.metric.name if spec.metric else "value"
    rows = []
    for t in study.trials:
        values = t.user_attrs.get("values", t.params)
        value = t.value
        if value is None and t.intermediate_values:  # a pruned trial: its last report
            value = t.intermediate_values[max(t.intermediate_values)]
        row = {"trial": t.number}
        row.update({p.name: values.get(p.name) for p in spec.swept})
        row.update({metric: value, "state": t.state.name, "seconds": t.user_attrs.get("seconds")})
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write the result rows as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_plot(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, path: Path) -> Path:
    """The metric against each numeric swept parameter (log axes for log-sampled ones).

    A categorical parameter (e.g. the penalty) colours the points; pruned trials are
    drawn hollow at their last reported value. With two numeric parameters a last panel
    shows both, coloured by the metric.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec.metric.name if spec.metric else "value"
    numeric = [p for p in spec.swept if p.distribution != "categorical" or _all_numbers(p.values)]
    groups_by = next((p.name for p in spec.swept if p not in numeric), None)
    done = [r for r in rows if r[metric] is not None and r["state"] in ("COMPLETE", "PRUNED")]
    panels = len(numeric) + (1 if len(numeric) == 2 else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.5 * max(panels, 1), 3.8), squeeze=False)
    for ax, p in zip(axes[0], numeric):
        for label, subset in _groups(done, groups_by):
            for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
                pts = [(r[p.name], r[metric]) for r in subset if r["state"] == state]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, label=f"{label} ({state.lower()})" if label else state.lower())
        _axis(ax, "x", p)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    if panels == 3:
        ax, (px, py) = axes[0][2], numeric
        pts = [r for r in done if r["state"] == "COMPLETE"]
        sc = ax.scatter([r[px.name] for r in pts], [r[py.name] for r in pts], c=[r[metric] for r in pts], cmap="viridis")
        fig.colorbar(sc, ax=ax, label=metric)
        _axis(ax, "x", px)
        _axis(ax, "y", py)
    if done and numeric:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{Path(spec.source).name}: {metric} ({spec.method}, {len(done)} trials)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _all_numbers(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _groups(rows: Sequence[Mapping[str, Any]], key: str | None) -> list[tuple[str, list[Mapping[str, Any]]]]:
    if key is None:
        return [("", list(rows))]
    labels = dict.fromkeys(str(r[key]) for r in rows)
    return [(f"{key}={lab}", [r for r in rows if str(r[key]) == lab]) for lab in labels]


def _axis(ax: Any, which: str, p: Parameter) -> None:
    """Label an axis for ``p``: the whole search range, log-scaled where it is sampled so."""
    from matplotlib.ticker import NullFormatter

    getattr(ax, f"set_{which}label")(p.name)
    log_scale = p.log_scale or (p.distribution == "categorical" and _spans_decades(p.values))
    if log_scale:
        getattr(ax, f"set_{which}scale")("log")
        getattr(ax, f"{which}axis").set_minor_formatter(NullFormatter())  # minor labels of a short decade overlap
    if p.bounds is not None:
        lo, hi = p.bounds
        pad = (lo / 1.5, hi * 1.5) if log_scale else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        getattr(ax, f"set_{which}lim")(*pad)


def _spans_decades(values: Sequence[Any]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and max(positive) / min(positive) >= 100


def print_table(rows: Sequence[Mapping[str, Any]], study: optuna.Study, spec: SweepSpec) -> None:
    """The results as a rich table, best trial marked."""
    from rich.console import Console
    from rich.table import Table

    best = _best_number(study)
    table = Table(title=f"{study.study_name}: {len(rows)} trials ({spec.method})")
    columns = [c for c in (rows[0] if rows else {"trial": 0}) if c != "seconds"]
    for c in columns:
        table.add_column(c, justify="left" if c == "state" else "right")
    for r in rows:
        style = "bold green" if r["trial"] == best else None
        table.add_row(*(_fmt(r[c]) if r[c] is not None else "-" for c in columns), style=style)
    Console().print(table)


def _best_number(study: optuna.Study) -> int | None:
    try:
        return study.best_trial.number
    except ValueError:  # no finished trial
        return None


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="regfit sweep",
        usage="regfit sweep FILE [--count N] [--storage URL] [--study-name NAME] [--seed N] [--out DIR] [-- FIT ARGS…]",
        epilog="example: regfit sweep configs/sweeps/mnist_l2_lambda_lr.yaml --count 3 -- --trainer.max_epochs=1",
        description="Run a W&B sweep file locally and offline with Optuna. "
        "Arguments after `--` are added to every trial's `regfit fit`.",
    )
    p.add_argument("file", help="a W&B sweep YAML file (method, metric, parameters, command)")
    p.add_argument("--count", type=int, help="trials this process runs (grid: default all remaining points)")
    p.add_argument("--storage", help="Optuna storage URL shared by several processes, e.g. sqlite:///sweep.db")
    p.add_argument("--study-name", help="study name (default: the file's `name`, else its stem)")
    p.add_argument("--seed", type=int, help="sampler seed, for a reproducible sequence of trials")
    p.add_argument("--out", help="folder for trials.csv and trials.png (default: logs/sweeps/<study name>)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``regfit sweep FILE [--count N] [--storage URL] [--study-name NAME] [-- FIT ARGS]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    if args.count is not None and args.count < 1:
        _parser().error(f"--count must be ≥ 1, got {args.count}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_optuna()
    try:
        spec = load_sweep(args.file)
        study = run_sweep(spec, args.count, args.storage, args.study_name, extra, args.seed)
    except (SweepSpecError, SweepError) as exc:
        stopped = getattr(exc, "study", None)
        if stopped is not None and any(t.state.name in ("COMPLETE", "PRUNED") for t in stopped.trials):
            _write_results(stopped, spec, args.out)
        sys.stderr.write(f"regfit sweep: error: {exc}\n")
        return 2
    _write_results(study, spec, args.out)
    return 0


def _write_results(study: optuna.Study, spec: SweepSpec, out: str | None) -> None:
    rows = results(study, spec)
    print_table(rows, study, spec)
    folder = Path(out or Path("logs", "sweeps", study.study_name))
    csv_path = write_csv(rows, folder / "trials.csv")
    png_path = write_plot(rows, spec, folder / "trials.png")
    log.info("results: %s, %s", csv_path, png_path)


def _quiet_optuna() -> None:
    """Optuna logs each trial, and a failed one with its traceback; the sweep logs its own
    shorter line per trial and reports a failed trial's error itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
