"""What the reliability suite shares: running regfit in-process or as a process, the
one-paragraph check, and throwaway PostgreSQL servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
L2_CONFIG = str(REPO / "configs" / "mnist_l2.yaml")

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def tiny_fit(mnist_dir: Path, *extra: str, batches: int = 2) -> list[str]:
    """Options for a fit of a few batches on the small MNIST folder, no logger, no checkpoints."""
    return [f"--data.data_dir={mnist_dir}", "--trainer.max_epochs=1", f"--trainer.limit_train_batches={batches}",
            "--trainer.limit_val_batches=1", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            *QUIET, *extra]


def assert_one_paragraph(err: str, *needles: str, prefix: str = "regfit") -> str:
    """stderr of a refused command: no traceback, the message in one paragraph (no blank line)
    after ``regfit: error:`` (or ``regfit sweep: …``), naming every needle."""
    assert "Traceback" not in err, err
    at = err.find(f"{prefix}:")
    assert at >= 0, err
    message = err[at:].rstrip("\n")
    assert "\n\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"
    return message


def env_for_subprocess(**extra: str) -> dict[str, str]:
    """This checkout first on PYTHONPATH (the editable install may point at another one)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def regfit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "regfit.cli", *args]


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180, count: int = 1) -> None:
    """Wait until ``text`` appears ``count`` times in the file ``path`` (a process's output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{text!r} did not appear within {timeout} s:\n{path.read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty database; yields its SQLAlchemy
    URL (``postgresql+psycopg://…``). Raises ``RuntimeError`` saying why it cannot start."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    owner = None
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no `postgres` user to run the server as") from None

    def preexec() -> None:
        if owner is not None:
            os.setgid(owner.pw_gid)
            os.setuid(owner.pw_uid)

    root = Path(tempfile.mkdtemp(prefix="regfit-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()
    run = dict(capture_output=True, text=True, preexec_fn=preexec, timeout=120, cwd=root)
    try:
        proc = subprocess.run([initdb, "-D", str(data), "-U", "regfit", "--auth=trust", "-E", "UTF8", "--no-sync"], **run)
        if proc.returncode:
            raise RuntimeError(f"initdb failed: {proc.stderr[-500:]}")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        proc = subprocess.run([pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60",
                               "start"], **run)
        if proc.returncode:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr[-300:]} {log[-500:]}")
        try:
            import psycopg

            with psycopg.connect(f"host=127.0.0.1 port={port} user=regfit dbname=postgres", autocommit=True) as conn:
                conn.execute("CREATE DATABASE sweeps")
            yield f"postgresql+psycopg://regfit@127.0.0.1:{port}/sweeps"
        finally:
            subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **run)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def count_trials(study_name: str, storage: str) -> tuple[dict, list[str]]:
    """COMPLETE trials per grid point, and the states of all trials."""
    import collections

    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    per_point = collections.Counter(tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE")
    return dict(per_point), [t.state.name for t in study.trials]


def sweep_fit_args(mnist_dir: Path, log_dir: Path, batches: int = 4) -> list[str]:
    """Per-trial options after ``--``: a narrow MLP, a few batches, CSV logs, no checkpoints."""
    return [f"--data.data_dir={mnist_dir}", "--model.init_args.widths=[32]", f"--trainer.limit_train_batches={batches}",
            "--trainer.limit_val_batches=2", "--trainer.max_epochs=1", *QUIET, "--trainer.enable_checkpointing=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={log_dir}"]


def grid_file(folder: Path, strengths: Sequence[float] = (1e-5, 1e-4, 1e-3), penalties: Sequence[str] = ("l2", "l1"),
              name: str = "grid") -> Path:
    """A small grid sweep file (penalties × strengths) over configs/mnist_l2.yaml, runnable from any folder."""
    import yaml

    spec = {
        "name": name, "method": "grid", "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"regularization.penalty": {"values": list(penalties)},
                       "regularization.strength": {"values": [float(v) for v in strengths]}},
        "command": ["${env}", "regfit", "fit", "--config", L2_CONFIG, "${args}"],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def spawn(args: Sequence[str], out: Path, cwd: Path = REPO, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start ``args`` with stdout and stderr into the file ``out``."""
    f = out.open("w")
    return subprocess.Popen(list(args), stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env or env_for_subprocess(),
                            **kw)
