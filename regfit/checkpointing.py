"""Checkpoints that are verified: written whole or not at all, read back with a clear error.

Lightning's save writes a checkpoint through an fsspec transaction whose temporary file lives
in the system temp folder; the final ``shutil.move`` is then a copy across file systems,
so a full disk leaves a truncated ``last.ckpt`` under the final name, and a
``PermissionError`` on a read-only folder is swallowed (the fit exits 0 with no checkpoint).
regfit replaces it for local paths:

* :class:`AtomicCheckpointIO` writes to a temporary file *beside* the final one, syncs it and
  renames it over the final name; any failure removes the temporary file, leaves the
  previous checkpoint untouched and raises :class:`CheckpointError`;
* :class:`SafeCheckpoints` checks at fit start that every checkpoint folder is writable, and
  on SIGTERM or Ctrl+C during a fit saves the state as ``interrupted.ckpt`` beside the
  other checkpoints;
* :func:`read_checkpoint` loads a ``--ckpt_path`` file or says in one paragraph why it is
  not a checkpoint (missing, a folder, empty, truncated, corrupt, another kind of file), and
  :func:`model_changes` lists the model arguments a command gives that differ from the
  checkpoint's, which Lightning would otherwise replace silently.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from regfit.atomic import atomic_save
from regfit.errors import RunError, UsageError
from regfit.interrupts import Interrupted

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "INTERRUPTED_CHECKPOINT",
    "SafeCheckpoints",
    "check_writable",
    "model_changes",
    "model_overrides",
    "read_checkpoint",
    "refuse_model_changes",
    "use_atomic_checkpoints",
]

#: The file a fit stopped by SIGTERM / Ctrl+C is saved to, in its checkpoint folder.
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"

_SAVE_ELSEWHERE = ("save elsewhere: the ModelCheckpoint's dirpath (trainer.callbacks), else the logger's save_dir "
                   "(--trainer.logger.init_args.save_dir=DIR) or --trainer.default_root_dir=DIR")


class CheckpointError(RunError):
    """A checkpoint that cannot be written or read; the message names the file and the fix."""


def os_reason(exc: OSError) -> str:
    """A short reason for an ``OSError``: what the disk said, in words a user acts on."""
    reasons = {
        errno.ENOSPC: "the disk is full (no space left on device)",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a file of that name is in the way",
        errno.EFBIG: "the file would exceed the size this process may write (ulimit -f)",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


def check_writable(folder: str | os.PathLike[str], what: str, fix: str) -> Path:
    """Create ``folder`` if needed and write (and delete) a small file in it; raise
    :class:`~regfit.errors.RunError` naming ``what``, the folder and ``fix`` if either fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".regfit-write-test-") as f:
            f.write(b"regfit")
            f.flush()
    except OSError as exc:
        error = CheckpointError if "checkpoint" in what else RunError
        raise error(f"{what} {folder} is not writable: {os_reason(exc)}. Make it writable, or {fix}.") from None
    return folder


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and whose failures are errors.

    The checkpoint is serialized in memory (as Lightning does), written to
    ``.NAME.PID.tmp`` in the final folder, synced, and renamed over ``NAME``: the final name
    holds either the previous checkpoint or the complete new one. Remote paths (``s3://``…)
    go through Lightning's fsspec writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(checkpoint, path)  # no temporary file left behind, also on Ctrl+C
        except OSError as exc:
            raise CheckpointError(
                f"could not save the checkpoint {path}: {os_reason(exc)}. {_kept(path)} Free space or make the "
                f"folder writable, or {_SAVE_ELSEWHERE}."
            ) from exc


def _kept(path: Path) -> str:
    """What a failed save left: the checkpoints saved before, unchanged, and which to resume from."""
    newest = max((c for c in path.parent.glob("*.ckpt") if _looks_like_checkpoint(c)), key=lambda c: c.stat().st_mtime,
                 default=None)
    if newest is None:
        return "No checkpoint of this run was saved before."
    return (f"The checkpoints saved before are unchanged (the newest is {newest}): resume from it with "
            f"--ckpt_path={newest}.")


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO`, unless it was given a checkpoint IO of
    its own (a plugin, a sharded strategy's)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class SafeCheckpoints(Callback):
    """Checkpoint folders checked writable at fit start; the state saved when a signal stops a fit.

    ``interrupt`` is the signal that stopped the last fit (``None`` if none did), ``saved``
    the checkpoint written then, and :meth:`summary` says both in a sentence.
    """

    def __init__(self) -> None:
        self.interrupt: int | None = None
        self.saved: Path | None = None
        self.where = ""
        self.not_saved = ""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.interrupt, self.saved, self.not_saved = None, None, ""
        if not trainer.is_global_zero:
            return
        for cb in trainer.checkpoint_callbacks:
            dirpath = getattr(cb, "dirpath", None)
            if isinstance(cb, ModelCheckpoint) and dirpath and _is_local(dirpath):
                check_writable(dirpath, "the checkpoint folder", _SAVE_ELSEWHERE)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.interrupt = signal.SIGTERM
        elif isinstance(exception, KeyboardInterrupt):
            self.interrupt = signal.SIGINT
        elif isinstance(exception, Interrupted):
            self.interrupt = exception.signum
        else:
            return
        self.where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
        if trainer.state.fn != "fit":
            return
        folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        if not folders:
            self.not_saved = "checkpointing is off, so nothing was saved"
            return
        if trainer.global_step == 0:
            self.not_saved = "no training step had run, so there was nothing to save"
            return
        path = Path(folders[0]) / INTERRUPTED_CHECKPOINT if _is_local(folders[0]) else None
        if path is None:
            return
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - the stop request wins; say why nothing was kept
            self.not_saved = f"saving {path} failed: {exc}"
        else:
            self.saved = path

    def summary(self) -> str:
        """What the interrupted fit kept, as a sentence (empty if no fit was interrupted)."""
        if self.interrupt is None:
            return ""
        if self.saved is not None:
            return (f"{self.where}; its state is saved in {self.saved}: resume with the same command and "
                    f"--ckpt_path={self.saved}")
        return f"{self.where}; {self.not_saved or 'the checkpoints already saved are unchanged'}"


# ------------------------------------------------------------------ reading a checkpoint


def read_checkpoint(path: str | os.PathLike[str], option: str = "--ckpt_path") -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU (``weights_only=True``), or raise
    :class:`CheckpointError` saying in one paragraph why ``path`` is not one."""
    p = Path(path)
    where = f"{option} {path}"
    if not p.exists():
        raise CheckpointError(f"{where}: no such file (relative paths start from {os.getcwd()}).")
    if p.is_dir():
        found = sorted(c.name for c in p.glob("*.ckpt"))
        hint = f": one of {', '.join(found[:5])}" if found else "; it holds no .ckpt file"
        raise CheckpointError(f"{where} is a folder; give a checkpoint file in it{hint}.")
    others = _other_checkpoints(p)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): its save never finished. {others}")
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files of torch < 1.6 are a bare pickle (protocol 2+).
    if head[:4] != b"PK\x03\x04" and not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise CheckpointError(f"{where} is not a checkpoint file (it starts with {head!r}, not a torch archive). {others}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{where} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
                f"({_first_line(exc, 'WeightsUnpickler error:')}); regfit loads checkpoints as tensors and plain data "
                "only. Load and re-save it yourself if you trust its source."
            ) from None
        raise CheckpointError(f"{where} is truncated or corrupt ({_first_line(exc)}). {others}") from None
    except (RuntimeError, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{where} is truncated or corrupt (torch.load: {_first_line(exc)}): a copy or a save that did not "
            f"finish? {others}"
        ) from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        what = f"a {type(ckpt).__name__}" + (f" with keys {', '.join(map(str, list(ckpt)[:6]))}" if isinstance(ckpt, Mapping) else "")
        raise CheckpointError(
            f"{where} is a torch file but not a Lightning checkpoint ({what}; no state_dict): give a .ckpt file that "
            "`regfit fit` or Trainer.save_checkpoint wrote."
        )
    return dict(ckpt)


def load_weights(model: torch.nn.Module, path: str | os.PathLike[str], option: str = "--ckpt_path") -> None:
    """The weights of a Lightning checkpoint (its ``state_dict``) into ``model``, as a resume
    would load them. A file that is not such a checkpoint is a :class:`CheckpointError`
    (:func:`read_checkpoint`); one saved from another model a :class:`~regfit.errors.UsageError`
    naming the fix."""
    state = read_checkpoint(path, option)["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise UsageError(f"{option} {path} was not saved from the model of this config ({type(model).__name__}): "
                         f"{' '.join(line.strip() for line in first[:3])} Give the config the checkpoint was trained "
                         "with (and the same --model.init_args overrides).") from None


def _first_line(exc: BaseException, after: str = "") -> str:
    text = str(exc)
    if after and after in text:
        text = text.split(after, 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line[:200]


def _looks_like_checkpoint(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _other_checkpoints(path: Path) -> str:
    others = sorted((c for c in path.parent.glob("*.ckpt") if c != path and _looks_like_checkpoint(c)),
                    key=lambda c: c.stat().st_mtime, reverse=True)
    if others:
        return f"Resume from another checkpoint ({', '.join(str(c) for c in others[:3])}) or start without --ckpt_path."
    return "Use another checkpoint, or start without --ckpt_path."


def model_changes(hparams: Mapping[str, Any], model_config: Any) -> dict[str, str]:
    """The model arguments of ``model_config`` (a config's ``model`` section: ``class_path`` +
    ``init_args``, or the arguments themselves) that differ from a checkpoint's
    ``hyper_parameters``: ``{name: "saved → given"}`` (``class_path`` alone if the class differs)."""
    given = _plain(model_config) or {}
    if "class_path" in given:
        given_class, given_args = given.get("class_path"), given.get("init_args") or {}
    else:
        given_class, given_args = None, given
    saved_class = hparams.get("_class_path")
    if saved_class and given_class and saved_class != given_class:
        return {"class_path": f"{saved_class} → {given_class}"}
    changes = {}
    for key, saved in hparams.items():
        if key.startswith("_") or key not in given_args:
            continue
        value = given_args[key]
        if _plain(value) != _plain(saved):
            changes[key] = f"{_plain(saved)!r} → {_plain(value)!r}"
    return changes


def _plain(value: Any) -> Any:
    """Namespaces, tuples and mappings as plain dicts and lists, for comparison and display."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_overrides(argv: Sequence[str]) -> set[str]:
    """The model arguments a command line sets itself (``--model.init_args.widths=…``,
    ``--model.widths …``; ``class_path`` for ``--model=…`` / ``--model.class_path=…``)."""
    keys = set()
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name == "--model":
            keys.add("class_path")
        elif name.startswith("--model."):
            parts = name[len("--model."):].split(".")
            if parts[0] == "init_args" and len(parts) > 1:
                parts = parts[1:]
            keys.add(parts[0])
    return keys


def refuse_model_changes(path: Any, hparams: Mapping[str, Any], model_config: Any,
                         explicit: Collection[str] | None = None) -> dict[str, str]:
    """Compare the model a command builds with the one a checkpoint was saved with.

    Lightning builds the checkpoint's model: arguments that only the config gives are replaced
    by the checkpoint's (returned, for a warning). Arguments the command line sets itself
    (``explicit``; all of them when ``None``) and that differ are a
    :class:`~regfit.errors.UsageError`: Lightning would drop them without a word.
    """
    changes = model_changes(hparams, model_config)
    refused = {k: v for k, v in changes.items() if explicit is None or k in explicit}
    if refused:
        raise UsageError(
            f"--ckpt_path {path} was saved with other model arguments than this command gives "
            f"({'; '.join(f'{k}: {v}' for k, v in refused.items())}, checkpoint → command). A checkpoint continues "
            "the model it was saved with: remove those model overrides (or give the checkpoint's values), or start "
            "a new run without --ckpt_path."
        )
    return changes
