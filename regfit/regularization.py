"""The ``Regularization`` callback: owns one term and applies it at the right moment.

Where each mode runs in Lightning's step (automatic optimization)::

    closure: forward → backward            (inside optimizer.step, or before it under AMP)
    on_before_optimizer_step               ← decoupled decay (grads unscaled, weights unchanged)
    configure_gradient_clipping            ← coupled gradient, after clipping (RegModule)
    optimizer update
    optimizer step post-hook               ← proximal step, cautious decay (never fires for a
                                             skipped AMP step)

Coupled gradients are added *after* clipping, as torch's own ``weight_decay`` is (it is
added inside ``optimizer.step``, after any clipping), so ``coupled L2`` with clipping still
equals ``SGD(weight_decay=λ)``. With a model that is not a :class:`~regfit.RegModule` (or
under manual optimization) there is no after-clip hook, so the gradient is added in
``on_before_optimizer_step``.

Under a GradScaler (``16-mixed``), the decoupled decay is deferred to an optimizer step
pre-hook, which the scaler calls only when the step is really taken: a skipped step
applies no decay and no prox.

Under DDP every rank applies the term to its own replica after the gradients are
averaged (``on_before_optimizer_step`` runs after the all-reduce), so the replicas stay
identical and the term adds no collective communication of its own. Under FSDP2 /
``ModelParallelStrategy`` every rank applies it to its own shards; only the logged values
are summed over ranks, on logging steps (:mod:`regfit.sharding`).

Selection and binding to the optimizers' param groups (again after a resume replaced
them) follow :mod:`regfit.binding`, shared with :class:`~regfit.constrain.Constrain`; the
term's state from a checkpoint is applied in ``on_train_start``, once the binding is live.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from regfit.binding import BoundCallback
from regfit.guard import OnNonFinite, apply_guarded, check_weights
from regfit.modes import Bucket, Mode, ModeSpec, resolve_mode
from regfit.penalties import Penalty, resolve_penalty
from regfit.scaling import ScaleRule
from regfit.schedules import Schedule
from regfit.selection import Selector
from regfit.term import Assignment, Override, Term

__all__ = ["Regularization", "regularizations", "is_logging_step"]

log = logging.getLogger(__name__)


class Regularization(BoundCallback):
    """Apply ``λ · Σ c(w)·R(w)`` to the selected parameters of the model being fit.

    Args:
        penalty: a :class:`~regfit.penalties.Penalty` or a short name
            (``l2``, ``l1``, ``elasticnet``, ``lp``, ``lhalf``, ``grouplasso``).
        strength: λ ≥ 0. With ``L2`` it is torch's ``weight_decay``.
        mode: ``coupled``, ``decoupled``, ``proximal`` or a :mod:`regfit.modes` object.
        include: rules selecting parameters (default: all trainable ones); see
            :mod:`regfit.selection` for keywords, ``type:…`` and globs.
        exclude: rules removing parameters, e.g. ``["bias", "norm", "last_layer"]``.
        scale: per-tensor multiplier of λ: ``none``, ``numel``, ``fan`` or a callable.
        name: the term's name in logs (``train/penalty/<name>``); defaults to the
            penalty's short name. Two terms in one run need different names: the name
            keys their logs and checkpoint state (Lightning refuses two callbacks with one
            ``state_key``).
        schedule: a :mod:`regfit.schedules` object making λ a function of the step,
            λ_t = λ·m(t) with t = ``trainer.global_step`` (so it resumes where it stopped);
            logged as ``train/strength/<name>``. Default: constant λ.
        overrides: per-selector strength multipliers, e.g.
            ``[Override(include=["head.*"], strength_mult=0.1)]`` (YAML:
            ``[{include: ["head.*"], strength_mult: 0.1}]``); folded into each parameter's
            coefficient c, so ``regfit groups`` shows them.
        on_nonfinite: what happens when the term's update would write NaN/inf into the
            gradients or weights (see :mod:`regfit.guard`): ``raise`` (default) undoes it
            and stops with an error naming the term and parameters; ``skip`` undoes it,
            warns, and trains on; ``off`` does not check. Built-in penalties are checked
            on logging steps only (their updates are finite for finite weights); your
            own penalties every step, at a copy, a reduction and a host sync.

    Example::

        trainer = L.Trainer(callbacks=[
            Regularization(L2(), strength=1e-4, exclude=["bias", "norm", "last_layer"], scale="fan"),
            Regularization(L1(), strength=1e-5, mode="proximal", include=["body.0.*"]),
        ])
    """

    kind = "Term"

    def __init__(
        self,
        penalty: Penalty | str = "l2",
        strength: float = 1e-4,
        mode: ModeSpec = "coupled",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        scale: ScaleRule = "none",
        name: str | None = None,
        schedule: Schedule | None = None,
        overrides: Sequence[Override] = (),
        on_nonfinite: OnNonFinite = "raise",
    ) -> None:
        if on_nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r}: use 'raise', 'skip' or 'off'.")
        self.on_nonfinite = on_nonfinite
        penalty = resolve_penalty(penalty)
        super().__init__(penalty.name if name is None else name)
        self.term = Term(
            penalty=penalty,
            strength=strength,
            selector=Selector(include=include, exclude=exclude),
            scale=scale,
            mode=resolve_mode(mode),
            name=self.name,
            schedule=schedule,
            overrides=overrides,
        )
        self._armed: set[int] = set()
        self._loaded_state: dict[str, Any] | None = None

    # The term holds what BoundCallback selects and binds.
    @property
    def assignments(self) -> list[Assignment]:
        return self.term.assignments

    @property
    def buckets(self) -> list[Bucket]:
        return self.term.buckets

    @buckets.setter
    def buckets(self, buckets: list[Bucket]) -> None:
        self.term.buckets = buckets

    def __repr__(self) -> str:
        t = self.term
        return (
            f"Regularization({t.penalty!r}, strength={t.strength!r}, mode={t.mode!r}, "
            f"include={list(t.selector.include)}, exclude={list(t.selector.exclude)}, scale={t.scale!r}, name={t.name!r}"
            + (f", schedule={t.schedule!r}" if t.schedule is not None else "")
            + (f", overrides={list(t.overrides)!r}" if t.overrides else "")
            + ")"
        )

    # ---- resolution (selection and binding: BoundCallback) ---------------------------------
    def select(self, pl_module: pl.LightningModule) -> None:
        self.term.assign(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._defer_coupled = isinstance(pl_module, _reg_module_type()) and pl_module.automatic_optimization
        n = sum(a.param.numel() for a in self.assignments)
        log.info("Term %r: %s, λ=%g, %s on %d tensors (%d weights).", self.name, self.term.penalty,
                 self.term.strength, self.term.mode, len(self.assignments), n)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # rebinds if a resume replaced the groups
        if self._loaded_state is not None:  # the term's state from the checkpoint
            self._restore(self._loaded_state)
            self._loaded_state = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Steps already taken (restored on resume): what the strength schedule reads.
        self.term.step = trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._armed.clear()

    # ---- the step -----------------------------------------------------------------------
    def _run(self, phase: str, optimizer: torch.optim.Optimizer) -> None:
        # A mode that acts after the update may need w_t (one that defines prepare).
        prepares = phase == "pre_update" and type(self.term.mode).prepare is not Mode.prepare
        if not prepares and self.term.mode.phase != phase:
            return
        group_ids = {id(g) for g in optimizer.param_groups}
        if prepares:
            self.term.prepare(group_ids)
        if self.term.mode.phase == phase:
            apply_guarded(self.term, group_ids, self.on_nonfinite)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._defer_coupled:
            self._run("gradient", optimizer)
        if self._scaler is None:
            self._run("pre_update", optimizer)
        else:
            self._armed.add(id(optimizer))

    def after_gradient_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by :class:`~regfit.RegModule` once gradients are clipped."""
        if self._defer_coupled:
            self._run("gradient", optimizer)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if id(optimizer) in self._armed:
            self._armed.discard(id(optimizer))
            self._run("pre_update", optimizer)

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._run("post_update", optimizer)

    # ---- logging ------------------------------------------------------------------------
    def penalty_value(self) -> torch.Tensor:
        """This term's λ·Σ c·R(w) at the current weights (no graph)."""
        return self.term.value()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not is_logging_step(trainer):
            return
        norm, sparsity = self.term.weight_stats()
        check_weights(self.term, norm, self.on_nonfinite)
        pl_module.log(f"weights/norm/{self.name}", norm, on_step=True, on_epoch=False)
        pl_module.log(f"weights/sparsity/{self.name}", sparsity, on_step=True, on_epoch=False)
        pl_module.log(f"train/strength/{self.name}", float(self.term.strength_now()), on_step=True, on_epoch=False)
        if not isinstance(pl_module, _reg_module_type()):
            pl_module.log(f"train/penalty/{self.name}", self.penalty_value(), on_step=True, on_epoch=False)

    # ---- checkpoint ---------------------------------------------------------------------
    def config(self) -> dict[str, str]:
        """The term's settings as strings, saved in checkpoints to detect a changed config."""
        t = self.term
        return {"penalty": repr(t.penalty), "strength": repr(t.strength), "mode": repr(t.mode),
                "include": repr(list(t.selector.include)), "exclude": repr(list(t.selector.exclude)),
                "scale": repr(t.scale), "name": repr(t.name), "schedule": repr(t.schedule),
                "overrides": repr(list(t.overrides))}

    def state_dict(self) -> dict[str, Any]:
        # max_lr: the largest lr seen per bucket, which Decoupled(step="corrected") divides by.
        return {"config": self.config(), "max_lr": [b.max_lr for b in self.term.buckets]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, once the buckets exist (they need the restored optimizers).
        self._loaded_state = dict(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        # The strength schedule needs no state: it reads trainer.global_step, restored by Lightning.
        changes = _config_changes(state.get("config"), self.config())
        if changes:
            rank_zero_warn(
                f"Term {self.name!r}: the checkpoint was trained with a different regularization config; "
                f"resuming with the current one. Changed: {'; '.join(changes)}."
            )
        max_lr = state.get("max_lr", [])
        if len(max_lr) == len(self.term.buckets):
            for bucket, value in zip(self.term.buckets, max_lr):
                bucket.max_lr = max(bucket.max_lr, float(value))
        elif max_lr:
            rank_zero_warn(f"Term {self.name!r}: the checkpoint has {len(max_lr)} parameter buckets, this run "
                           f"{len(self.term.buckets)}; the step-size state (max_lr) starts afresh.")


def _config_changes(saved: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """Human-readable differences ``key: saved → current`` between two configs."""
    if not saved:
        return []
    keys = list(current) + [k for k in saved if k not in current]
    return [f"{k}: {saved.get(k, '(absent)')} → {current.get(k, '(absent)')}" for k in keys if saved.get(k) != current.get(k)]


def regularizations(trainer: pl.Trainer | None) -> list[Regularization]:
    """The Regularization callbacks of a trainer (empty without one)."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, Regularization)]


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers at this step."""
    if not trainer.loggers:
        return False
    return bool(trainer._logger_connector.should_update_logs)


def _reg_module_type() -> type:
    from regfit.module import RegModule  # the module imports this file

    return RegModule
