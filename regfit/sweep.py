"""``regfit sweep``: run a W&B sweep file on this machine, offline, with Optuna.

::

    regfit sweep configs/sweeps/mnist_l2_lambda_lr.yaml --count 20
    regfit sweep FILE --count 3 --storage sqlite:///sweep.db --study-name l2 -- --trainer.max_epochs=2

Each trial is an ordinary ``regfit fit``, in this process, with the arguments a
``wandb agent`` would use: the file's ``command`` after ``regfit``, ``${args}`` replaced by
``--name=value`` for the sampled values (built by wandb's own functions), then whatever
follows ``--``. W&B runs are offline (unless ``WANDB_MODE`` says otherwise), grouped by
study name, one per trial; a CSV logger logs as usual.

Sampling and early stopping map to Optuna (:mod:`regfit.sweep_spec`): grid → every point
queued once as a trial (in GridSampler's order), random → RandomSampler, bayes →
TPESampler, ``early_terminate: hyperband`` → HyperbandPruner fed with the metric after
every validation. A trial's value is the last value of the metric, as in a W&B run's
summary.

With ``--storage`` (``sqlite:///sweep.db`` or any SQLAlchemy database URL) several
processes, on one machine or many, work on one study; ``--count`` is the number of
trials *this* process runs, as with ``wandb agent --count``. A grid's points are claimed
one at a time, so no point runs twice; a trial whose worker was killed is run again by the
next worker (heartbeats, :mod:`regfit.sweep_storage`). At the end: a table of all the
study's trials, ``trials.csv`` and ``trials.png`` (the metric against each swept
parameter) in ``--out``.

A trial that fails while it trains (a term that diverged, a crash) is recorded as FAIL
with its error and the sweep goes on; a trial whose arguments ``regfit fit`` refuses stops
the sweep (every trial would fail the same way). SIGTERM or Ctrl+C stops the sweep with
exit 143 / 130 after writing the results so far; on a database storage the interrupted
trial is queued again for the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from regfit.interrupts import Interrupted, stop_on_sigterm
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
from regfit.sweep_storage import (
    DEFAULT_HEARTBEAT_S,
    Heartbeat,
    StorageError,
    claim_waiting,
    fail_stale,
    grid_points,
    new_trial,
    open_study,
    prepare_grid,
    requeue,
    uses_heartbeat,
)

if TYPE_CHECKING:
    import optuna

__all__ = ["SweepError", "TrialFailed", "TrialReporter", "main", "results", "run_sweep", "write_csv", "write_plot"]

log = logging.getLogger(__name__)

#: ``fit(argv, callbacks)`` runs one ``regfit`` command (``argv[0]`` is ``fit``).
FitFn = Callable[[Sequence[str], Sequence[Callback]], pl.Trainer]


class SweepError(RuntimeError):
    """A sweep that cannot go on (a trial without the metric, a bad override). ``study`` is
    the study so far when trials ran before it stopped, so their results are still written."""

    study: optuna.Study | None = None


class TrialFailed(RuntimeError):
    """A trial that failed while it trained (a term diverged, a crash): recorded as FAIL with
    this message, and the sweep goes on."""


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
                from regfit.guard import NonFinitePenaltyError

                trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
                if is_user_error(exc) and not isinstance(exc, NonFinitePenaltyError):
                    raise SweepError(f"trial {trial.number} ({_shown(values)}): {format_error(exc, argv)}") from exc
                # Diverged or crashed while training: this trial's result, not the sweep's end.
                raise TrialFailed(f"{type(exc).__name__}: {_one_line(str(exc))}") from exc
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        if trainer.log_dir:
            trial.set_user_attr("log_dir", str(trainer.log_dir))
        _log_trial(trial.number, values, self.metric.name, reporter)
        return self._value(trial.number, reporter, trainer)

    def _value(self, number: int, reporter: TrialReporter, trainer: pl.Trainer | None = None) -> float:
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
                f"trial {number}: no validation ran, so there is no {self.metric.name}: {_no_validation_cause(trainer)}"
            )
        return reporter.history[-1]


def _no_validation_cause(trainer: pl.Trainer | None) -> str:
    """Why a fit ended without validating, from the trainer's settings, with the fix."""
    generic = ("check trainer.limit_val_batches / check_val_every_n_epoch / val_check_interval and "
               "trainer.max_steps (validation runs at the end of an epoch)")
    if trainer is None:
        return generic
    if trainer.limit_val_batches == 0:
        return "trainer.limit_val_batches=0 turns validation off; remove it (or set it to a positive number)"
    batches = trainer.num_training_batches
    per_epoch = f" (an epoch has {batches} batches)" if isinstance(batches, int) else ""
    every = trainer.check_val_every_n_epoch or 1
    first_validation = batches * every if isinstance(batches, int) else None
    if (trainer.max_steps not in (-1, None) and trainer.global_step >= trainer.max_steps
            and (first_validation is None or trainer.max_steps < first_validation)):
        return (f"trainer.max_steps={trainer.max_steps} ended the fit before the end of the first epoch{per_epoch}, "
                "where validation runs: raise max_steps, or validate within the epoch with "
                f"--trainer.val_check_interval=N (N ≤ {trainer.max_steps})")
    if trainer.max_epochs not in (-1, None) and every > trainer.max_epochs:
        return (f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={trainer.max_epochs}: "
                "lower it, or train longer")
    return generic


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _log_failed(number: int, values: Mapping[str, Any], error: str) -> None:
    log.warning("trial %d: %s → failed: %s", number, _shown(values), error)


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


def run_sweep(
    spec: SweepSpec,
    count: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    extra: Sequence[str] = (),
    seed: int | None = None,
    fit: FitFn = fit_in_process,
    heartbeat: int = DEFAULT_HEARTBEAT_S,
) -> optuna.Study:
    """Run ``count`` trials of ``spec`` (a grid: at most its remaining points) and return the study.

    A trial that fails while training is recorded as FAIL and the sweep goes on. A
    :class:`SweepError` (a trial ``regfit fit`` refuses, a metric never logged) or an
    :class:`~regfit.interrupts.Interrupted` stops it; either carries the study so far as
    ``.study``. ``heartbeat`` is the seconds between a running trial's heartbeats on a
    database storage (a trial is stale, and run again, after three missed ones).
    """
    if spec.metric is None:
        raise SweepError(
            f"{spec.source}: regfit sweep ranks trials by a metric; add e.g. `metric: {{name: val/acc, goal: maximize}}`"
        )
    _check_extra(spec, extra)
    trial_argv(spec, {p.name: None for p in spec.parameters})  # the command is runnable, before any study
    name = study_name or spec.name or Path(spec.source).stem
    if storage is not None and "://" not in storage:
        raise SweepError(f"--storage {storage!r} is not a database URL; for a file write --storage sqlite:///{storage}")
    if spec.method == "grid":
        # The grid is a queue of WAITING trials with fixed parameters; the sampler never samples.
        import optuna

        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif count is None:
        raise SweepError(f"method {spec.method} never ends by itself: give the number of trials with --count N")
    else:
        sampler = make_sampler(spec, seed)
    study, created = open_study(name, storage, spec.metric.direction, sampler, make_pruner(spec), heartbeat)
    if spec.method == "grid":
        prepare_grid(study, grid_points(grid_search_space(spec), seed), created)
    objective = Objective(spec, spec.metric, name, tuple(extra), fit)
    try:
        _run_trials(study, objective, count, grid=spec.method == "grid")
    except (SweepError, Interrupted) as exc:
        exc.study = study  # the trials that finished are still results
        raise
    return study


def _run_trials(study: optuna.Study, objective: Objective, count: int | None, grid: bool) -> None:
    """Claim and run trials until ``count`` ran here or, for a grid, no point is left."""
    ran = 0
    while count is None or ran < count:
        trial = _next_trial(study, grid)
        if trial is None:
            return
        ran += 1
        _run_trial(study, trial, objective)


def _next_trial(study: optuna.Study, grid: bool) -> optuna.Trial | None:
    """The next trial to run here. A grid takes only queued points; when none is left but other
    trials still run, it waits one grace period (3 heartbeats) for a worker that died to be
    noticed, so that its trial is run again here."""
    waited_since = None
    while True:
        fail_stale(study)
        trial = claim_waiting(study) if grid else new_trial(study)
        if trial is not None or not grid or not uses_heartbeat(study):
            return trial
        from optuna.trial import TrialState

        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return None
        interval = study._storage.get_heartbeat_interval()
        if waited_since is None:
            waited_since = time.monotonic()
            log.info("no grid point left to claim; %d still running elsewhere: waiting up to %d s in case a worker "
                     "died (its point would be run here)", len(running), 4 * interval)
        elif time.monotonic() - waited_since > 4 * interval:
            return None
        time.sleep(interval)


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> None:
    """Run one trial and record its outcome; a failure is recorded and the sweep goes on."""
    import optuna
    from optuna.trial import TrialState

    with Heartbeat(study, trial):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            _tell(study, trial, state=TrialState.PRUNED)
        except TrialFailed as exc:
            _fail(study, trial, str(exc))
        except SweepError as exc:
            _fail(study, trial, str(exc))
            raise
        except (Interrupted, KeyboardInterrupt) as exc:
            stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            _fail(study, trial, f"stopped by {stop.signal_name}")
            requeue(study, trial)
            raise stop from None
        except Exception as exc:  # noqa: BLE001 - a crash outside the fit (e.g. in a callback of ours)
            _fail(study, trial, f"{type(exc).__name__}: {_one_line(str(exc))}")
        else:
            _tell(study, trial, values=value)


def _fail(study: optuna.Study, trial: optuna.Trial, error: str) -> None:
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):
        trial.set_user_attr("error", error)
    if not error.startswith("stopped by"):
        _log_failed(trial.number, trial.user_attrs.get("values", trial.params), error)
    _tell(study, trial, state=TrialState.FAIL)


def _tell(study: optuna.Study, trial: optuna.Trial, **kwargs: Any) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        study.tell(trial, **kwargs)
    except (UpdateFinishedTrialError, ValueError) as exc:
        if isinstance(exc, ValueError) and "Cannot tell" not in str(exc):
            raise
        # Another worker marked it FAIL: its heartbeat was late by more than the grace period.
        log.warning("trial %d was marked failed by another worker (heartbeat too late) and is queued again; "
                    "raise --heartbeat on a slow database", trial.number)


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
    """One row per trial of the study: number, the parameters used, metric, state, and the
    error of a failed trial (a trial queued again says which trial re-runs it)."""
    metric = spec.metric.name if spec.metric else "value"
    trials = study.trials
    # Optuna's retry of trial N is a new trial whose retry_history ends with N.
    rerun_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    rows = []
    for t in trials:
        values = t.user_attrs.get("values") or t.system_attrs.get("fixed_params") or t.params
        value = t.value
        if value is None and t.intermediate_values:  # a pruned trial: its last report
            value = t.intermediate_values[max(t.intermediate_values)]
        error = t.user_attrs.get("error")
        if t.state.name == "FAIL" and error is None:
            error = "its worker stopped (no heartbeat)"
        if t.state.name == "FAIL" and t.number in rerun_as:
            error = f"{error}; run again as trial {rerun_as[t.number]}"
        row = {"trial": t.number}
        row.update({p.name: values.get(p.name) for p in spec.swept})
        row.update({metric: value, "state": t.state.name, "seconds": t.user_attrs.get("seconds"), "error": error})
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write the result rows as CSV (whole or not at all: several workers may write one file)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    writer.writerows(rows)
    return _write_atomic(path, buffer.getvalue().encode())


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
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
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    plt.close(fig)
    return _write_atomic(path, image.getvalue())


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
    failed = any(r.get("error") for r in rows)
    columns = [c for c in (rows[0] if rows else {"trial": 0}) if c != "seconds" and (c != "error" or failed)]
    for c in columns:
        table.add_column(c, justify="left" if c in ("state", "error") else "right",
                         overflow="fold" if c == "error" else "ellipsis")
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
        usage="regfit sweep FILE [--count N] [--storage URL] [--study-name NAME] [--seed N] [--out DIR] "
        "[--heartbeat S] [-- FIT ARGS…]",
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
    p.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_S, metavar="SECONDS",
                   help="with --storage: seconds between a running trial's heartbeats; a trial whose worker died is "
                   f"run again after 3 missed ones (default {DEFAULT_HEARTBEAT_S})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``regfit sweep FILE [--count N] [--storage URL] [--study-name NAME] [-- FIT ARGS]``.

    Exit codes: 0 when the sweep ran (failed trials are in the table), 2 when it could not
    run or a trial was refused, 143 / 130 when SIGTERM / Ctrl+C stopped it (the results so
    far are written).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    if args.count is not None and args.count < 1:
        _parser().error(f"--count must be ≥ 1, got {args.count}")
    if args.heartbeat < 1:
        _parser().error(f"--heartbeat must be ≥ 1 second, got {args.heartbeat}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    _quiet_optuna()
    with stop_on_sigterm():
        return _main(args, extra)


def _main(args: argparse.Namespace, extra: list[str]) -> int:
    from regfit.wandb_setup import import_wandb

    spec = None
    try:
        spec = load_sweep(args.file)
        out = _out_folder(args.out, _study_name(spec, args.study_name))
        import_wandb()
        study = run_sweep(spec, args.count, args.storage, args.study_name, extra, args.seed, heartbeat=args.heartbeat)
    except (SweepSpecError, SweepError, StorageError) as exc:
        stopped = getattr(exc, "study", None)
        if stopped is not None and any(t.state.name in ("COMPLETE", "PRUNED") for t in stopped.trials):
            _write_results(stopped, spec, args.out)
        sys.stderr.write(f"regfit sweep: error: {exc}\n")
        return 2
    except Interrupted as exc:
        stopped = getattr(exc, "study", None)
        where = _write_results(stopped, spec, args.out) if stopped is not None and spec is not None else None
        kept = f"the results so far are in {where}; " if where else ""
        again = "run the same command again to finish (the interrupted trial is queued)" if args.storage else (
            "with --storage the next run would continue where this one stopped")
        sys.stderr.write(f"regfit sweep: {exc}; {kept}{again}.\n")
        return exc.exit_code
    _write_results(study, spec, out)
    failed = [t.number for t in study.trials if t.state.name == "FAIL" and "error" in t.user_attrs]
    if failed:
        log.warning("%d of %d trials failed (their error is in the table and trials.csv): %s", len(failed),
                    len(study.trials), ", ".join(map(str, failed[:10])))
    return 0


def _study_name(spec: SweepSpec, study_name: str | None) -> str:
    return study_name or spec.name or Path(spec.source).stem


def _out_folder(out: str | None, name: str) -> Path:
    """The results folder, checked writable before any trial runs (a read-only one used to fail
    after the last trial and lose the table)."""
    from regfit.checkpointing import check_writable

    folder = Path(out or Path("logs", "sweeps", name))
    try:
        return check_writable(folder, "the results folder", "give another one with --out DIR")
    except RuntimeError as exc:
        raise SweepError(str(exc)) from None


def _write_results(study: optuna.Study, spec: SweepSpec, out: str | Path | None) -> Path:
    """Print the table and write trials.csv and trials.png; returns their folder. If the folder
    cannot be written now (the disk filled up during the sweep), they go to a new temporary
    folder rather than being lost."""
    rows = results(study, spec)
    print_table(rows, study, spec)
    folder = Path(out or Path("logs", "sweeps", study.study_name))
    try:
        csv_path = write_csv(rows, folder / "trials.csv")
        png_path = write_plot(rows, spec, folder / "trials.png")
    except OSError as exc:
        folder = Path(tempfile.mkdtemp(prefix="regfit-sweep-"))
        log.warning("could not write the results to %s (%s); writing them to %s instead", out, exc, folder)
        csv_path = write_csv(rows, folder / "trials.csv")
        png_path = write_plot(rows, spec, folder / "trials.png")
    log.info("results: %s, %s", csv_path, png_path)
    return folder


def _quiet_optuna() -> None:
    """Optuna logs each trial, and a failed one with its traceback; the sweep logs its own
    shorter line per trial and reports a failed trial's error itself."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
