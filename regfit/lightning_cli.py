"""``RegfitCLI``: the LightningCLI behind ``regfit fit|validate|test|predict``, and :func:`run_cli`.

The YAML sections are the constructor signatures: ``model:`` (any :class:`~regfit.RegModule`
subclass by ``class_path``), ``data:`` (any LightningDataModule), ``regularization:`` (one
:class:`~regfit.Regularization`; more as ``trainer.callbacks`` entries), ``optimizer:``,
``lr_scheduler:`` and ``trainer:``. The subcommands that build a run without training
(``regfit groups``, sweeps) import :func:`run_cli` from here; the dispatcher
:mod:`regfit.cli` only routes the command line.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from regfit.callback import check_distinct_names
from regfit.module import RegModule
from regfit.regularization import Regularization
from regfit.wandb_setup import configure_wandb
from regfit.weight_histograms import WeightHistograms, wandb_loggers

__all__ = ["RegfitCLI", "RegfitSaveConfig", "run_cli", "load_weights"]

log = logging.getLogger("regfit")


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
    raised (:func:`regfit.cli.main` prints them as one paragraph).
    """
    # Passing args is the point here (main() strips --debug, groups its own name), so
    # Lightning's "args and sys.argv both given" warning does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return RegfitCLI(args=list(args), run=run, **kwargs)


def load_weights(model: LightningModule, ckpt_path: str) -> None:
    """The weights of a Lightning checkpoint (``state_dict``) into ``model``, as ``regfit fit
    --ckpt_path`` would resume them; a file that is not such a checkpoint, or one for
    another model, is a :class:`~regfit.errors.UsageError` naming the fix."""
    import torch

    from regfit.errors import UsageError

    try:
        # The checkpoint is the user's own file, as for Lightning's --ckpt_path: it holds
        # hyperparameters and callback states besides tensors.
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same mistake
        raise UsageError(f"--ckpt_path {ckpt_path} is not a checkpoint torch can read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}). Give a .ckpt file that regfit fit saved, "
                         "e.g. lightning_logs/version_0/checkpoints/last.ckpt.") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UsageError(f"--ckpt_path {ckpt_path} holds no state_dict: it is not a Lightning checkpoint. Give a .ckpt "
                         "file that regfit fit saved.")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise UsageError(f"--ckpt_path {ckpt_path} was not saved from the model of this config "
                         f"({type(model).__name__}): {' '.join(line.strip() for line in first[:3])} Give the config "
                         "the checkpoint was trained with (and the same --model.init_args overrides).") from None
