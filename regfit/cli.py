"""The ``regfit`` command: LightningCLI with a ``regularization:`` section, plus ``groups`` and ``sweep``.

::

    regfit fit --config configs/mnist_l2.yaml [--regularization.strength=1e-3] [--optimizer.lr=0.1]
    regfit validate|test|predict --config FILE [--ckpt_path=…]
    regfit groups --config FILE [--plain]     # which parameter gets which penalty; no training
    regfit sweep SWEEP.yaml                    # a W&B sweep file, run locally and offline

The YAML sections are the constructor signatures: ``model:`` (any :class:`~regfit.RegModule`
subclass by ``class_path``), ``data:`` (any LightningDataModule), ``regularization:`` (one
:class:`~regfit.Regularization`; more as ``trainer.callbacks`` entries), ``optimizer:``,
``lr_scheduler:`` and ``trainer:``.

A user mistake (unknown penalty or mode, negative λ, a selector matching nothing, a
missing config file, …) ends the command with exit code 2 and one paragraph on stderr;
``--debug`` (or ``REGFIT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import netrc
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from regfit.binding import check_distinct_names
from regfit.module import RegModule
from regfit.regularization import Regularization
from regfit.weight_histograms import WeightHistograms, wandb_loggers

__all__ = ["RegfitCLI", "run_cli", "main", "UsageError", "check_config_given", "format_error", "is_user_error", "wandb_credentials_found", "configure_wandb"]

log = logging.getLogger("regfit")

ENV_DEBUG = "REGFIT_DEBUG"
EXIT_USAGE = 2


class UsageError(ValueError):
    """A mistake in the command line or config, reported without a traceback."""


# ---- W&B ---------------------------------------------------------------------------------


def wandb_credentials_found(environ: os._Environ | dict[str, str] | None = None) -> bool:
    """Whether W&B could log in without prompting: ``WANDB_API_KEY`` or a netrc entry.

    Checked without importing wandb (as ``wandb login`` stores it: the netrc entry for the
    host of ``WANDB_BASE_URL``, default ``api.wandb.ai``).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = env.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def configure_wandb(environ: os._Environ | dict[str, str] | None = None) -> bool:
    """Make W&B never prompt: without credentials (and no ``WANDB_MODE`` chosen), log offline.

    Returns whether offline mode was switched on here.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE") or wandb_credentials_found(env):
        return False
    env["WANDB_MODE"] = "offline"
    # wandb's own banners would repeat what the one line below says, in five lines.
    env.setdefault("WANDB_SILENT", "true")
    return True


class RegfitSaveConfig(SaveConfigCallback):
    """Save the resolved config: as ``config.yaml`` in the log dir, and into the W&B run.

    With a WandbLogger the full resolved config becomes the run's config (searchable and
    comparable across runs in W&B) and ``config.yaml`` goes into the run's files, since
    ``trainer.log_dir`` is then shared by every run.
    """

    offline_notice_shown = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.save_to_log_dir = not wandb_loggers(trainer)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        config = yaml.safe_load(text)
        for lg in loggers:
            run = lg.experiment
            run.config.update(config, allow_val_change=True)
            # Not config.yaml: W&B writes its own run config under that name.
            Path(run.dir, "regfit-config.yaml").write_text(text)
            self._offline_notice(run)

    @classmethod
    def _offline_notice(cls, run: Any) -> None:
        if cls.offline_notice_shown or os.environ.get("WANDB_MODE") not in ("offline", "dryrun"):
            return
        cls.offline_notice_shown = True
        run_dir = Path(run.dir).parent
        log.warning("W&B is offline (no API key found): the run is saved in %s. Upload it later with "
                    "`wandb login` and `wandb sync %s`.", run_dir, run_dir)


# ---- the LightningCLI subclass -----------------------------------------------------------


class RegfitCLI(LightningCLI):
    """LightningCLI for RegModule models with a top-level ``regularization:`` section.

    Args: those of :class:`~lightning.pytorch.cli.LightningCLI`; the defaults differ:
    ``model_class=RegModule`` in subclass mode (``model.class_path`` picks any RegModule
    subclass), any LightningDataModule as ``data``, parse errors raised (not ``sys.exit``),
    the resolved config saved to the W&B run, and :class:`WeightHistograms` added.
    """

    def __init__(self, *args: Any, extra_callbacks: Sequence[Callback] = (), **kwargs: Any) -> None:
        # Added to the trainer's callbacks (e.g. a sweep's trial reporter), after the
        # config's and the defaults.
        self._extra_callbacks = list(extra_callbacks)
        kwargs.setdefault("model_class", RegModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_callback", RegfitSaveConfig)
        # A log dir without a versioned logger (logger: false) is reused by every run.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"callbacks": [WeightHistograms()]})
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs["exit_on_error"] = False  # main() turns errors into one paragraph
        kwargs.setdefault("prog", "regfit")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Regularization, "regularization")

    def before_instantiate_classes(self) -> None:
        if configure_wandb():
            log.debug("No W&B credentials found; WANDB_MODE=offline.")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            # One W&B run per command, also in-process (notebooks, sweeps, tests): close it
            # here rather than at interpreter exit, so the next command starts its own run
            # instead of silently logging into this one. The run object stays readable.
            for lg in wandb_loggers(self.trainer):
                if getattr(lg, "_experiment", None) is not None:
                    lg.experiment.finish()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        callbacks = [*callbacks, *self._extra_callbacks]
        check_distinct_names([*(config.get("callbacks") or []), *callbacks])  # before the Trainer exists
        return super()._instantiate_trainer(config, callbacks)


def run_cli(args: Sequence[str], run: bool = True, **kwargs: Any) -> RegfitCLI:
    """Run ``regfit`` in-process with the given arguments and return the CLI object.

    ``run_cli(["fit", "--config", "configs/mnist_l2.yaml"])`` trains;
    ``run_cli(["--config", FILE], run=False)`` only builds ``cli.model``, ``cli.datamodule``
    and ``cli.trainer``; ``extra_callbacks=[...]`` adds callbacks to the trainer. Errors are
    raised (see :func:`main` for their one-paragraph form).
    """
    # Passing args is the point here (main() strips --debug, groups its own name), so
    # Lightning's "args and sys.argv both given" warning does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return RegfitCLI(args=list(args), run=run, **kwargs)


# ---- errors ------------------------------------------------------------------------------


def _user_error_types() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from regfit.data import DataError

    return (ArgumentError, ValueError, DataError, FileNotFoundError, MisconfigurationException)


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
        given = re.search(r"Given value: (\S+)", message) or re.search(r"Import path (\S+)", message)
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


def _config_files(argv: Sequence[str]) -> list[str]:
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
        where = ", ".join(_config_files(argv)) or "the config"
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
    return text


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a mistake in the user's input (reported as one paragraph, exit 2)."""
    if isinstance(exc, _user_error_types()):
        return True
    return isinstance(exc, RuntimeError) and "state_key" in str(exc)


# ---- entry point -------------------------------------------------------------------------


def _sweep(argv: list[str]) -> int:
    try:
        module = importlib.import_module("regfit.sweep")
    except ModuleNotFoundError as exc:
        if exc.name != "regfit.sweep":
            raise
        raise UsageError("`regfit sweep` is not available in this version of regfit (no regfit.sweep module).") from None
    return int(module.main(argv) or 0)


OVERVIEW = """regfit: weight regularization for PyTorch Lightning.

  regfit fit|validate|test|predict --config FILE [--section.key=value ...]
  regfit groups --config FILE [--plain]   which parameter gets which penalty (no training)
  regfit sweep SWEEP.yaml                 run a W&B sweep file locally, offline
  add --debug (or REGFIT_DEBUG=1) to see tracebacks

"""


def check_config_given(command: str, argv: Sequence[str]) -> None:
    """A YAML file given without ``--config`` (or no config at all, for ``groups``) is a
    usage error that shows the right call, not jsonargparse's "unrecognized arguments"."""
    given = _config_files(argv)
    # A value after an option (`--model model.yaml`, `--config x.yaml`) is that option's.
    bare = [a for i, a in enumerate(argv) if a.endswith((".yaml", ".yml")) and not a.startswith("-")
            and not (i and argv[i - 1].startswith("-") and "=" not in argv[i - 1])]
    if bare:
        raise UsageError(f"{bare[0]} is given without --config: run `regfit {command} --config {bare[0]}`.")
    if command == "groups" and not given:
        raise UsageError("`regfit groups` needs a config: `regfit groups --config configs/mnist_l2.yaml [--plain]`.")


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(OVERVIEW)
        if not argv:
            return EXIT_USAGE
    if argv and argv[0] == "groups":
        from regfit.groups import main as groups_main

        return groups_main(argv[1:])
    if argv and argv[0] == "sweep":
        return _sweep(argv[1:])
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        check_config_given(argv[0], argv[1:])
    run_cli(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``regfit`` console script. Returns the exit code (0 ok, 2 a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(ENV_DEBUG, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one paragraph, bugs keep their traceback
        if debug or not is_user_error(exc):
            raise
        sys.stderr.write(f"regfit: error: {format_error(exc, argv)}\n(Run with --debug for the traceback.)\n")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
