"""``RegfitCLI``: the LightningCLI behind ``regfit fit|validate|test|predict``, and :func:`run_cli`.

The YAML sections are the constructor signatures: ``model:`` (any :class:`~regfit.RegModule`
subclass by ``class_path``), ``data:`` (any LightningDataModule), ``regularization:`` (one
:class:`~regfit.Regularization`; more as ``trainer.callbacks`` entries), ``optimizer:``,
``lr_scheduler:`` and ``trainer:``. The subcommands that build a run without training
(``regfit groups``, sweeps) import :func:`run_cli` from here; the dispatcher
:mod:`regfit.cli` only routes the command line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from regfit.callback import check_distinct_names
from regfit.checkpointing import (
    CheckpointError,
    SafeCheckpoints,
    check_writable,
    load_weights,
    model_overrides,
    read_checkpoint,
    refuse_model_changes,
    use_atomic_checkpoints,
)
from regfit.configfile import check_config_files
from regfit.errors import UsageError, check_config_given, config_files
from regfit.interrupts import Interrupted
from regfit.module import RegModule
from regfit.regularization import Regularization
from regfit.wandb_setup import configure_wandb, import_wandb, offline_reason
from regfit.weight_histograms import WeightHistograms, wandb_loggers

__all__ = ["RegfitCLI", "RegfitSaveConfig", "check_optimizer_options", "check_trainer_options", "quiet_known_noise",
           "run_cli"]

log = logging.getLogger("regfit")


class _DropLightningTips(logging.Filter):
    """Lightning's "💡 Tip: try installing litlogger / litmodels" lines, printed at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_TIPS = _DropLightningTips()


def quiet_known_noise() -> None:
    """Silence exactly the start-up noise of the libraries regfit drives, nothing else: Lightning's
    advertising tips and its use of torch's deprecated ``LeafSpec`` (a FutureWarning on every
    fit). wandb's "anonymous setting" warning is avoided where the logger is built
    (:meth:`RegfitCLI._instantiate_trainer`)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _TIPS not in tips.filters:
        tips.addFilter(_TIPS)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


# Trainer options whose value Lightning only trips over mid-run (a ZeroDivisionError at the
# first epoch end, a loop that never validates): the smallest value, and what it means.
_TRAINER_AT_LEAST: dict[str, tuple[int, str]] = {
    "accumulate_grad_batches": (1, "1 = no accumulation"),
    "check_val_every_n_epoch": (1, "1 = every epoch; null = validate by val_check_interval alone"),
    "log_every_n_steps": (1, "1 = every step"),
    "max_epochs": (-1, "-1 = no limit"),
    "min_epochs": (0, "0 = none"),
    "max_steps": (-1, "-1 = no limit"),
    "min_steps": (0, "0 = none"),
    "num_nodes": (1, "the number of machines"),
    "num_sanity_val_steps": (-1, "0 = none, -1 = all"),
    "reload_dataloaders_every_n_epochs": (0, "0 = never"),
}
# Options that are a count (an int ≥ 0) or a fraction (a float in [0, 1]).
_TRAINER_FRACTIONS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                      "overfit_batches")


def check_trainer_options(trainer: Mapping[str, Any]) -> None:
    """Refuse ``trainer:`` values Lightning accepts but cannot run with (``check_val_every_n_epoch=0``,
    ``accumulate_grad_batches=0``, a negative or NaN limit), naming the option and its range."""
    for key, (lowest, meaning) in _TRAINER_AT_LEAST.items():
        value = trainer.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise UsageError(f"trainer.{key}={value!r}: must be an integer ≥ {lowest} ({meaning}); "
                             f"e.g. --trainer.{key}={max(lowest, 1)}.")
    for key in _TRAINER_FRACTIONS:
        value = trainer.get(key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not (math.isfinite(value) and 0.0 <= value <= 1.0) or (
                isinstance(value, int) and value < 0):
            raise UsageError(f"trainer.{key}={value!r}: give a number of batches (an integer ≥ 0) or a fraction of "
                             f"them (a float from 0.0 to 1.0), e.g. --trainer.{key}=1.0.")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and (
            not math.isfinite(interval) or interval <= 0):
        raise UsageError(f"trainer.val_check_interval={interval!r}: give a number of batches (an integer ≥ 1) or a "
                         "fraction of an epoch (a float in (0, 1]), e.g. --trainer.val_check_interval=1.0.")
    for key in ("gradient_clip_val",):
        value = trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"trainer.{key}={value!r}: must be a finite number ≥ 0 (0 or null = no clipping).")
    devices = trainer.get("devices")
    if isinstance(devices, str) and devices != "auto" and not all(d.strip().lstrip("-").isdigit()
                                                                    for d in devices.split(",") if d.strip()):
        raise UsageError(f"trainer.devices={devices!r}: give a number of devices (e.g. 1, or -1 for all), a list of "
                         "device indices ([0, 1]) or auto.")


# Learning rates and other optimizer numbers are float32 on the usual parameters; a larger or
# non-finite value failed inside the first optimizer step with a raw overflow error.
_FLOAT32_MAX = 3.4028234663852886e38
# Scheduler arguments that count steps or epochs (a 0 divides by zero in torch's schedulers).
_SCHEDULER_AT_LEAST = {"step_size": 1, "T_max": 1, "T_0": 1, "T_mult": 1, "total_iters": 1, "total_steps": 1,
                       "epochs": 1, "steps_per_epoch": 1, "step_size_up": 1, "patience": 0}


def check_optimizer_options(config: Mapping[str, Any]) -> None:
    """Refuse optimizer numbers torch cannot step with (``lr=1e308``, ``lr=inf``) and scheduler
    counts of 0, naming the option."""
    for section in ("optimizer", "lr_scheduler"):
        value = config.get(section)
        args = value.get("init_args") if isinstance(value, Mapping) else None
        if not isinstance(args, Mapping):
            continue
        for key, number in _numbers(args):
            if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
                raise UsageError(f"{section}.init_args.{key}={number!r} is not a finite float32 number (at most "
                                 f"{_FLOAT32_MAX:.3g}); e.g. --{section}.init_args.{key}=0.01.")
        if section == "lr_scheduler":
            for key, lowest in _SCHEDULER_AT_LEAST.items():
                count = args.get(key)
                if isinstance(count, (int, float)) and not isinstance(count, bool) and count < lowest:
                    raise UsageError(f"lr_scheduler.init_args.{key}={count!r}: must be ≥ {lowest}.")


def _numbers(args: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in args.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append((f"{prefix}{key}", float(value)))
        elif isinstance(value, (list, tuple)):
            out += [(f"{prefix}{key}[{i}]", float(v)) for i, v in enumerate(value)
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return out


def _mentions_wandb(args: Any) -> bool:
    """Whether a command line (or a config file it names) mentions a WandbLogger."""
    if not isinstance(args, (list, tuple)):
        return False
    if any("WandbLogger" in str(a) for a in args):
        return True
    for name in config_files([str(a) for a in args]):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if "WandbLogger" in Path(name).read_text():
                return True
    return False


def _uses_wandb(logger: Any) -> bool:
    """Whether a config's ``trainer.logger`` value names a WandbLogger (also inside a list)."""
    if isinstance(logger, (list, tuple)):
        return any(_uses_wandb(lg) for lg in logger)
    class_path = logger.get("class_path") if isinstance(logger, Mapping) else getattr(logger, "class_path", None)
    return isinstance(class_path, str) and class_path.endswith("WandbLogger")


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
            if getattr(run, "disabled", False):  # WANDB_MODE=disabled: a no-op run with no files
                continue
            # Not config.yaml: W&B writes its own run config under that name.
            Path(run.dir).mkdir(parents=True, exist_ok=True)
            Path(run.dir, "regfit-config.yaml").write_text(text)
            self._offline_notice(run)

    @classmethod
    def _offline_notice(cls, run: Any) -> None:
        reason = offline_reason()
        if cls.offline_notice_shown or not reason:
            return
        cls.offline_notice_shown = True
        run_dir = Path(run.dir).parent
        log.warning("W&B is offline (%s): the run is saved in %s. Upload it later with "
                    "`wandb login` and `wandb sync %s`.", reason, run_dir, run_dir)


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
        self.safe_checkpoints = SafeCheckpoints()
        quiet_known_noise()
        given = kwargs.get("args") or (args[0] if args else None)
        self._argv = [str(a) for a in given] if isinstance(given, (list, tuple)) else sys.argv[1:]
        if _mentions_wandb(self._argv):
            import_wandb()  # before the parser, which imports wandb to read WandbLogger's annotations
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs["exit_on_error"] = False  # main() turns errors into one paragraph
        kwargs.setdefault("prog", "regfit")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Regularization, "regularization")

    def _config(self) -> Any:
        return self.config.get(str(self.config.get("subcommand")), self.config)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path`` here to take the model's arguments from the
        checkpoint, which replaces the command's own silently and gives a raw traceback for
        a file that is not a checkpoint. regfit checks the file first (one paragraph naming
        it), refuses ``--model…`` options that differ from the checkpoint's arguments, and
        says which config values the checkpoint's replace."""
        if not self.config.get("subcommand"):
            return
        config = self._config()
        path = config.get("ckpt_path")
        if not path or path in ("last", "best", "hpc") or str(path).startswith("registry") or "://" in str(path):
            return super()._parse_ckpt_path()  # Lightning's own keywords and remote files
        ckpt = read_checkpoint(path)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        replaced = refuse_model_changes(path, hparams, config.get("model"), explicit=model_overrides(self._argv))
        if replaced:
            log.warning("--ckpt_path %s: the model is built with the checkpoint's arguments, not the config's: %s.",
                        path, "; ".join(f"{k}: {v.split(' → ')[1]} → {v.split(' → ')[0]}" for k, v in replaced.items()))
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)
        except Exception as exc:  # noqa: BLE001 - jsonargparse's errors have no common base
            raise CheckpointError(
                f"--ckpt_path {path}: its model arguments do not fit this command's model: {exc}"
            ) from None

    def before_instantiate_classes(self) -> None:
        config = self._config()
        trainer = config.get("trainer") or {}
        check_trainer_options(trainer.as_dict() if hasattr(trainer, "as_dict") else trainer)
        check_optimizer_options(config.as_dict() if hasattr(config, "as_dict") else config)
        if _uses_wandb(trainer.get("logger")):
            import_wandb()
            configure_wandb(probe=True)

    def _run_subcommand(self, subcommand: str) -> None:
        _check_log_folders(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise Interrupted(signal.SIGTERM, self.safe_checkpoints.summary()) from None
        except Interrupted as exc:
            raise Interrupted(exc.signum, self.safe_checkpoints.summary() or exc.detail) from None
        except SystemExit:
            if self.safe_checkpoints.interrupt is None:
                raise
            # Lightning ends a fit stopped by Ctrl+C with sys.exit(1) and ignores SIGINT from then on.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise Interrupted(self.safe_checkpoints.interrupt, self.safe_checkpoints.summary()) from None
        except RuntimeError as exc:
            path = self._config().get("ckpt_path")
            if path and "Error(s) in loading state_dict" in str(exc):
                detail = " ".join(str(exc).split())[:600]
                raise CheckpointError(
                    f"--ckpt_path {path} does not fit the model this command builds ({detail}). It was saved from "
                    "another model: resume with the config it was trained with, or start without --ckpt_path."
                ) from None
            raise
        finally:
            # One W&B run per command, also in-process (notebooks, sweeps, tests): close it
            # here rather than at interpreter exit, so the next command starts its own run
            # instead of silently logging into this one. The run object stays readable.
            for lg in wandb_loggers(self.trainer):
                if getattr(lg, "_experiment", None) is not None:
                    lg.experiment.finish()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        callbacks = [*callbacks, *self._extra_callbacks, self.safe_checkpoints]
        check_distinct_names([*(config.get("callbacks") or []), *callbacks])  # before the Trainer exists
        trainer = super()._instantiate_trainer(config, callbacks)
        use_atomic_checkpoints(trainer)
        for lg in wandb_loggers(trainer):
            # Lightning passes anonymous=None, which wandb now warns about on every run.
            init = getattr(lg, "_wandb_init", None)
            if isinstance(init, dict) and init.get("anonymous") is None:
                init.pop("anonymous", None)
        return trainer


def _check_log_folders(trainer: Trainer) -> None:
    """Every logger's local save folder exists and is writable, before anything is logged (a
    read-only folder was a raw PermissionError at the first logged step)."""
    if not trainer.is_global_zero:
        return
    if not trainer.loggers and "://" not in str(trainer.default_root_dir):  # the config and checkpoints go there
        check_writable(trainer.default_root_dir, "trainer.default_root_dir",
                       "give another one with --trainer.default_root_dir=DIR")
    for lg in trainer.loggers:
        folder = getattr(lg, "save_dir", None)
        if folder and "://" not in str(folder):
            check_writable(folder, f"the log folder of {type(lg).__name__}",
                           "log elsewhere: --trainer.logger.init_args.save_dir=DIR (or --trainer.logger=false)")


def run_cli(args: Sequence[str], run: bool = True, **kwargs: Any) -> RegfitCLI:
    """Run ``regfit`` in-process with the given arguments and return the CLI object.

    ``run_cli(["fit", "--config", "configs/mnist_l2.yaml"])`` trains;
    ``run_cli(["--config", FILE], run=False)`` only builds ``cli.model``, ``cli.datamodule``
    and ``cli.trainer``; ``extra_callbacks=[...]`` adds callbacks to the trainer. Errors are
    raised (:func:`regfit.cli.main` prints them as one paragraph).
    """
    # Passing args is the point here (main() strips --debug, groups its own name), so
    # Lightning's "args and sys.argv both given" warning does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return RegfitCLI(args=list(args), run=run, **kwargs)


def build_from_config(command: str, args: Sequence[str], ckpt_path: str | None = None) -> RegfitCLI:
    """The model, data module and trainer the config in ``args`` describes, built but not run,
    with the weights of ``ckpt_path`` when given, for ``regfit <command>`` (``groups``,
    ``thin``), which prints a table: Lightning's start-up chatter is silenced (warnings still
    show). A missing config, a bad checkpoint or config file is named before anything is built."""
    check_config_given(command, args)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if ckpt_path is not None:
        read_checkpoint(ckpt_path)
    check_config_files(args)
    cli = run_cli(args, run=False)
    if ckpt_path is not None:
        load_weights(cli.model, ckpt_path)
    return cli
