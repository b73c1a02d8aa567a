"""User errors: mistakes in a command line, a config or an argument, reported as one paragraph.

Every ``regfit`` subcommand raises its user errors as exceptions; :func:`regfit.cli.main`
prints :func:`format_error` of them on stderr and exits with :data:`EXIT_USAGE` (2), or
shows the traceback with ``--debug`` / ``REGFIT_DEBUG=1``. Anything :func:`is_user_error`
does not recognize is a bug and keeps its traceback.

Besides mistakes in the input, a run can be stopped by its surroundings — a full or
read-only disk, a checkpoint file that does not load, an unreachable W&B server, a term
that diverged: :class:`RunError` and the guard's
:class:`~regfit.guard.NonFinitePenaltyError` are reported the same way, as one paragraph
naming the value and the fix.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from typing import Any, Sequence

__all__ = ["UsageError", "RunError", "EXIT_USAGE", "ENV_DEBUG", "format_error", "is_user_error", "check_config_given",
           "config_files", "take_option", "check_output_file"]

ENV_DEBUG = "REGFIT_DEBUG"
EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake in the command line or config, reported without a traceback."""


class RunError(RuntimeError):
    """A run its surroundings stop: a disk that is full or read-only, a checkpoint that does not
    load, an unreachable W&B server. Reported like a :class:`UsageError`; the message names
    the file or value and the way out."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from regfit.data import DataError
    from regfit.guard import NonFinitePenaltyError

    return (ArgumentError, ValueError, DataError, FileNotFoundError, MisconfigurationException, RunError,
            NonFinitePenaltyError)


def _is_wandb_error(exc: BaseException) -> bool:
    """wandb's own errors (login, network, usage), without importing wandb when no run used it."""
    errors = sys.modules.get("wandb.errors")
    return errors is not None and isinstance(exc, errors.Error)


_NOISE = [re.compile(p) for p in (
    r"^-?\s*Expected a path but .* either not accessible or invalid$",
    r"^-?\s*Does not validate against any of the Union subtypes$",
    r"^Subtypes: ",
    r"^Errors:$",
    r"^Given value type: ",
    r"^-?\s*Expected a <class 'NoneType'>$",
    r"^Given value: Namespace\(",
)]
_REWRITES = [
    (re.compile(r"Expected a typing\.Literal\[(.*)\]"), r"expected one of \1"),
    (re.compile(r"Expected a dot import path string: (\S+)"), r"or the import path of a class or function, not \1"),
    (re.compile(r"Expected a <class '(?:\w+\.)*(\w+)'>"), r"expected a \1"),
]
_NOT_A_LIST = re.compile(
    r'Parser key "([^"]+)":\s*Expected a <class \'collections\.abc\.(?:Mutable)?Sequence\'>\. Got value: (.*)'
)


def _clean_argument_error(message: str, argv: Sequence[str] = ()) -> str:
    """jsonargparse's messages list every type a union tried; keep the lines that help."""
    if "does not correspond to a subclass of RegModule" in message:
        given = (re.search(r"val='([^']+)'", message) or re.search(r"Given value: (\S+)", message)
                 or re.search(r"Import path (\S+)", message))
        what = given.group(1) if given else "the model class"
        return (f"model {what} is not a regfit.RegModule subclass. A model must subclass regfit.RegModule "
                "(implement forward and data_loss(batch)), e.g. class_path: regfit.models.MLP.")
    not_a_list = _NOT_A_LIST.search(message)
    if not_a_list:
        key, value = not_a_list.group(1), not_a_list.group(2).strip()
        # jsonargparse names a model's or data module's argument without its prefix.
        given = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a.split("=", 1)[0].endswith(key)]
        option = given[0] if given else f"--{key}"
        return (f"{key} takes a list, got {value}: write {option}=[{value}] "
                f"(in quotes when the list holds spaces: '{option}=[a, b]').")
    lines = []
    for line in message.strip().splitlines():
        line = line.strip()
        if not line or any(p.search(line) for p in _NOISE):
            continue
        for pattern, repl in _REWRITES:
            line = pattern.sub(repl, line)
        lines.append(line)
    if len(lines) == 1:  # one reason left: not a list item any more
        lines[0] = re.sub(r"^- ", "", lines[0])
    if len(lines) > 10:
        lines = lines[:10] + [f"... ({len(lines) - 10} more lines; run with --debug for all)"]
    return "\n  ".join(lines)


def config_files(argv: Sequence[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def format_error(exc: BaseException, argv: Sequence[str] = ()) -> str:
    """One paragraph for a user error (``argv`` names the config files in YAML errors)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, ArgumentError) and text.startswith("Problems parsing config"):
        # jsonargparse names "<unicode string>", not the file: say which file is not YAML.
        where = ", ".join(config_files(argv)) or "the config"
        text = text.replace("Problems parsing config:", f"{where} is not valid YAML:", 1).replace('"<unicode string>", ', "")
    if isinstance(exc, ArgumentError):
        return _clean_argument_error(text, argv) + "\nRun `regfit fit --help` for the options."
    if "Does not validate against any of the Union subtypes" in text:
        return _clean_argument_error(text, argv)
    if isinstance(exc, RuntimeError) and "state_key" in text:
        return ("Two callbacks of one type share a state key: give each Regularization in trainer.callbacks a "
                "distinct `name`.")
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"No such file: {exc.filename}. Check the path (relative paths start from {os.getcwd()})."
    if _is_wandb_error(exc):
        return (f"W&B: {text.rstrip('.')}. Check WANDB_API_KEY / `wandb login` and the network, or log without "
                "a server: WANDB_MODE=offline (upload later with `wandb sync`) or WANDB_MODE=disabled.")
    return text


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a mistake in the user's input (reported as one paragraph, exit 2)."""
    if isinstance(exc, _user_error_types()) or _is_wandb_error(exc):
        return True
    return isinstance(exc, RuntimeError) and "state_key" in str(exc)


def check_config_given(command: str, argv: Sequence[str]) -> None:
    """A YAML file given without ``--config`` (or no config at all, for ``groups``) is a
    usage error that shows the right call, not jsonargparse's "unrecognized arguments"."""
    given = config_files(argv)
    # A value after an option (`--model model.yaml`, `--config x.yaml`) is that option's.
    bare = [a for i, a in enumerate(argv) if a.endswith((".yaml", ".yml")) and not a.startswith("-")
            and not (i and argv[i - 1].startswith("-") and "=" not in argv[i - 1])]
    if bare:
        raise UsageError(f"{bare[0]} is given without --config: run `regfit {command} --config {bare[0]}`.")
    if command == "groups" and not given:
        raise UsageError("`regfit groups` needs a config: `regfit groups --config configs/mnist_l2.yaml [--plain]`.")
    if command == "thin" and not given:
        raise UsageError("`regfit thin` needs the config the checkpoint was trained with: `regfit thin --config "
                         "configs/mnist_cnn_thin.yaml --ckpt_path last.ckpt --out model.pt`.")


def take_flag(argv: Sequence[str], name: str) -> tuple[bool, list[str]]:
    """``(whether the flag is given, the other arguments)``, e.g. ``--plain``."""
    return name in argv, [a for a in argv if a != name]


def take_option(argv: Sequence[str], name: str, repeat: bool = False) -> tuple[Any, list[str]]:
    """``(value, the other arguments)`` for an option written ``NAME VALUE`` or
    ``NAME=VALUE`` (None when absent); ``repeat=True`` collects every occurrence in a list."""
    values, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == name:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UsageError(f"{name} needs a value: {name} VALUE.")
            values.append(args[i + 1])
            i += 2
            continue
        if arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if repeat:
        return values, rest
    if len(values) > 1:
        raise UsageError(f"{name} is given {len(values)} times ({', '.join(values)}); give it once.")
    return (values[0] if values else None), rest


def check_output_file(path: str, option: str = "--out") -> None:
    """A file the command will write: its folder exists and takes new files, and the path
    is not a folder. Checked before any work, so that nothing is computed for nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; give a file name, e.g. {os.path.join(path, 'model.pt')}.")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first (mkdir -p {folder}).")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable; choose another --out.")
