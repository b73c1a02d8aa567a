"""A sweep's Optuna study shared by several workers: opened safely, its grid points claimed
one by one, and the trials of a worker that died run again.

* :func:`open_study` creates the study or joins it. Workers that start together on a fresh
  database race to create its tables and the study; the loser retries (a short random
  back-off) instead of dying. Only a URL that cannot work (no driver, unknown dialect,
  unparsable) stops at once, naming the driver to install.
* A grid is a queue: the worker that creates the study enqueues every point as a WAITING
  trial (:func:`prepare_grid`), and a worker claims a point by moving its trial from WAITING
  to RUNNING, a compare-and-set in the database (:func:`claim_waiting`). Two workers never
  run one point, and no point is left out. (Optuna's ``GridSampler`` hands out the points by
  trial number and, near the end, gives a second worker a point the first is still running.)
* Trials on a database storage send a heartbeat (:class:`Heartbeat`); a trial whose worker was
  killed stops beating, is marked FAIL after the grace period by the next worker that looks
  (``optuna.storages.fail_stale_trials``), and Optuna's ``RetryFailedTrialCallback`` queues it
  again with the same parameters, so a rerun or another worker runs it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import threading
import time
import warnings
from datetime import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "GRID_ATTR",
    "Heartbeat",
    "StorageError",
    "claim_waiting",
    "fail_stale",
    "grid_points",
    "new_trial",
    "open_study",
    "prepare_grid",
    "requeue",
    "uses_heartbeat",
]

log = logging.getLogger("regfit.sweep")

#: Seconds between a running trial's heartbeats; a trial is stale after 3 missed ones.
DEFAULT_HEARTBEAT_S = 10
#: How often a trial whose worker died is queued again (then it stays FAIL).
MAX_RETRY = 3
#: The study attribute that says a grid was enqueued (and which grid).
GRID_ATTR = "regfit_grid"
_OPEN_ATTEMPTS = 8
_GRID_WAIT_S = 15.0

# The driver a SQLAlchemy URL needs, by the module that is missing.
_DRIVERS = {
    "psycopg2": "pip install psycopg2-binary (the driver of postgresql+psycopg2:// URLs, and of postgresql:// "
                "before SQLAlchemy 2.1)",
    "psycopg": "pip install 'psycopg[binary]' (the driver of postgresql+psycopg:// URLs, and of postgresql:// "
               "since SQLAlchemy 2.1)",
    "pymysql": "pip install pymysql (the driver of mysql+pymysql:// URLs)",
    "MySQLdb": "pip install mysqlclient (the driver of mysql:// URLs), or use mysql+pymysql:// with pip install pymysql",
}


class StorageError(RuntimeError):
    """A ``--storage`` URL or database the sweep cannot use; the message names the fix."""


# ------------------------------------------------------------------ opening the study


def open_study(name: str, storage: str | None, direction: str, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner, heartbeat: int = DEFAULT_HEARTBEAT_S) -> tuple[optuna.Study, bool]:
    """The study ``name`` in ``storage`` (a SQLAlchemy URL, or ``None`` for memory), created if
    it does not exist yet. Returns ``(study, created_here)``."""
    import optuna

    if storage is None:
        return optuna.create_study(study_name=name, sampler=sampler, pruner=pruner, direction=direction), True
    if storage.startswith("sqlite:///"):  # SQLite creates the file, not its folder
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    last: BaseException | None = None
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            rdb = _rdb_storage(storage, heartbeat)
            try:
                study = optuna.create_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner,
                                            direction=direction)
                return study, True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner)
                _check_direction(study, name, direction)
                return study, False
        except StorageError:
            raise
        except ImportError as exc:
            raise StorageError(_missing_driver(storage, exc)) from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy/Optuna errors have no common base we import
            fatal = _fatal_url_problem(storage, exc)
            if fatal:
                raise StorageError(fatal) from None
            last = exc  # a busy database, tables created by another worker this instant: try again
            time.sleep(0.1 * (attempt + 1) + random.uniform(0, 0.3))
    raise StorageError(
        f"--storage {storage}: could not open study {name!r} after {_OPEN_ATTEMPTS} attempts: {_one_line(last)}. "
        "Check that the database server runs and that the URL's host, port, user, password and database "
        "name are right (e.g. postgresql://user:password@host:5432/dbname, or sqlite:///sweep.db)."
    )


def _rdb_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    from optuna.storages import RDBStorage, RetryFailedTrialCallback

    with warnings.catch_warnings():  # heartbeats and retries are "experimental" in Optuna, stable for years
        warnings.simplefilter("ignore")
        return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                          failed_trial_callback=RetryFailedTrialCallback(max_retry=MAX_RETRY))


def _missing_driver(url: str, exc: ImportError) -> str:
    while exc.name is None and isinstance(exc.__cause__, ImportError):  # Optuna re-raises SQLAlchemy's
        exc = exc.__cause__
    module = (exc.name or "").split(".")[0]
    fix = _DRIVERS.get(module, f"install the Python package that provides {module or 'the driver'}")
    return f"--storage {url}: the database driver {module or ''} is not installed: {fix}."


def _fatal_url_problem(url: str, exc: BaseException) -> str:
    """A message for errors that no retry can fix (a bad URL, an unknown dialect), else ``""``."""
    import sqlalchemy.exc

    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ImportError):
        return _missing_driver(url, cause)
    if isinstance(cause, sqlalchemy.exc.NoSuchModuleError):
        return (f"--storage {url}: SQLAlchemy has no database dialect for this URL ({_one_line(cause)}); use "
                "e.g. sqlite:///sweep.db, postgresql://user:password@host/db or mysql+pymysql://user:password@host/db.")
    if isinstance(cause, sqlalchemy.exc.ArgumentError):
        return f"--storage {url} is not a database URL SQLAlchemy reads ({_one_line(cause)}); e.g. sqlite:///sweep.db."
    if isinstance(cause, sqlalchemy.exc.OperationalError) and "unable to open database file" in str(cause):
        return f"--storage {url}: SQLite cannot create or open that file: check that its folder exists and is writable."
    return ""


def _check_direction(study: optuna.Study, name: str, direction: str) -> None:
    have = study.direction.name.lower()
    if have != direction:
        raise StorageError(
            f"study {name!r} already exists in this storage and {have}s its metric; the sweep file says {direction}. "
            "Use another --study-name, or the goal the study was created with."
        )


def _one_line(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else "unknown error"
    return text[:300]


# ------------------------------------------------------------------ the grid as a queue


def grid_points(space: Mapping[str, Sequence[Any]], seed: int | None = None) -> list[dict[str, Any]]:
    """Every point of a grid, in the order Optuna's ``GridSampler(space, seed)`` visits them
    (the product over the sorted parameter names, shuffled with its seed)."""
    import numpy as np

    names = sorted(space)
    points = list(itertools.product(*(list(space[n]) for n in names)))
    np.random.RandomState(seed or 0).shuffle(points)  # GridSampler's LazyRandomState(seed or 0)
    return [dict(zip(names, p)) for p in points]


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


def prepare_grid(study: optuna.Study, points: Sequence[Mapping[str, Any]], created: bool) -> int:
    """Make sure every grid point has a trial: the creator enqueues them all; a worker that joins
    waits until the creator is done (a study of an older regfit, or one whose creator was
    killed while enqueuing, is completed here). Returns the number of trials enqueued here."""
    fingerprint = {"points": len(points), "sha1": hashlib.sha1(_key({"p": [_key(p) for p in points]}).encode()).hexdigest()}
    if not created:
        deadline = time.monotonic() + _GRID_WAIT_S
        while study.user_attrs.get(GRID_ATTR) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if study.user_attrs.get(GRID_ATTR) == fingerprint:
            return 0
    names = list(points[0]) if points else []
    taken = set()
    for t in study.get_trials(deepcopy=False):
        params = t.system_attrs.get("fixed_params") or t.params
        taken.add(_key({k: params.get(k) for k in names}))
    added = 0
    for p in points:
        if _key(p) not in taken:
            study.enqueue_trial(dict(p))
            added += 1
    study.set_user_attr(GRID_ATTR, fingerprint)
    return added


# ------------------------------------------------------------------ claiming and running trials


def uses_heartbeat(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (the database storages :func:`open_study` makes)."""
    interval = getattr(study._storage, "get_heartbeat_interval", None)
    return bool(interval and interval())


def fail_stale(study: optuna.Study) -> None:
    """Mark the RUNNING trials whose worker stopped beating as FAIL and queue them again."""
    if not uses_heartbeat(study):
        return
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fail_stale_trials(study)


def claim_waiting(study: optuna.Study) -> optuna.Trial | None:
    """Take the first WAITING trial of the study (WAITING → RUNNING in one conditional database
    update, so exactly one worker gets it), or ``None`` when none is left."""
    import optuna
    from optuna.trial import TrialState

    for _ in range(20):
        busy = False
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            taken = _take(study, frozen._trial_id)
            if taken:
                return optuna.Trial(study, frozen._trial_id)
            busy = busy or taken is None
        if not busy:
            return None
        time.sleep(random.uniform(0.05, 0.3))
    return None


# Optuna's own pop (read the state, then write RUNNING) relies on SELECT … FOR UPDATE, which
# SQLite ignores: two workers both read WAITING and both run the trial. One UPDATE with the
# old state in its WHERE clause is atomic on every database.
_TAKE = "UPDATE trials SET state = 'RUNNING', datetime_start = :now WHERE trial_id = :trial_id AND state = 'WAITING'"


def _take(study: optuna.Study, trial_id: int) -> bool | None:
    """Whether this worker took the trial; ``None`` when the database was busy (try again)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    backend = getattr(study._storage, "_backend", study._storage)  # Optuna caches an RDBStorage
    engine = getattr(backend, "engine", None)
    if engine is None:  # in memory: one process, Optuna's own update is enough
        try:
            return study._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
        except UpdateFinishedTrialError:
            return False
    import sqlalchemy

    try:
        with engine.begin() as connection:
            result = connection.execute(sqlalchemy.text(_TAKE), {"now": datetime.now(), "trial_id": trial_id})
            return result.rowcount == 1
    except sqlalchemy.exc.OperationalError as exc:  # "database is locked": another worker is writing
        log.debug("claiming trial %s: %s", trial_id, exc)
        return None


def new_trial(study: optuna.Study) -> optuna.Trial:
    """A queued trial if there is one (a retry), else a new one the sampler fills."""
    with warnings.catch_warnings():  # "Heartbeat … supposed to be used with Study.optimize": it is, by Heartbeat
        warnings.simplefilter("ignore")
        return study.ask()


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """Queue a trial that was stopped (not failed by its own fault) again, on a database storage."""
    if not uses_heartbeat(study):
        return
    from optuna.storages import RetryFailedTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RetryFailedTrialCallback(max_retry=MAX_RETRY)(study, study._storage.get_trial(trial._trial_id))


class Heartbeat:
    """Record a trial's heartbeat now and every ``interval`` seconds, in a thread, while the block
    runs (on storages with heartbeats; otherwise it does nothing)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.storage = study._storage
        self.trial_id = trial._trial_id
        self.enabled = uses_heartbeat(study)
        self.interval = self.storage.get_heartbeat_interval() if self.enabled else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self._beat()
            self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.trial_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception as exc:  # noqa: BLE001 - a busy database: the next beat tries again
            log.debug("heartbeat of trial %s failed: %s", self.trial_id, exc)
