"""The ``Regularization`` callback: one term, selected at setup, run by the step engine.

Where each mode acts in a step is the step engine's business (:mod:`regfit.engine`): it
hangs on the optimizers' own step hooks, so it runs after backward *and* after gradient
clipping — whatever the module's ``configure_gradient_clipping`` does, for a plain
``LightningModule`` as for a :class:`~regfit.RegModule`, under automatic and manual
optimization — and not at all for a step a GradScaler skips. This callback selects and
binds the term (:mod:`regfit.callback`), sets the step the strength schedule reads, logs
the term, and keeps its state in checkpoints.

Under DDP every rank applies the term to its own replica after the gradients are
averaged (the engine acts after backward's all-reduce), so the replicas stay identical
and the term adds no collective communication of its own. Under FSDP2 /
``ModelParallelStrategy`` every rank applies it to its own shards; only the logged values
are summed over ranks, on logging steps (:mod:`regfit.sharding`).

Logging, on the steps whose metrics reach the loggers only: the term's penalty value is
computed at the start of the batch (the weights the data loss sees), its weight norm,
sparsity and strength at the end. The first ``Regularization`` of the trainer logs the
totals for all terms: ``train/penalty``, ``train/loss`` (= data loss + penalty),
``train/penalty/<term>`` and their epoch means — also for a module whose own
``training_step`` logs nothing of it.

Dynamics, on the same logging steps (:mod:`regfit.telemetry`, math in :mod:`regfit.dynamics`):
in ``on_before_optimizer_step`` — once per real step, after all micro-batches of a
gradient-accumulation window, with the data gradient unscaled and before any term acts —
the term's tensors are copied and the data gradient measured; after the step
``weights/angular_update/<term>``, ``weights/effective_lr/<term>``,
``weights/equilibrium_angle/<term>`` and ``weights/grad_ratio/<term>`` are logged. At the
first batch a probe finds which of the term's tensors are scale-invariant
(:mod:`regfit.invariance`); ``dynamics=False`` switches both off.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from regfit.callback import BoundCallback, is_logging_step
from regfit.guard import check_value, check_weights, stability_problem
from regfit.invariance import probe_run, probe_scale_invariance
from regfit.modes import ModeSpec, resolve_mode
from regfit.penalties import Penalty, resolve_penalty
from regfit.scaling import ScaleRule
from regfit.schedules import Schedule
from regfit.selection import Selector
from regfit.telemetry import StepTelemetry
from regfit.term import OnNonFinite, Override, Term
from regfit.timescale import check_timescale

__all__ = ["Regularization", "regularizations", "is_logging_step", "steps_per_epoch", "DEFAULT_STRENGTH"]

log = logging.getLogger(__name__)

#: λ when neither ``strength`` nor ``timescale`` is given
DEFAULT_STRENGTH = 1e-4


class Regularization(BoundCallback):
    """Apply ``λ · Σ c(w)·R(w)`` to the selected parameters of the model being fit.

    Args:
        penalty: a :class:`~regfit.penalties.Penalty` or a short name
            (``l2``, ``l1``, ``elasticnet``, ``lp``, ``lhalf``, ``grouplasso``).
        strength: λ ≥ 0 (default 1e-4 when no ``timescale`` is given). With ``L2`` it is
            torch's ``weight_decay``.
        mode: ``coupled``, ``decoupled``, ``proximal`` or a :mod:`regfit.modes` object.
        include: rules selecting parameters (default: all trainable ones); see
            :mod:`regfit.selection` for keywords, ``type:…`` and globs.
        exclude: rules removing parameters, e.g. ``["bias", "norm", "last_layer"]``.
        scale: per-tensor multiplier of λ: ``none``, ``numel``, ``fan`` or a callable.
        name: the term's name in logs (``train/penalty/<name>``); defaults to the
            penalty's short name. Two terms in one run need different names: the name
            keys their logs and checkpoint state (two with one name are an error at setup).
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
            own penalties every step, at a copy, a reduction and a host sync. The penalty
            value is checked on logging steps too.
        timescale: instead of ``strength``, for ``L2`` with ``mode="decoupled"`` (any
            optimizer) or ``mode="coupled"`` with SGD: ``{"epochs": τ}`` or ``{"steps": τ}``,
            the time constant of the decay. λ is resolved at train start, from the
            trainer's steps per epoch and the param group's base lr: λ = 1/(η₀·τ·steps_per_epoch)
            for ``decoupled`` (:mod:`regfit.timescale` has the other cases), and logged as
            ``train/strength/<name>``. Give exactly one of ``strength`` and ``timescale``.
        dynamics: log the term's dynamics on logging steps (``weights/angular_update/<name>``,
            ``weights/effective_lr/<name>``, ``weights/equilibrium_angle/<name>``,
            ``weights/grad_ratio/<name>``; see :mod:`regfit.dynamics`) and probe its
            tensors for scale invariance at the first batch. Costs a copy of the term's
            tensors during a logging step; ``False`` switches it off.

    ``strength`` can be set on the callback mid-run (``reg.strength = 5e-4``, e.g. from
    another callback); it is validated, logged and saved in checkpoints.

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
        strength: float | None = None,
        mode: ModeSpec = "coupled",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        scale: ScaleRule = "none",
        name: str | None = None,
        schedule: Schedule | None = None,
        overrides: Sequence[Override] = (),
        on_nonfinite: OnNonFinite = "raise",
        timescale: dict[str, float] | None = None,
        dynamics: bool = True,
    ) -> None:
        penalty = resolve_penalty(penalty)
        super().__init__(penalty.name if name is None else name)
        if not isinstance(dynamics, bool):
            raise ValueError(f"dynamics={dynamics!r}: give True (log the term's dynamics) or False.")
        self.term = Term(
            penalty=penalty,
            strength=DEFAULT_STRENGTH if strength is None and timescale is None else strength,
            selector=Selector(include=include, exclude=exclude),
            scale=scale,
            mode=resolve_mode(mode),
            name=self.name,
            schedule=schedule,
            overrides=overrides,
            on_nonfinite=on_nonfinite,
            timescale=timescale,
        )
        self.bound = self.term
        self.dynamics = dynamics
        #: which of the term's tensors the first batch's probe found scale-invariant (None: not probed)
        self.scale_invariant: dict[str, bool | None] = {}
        # the strength the run was configured with (None: it comes from the timescale)
        self._initial_strength = None if self.term.timescale else self.term.strength
        self._loaded_state: dict[str, Any] | None = None
        self._pending: torch.Tensor | None = None  # this batch's penalty value, to be logged
        self._telemetry = StepTelemetry(self.term)
        self._probed = False

    @property
    def strength(self) -> float:
        """λ now (before any schedule). Set it mid-run to change λ from the next step on: it
        is checked like the constructor's (and refused if the term's own step would then blow
        the weights up at the current lr), logged as ``train/strength/<name>`` and saved in
        checkpoints (a resumed run continues with it)."""
        return self.term.strength

    @strength.setter
    def strength(self, value: float) -> None:
        if self.term.timescale is not None:
            raise ValueError(f"Term {self.name!r}: λ comes from timescale={self.term.timescale!r}; change the "
                             "timescale (reg.timescale = {'epochs': τ}) or give the term a strength instead.")
        before = self.term.strength
        self.term.strength = value  # validated: a number ≥ 0
        problem = stability_problem(self.term)  # against the bound groups' current lr
        if problem:
            self.term.strength = before
            raise ValueError(f"Term {self.name!r}: strength={value!r} is refused, λ stays {before!r}: {problem}")

    @property
    def timescale(self) -> Mapping[str, float] | None:
        """The decay's time constant λ is resolved from (None for a term given a strength).
        Set it mid-run to change λ from the next step on (resolved at once)."""
        return self.term.timescale

    @timescale.setter
    def timescale(self, value: Mapping[str, float]) -> None:
        if self.term.timescale is None:
            raise ValueError(f"Term {self.name!r} was given a strength; set reg.strength, or build it with "
                             "timescale=... instead.")
        self.term.timescale = check_timescale(value)
        self.term.resolve_timescale()

    @property
    def on_nonfinite(self) -> OnNonFinite:
        return self.term.on_nonfinite

    def __repr__(self) -> str:
        settings = self.term.settings()
        defaults = {"strength": None, "schedule": None, "overrides": [], "on_nonfinite": "raise"}
        args = [repr(settings.pop("penalty"))] + [f"{k}={v!r}" for k, v in settings.items()
                                                   if not (k in defaults and v == defaults[k])]
        if not self.dynamics:
            args.append("dynamics=False")
        return f"Regularization({', '.join(args)})"

    # ---- fit start ------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # binds, checks and warns (regfit.engine.bind_checked)

    def _check_stability(self) -> None:
        """A λ resolved from a timescale at train start gets the check bind_checked gave the
        others at fit start: the term's own step must not blow the weights up at this lr."""
        problem = stability_problem(self.term)
        if problem:
            raise ValueError(f"Term {self.name!r} ({self.term.penalty!r}, {self.term.mode.name}, λ={self.term.strength:g}): "
                             f"{problem}")
        n = sum(a.param.numel() for a in self.assignments)
        given = f" (from timescale {self.term.timescale})" if self.term.timescale else ""
        log.info("Term %r: %s, λ=%g%s, %s on %d tensors (%d weights).", self.name, self.term.penalty,
                 self.term.strength, given, self.term.mode, len(self.assignments), n)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # rebinds if a resume replaced the groups
        if self.term.timescale is not None:  # the loaders exist now: steps per epoch are known
            deferred = math.isnan(self.term.strength)
            self.term.steps_per_epoch = steps_per_epoch(trainer)
            self.term.resolve_timescale()
            if deferred:
                self._check_stability()
        if self._loaded_state is not None:  # the term's state from the checkpoint
            self._restore(self._loaded_state)
            self._loaded_state = None

    # ---- each batch --------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # Steps already taken (restored on resume): what the strength schedule reads.
        self.term.step = trainer.global_step
        if self.dynamics and not self._probed and trainer.loggers:
            self._probe(pl_module, batch)
        # The penalty at the weights this batch's data loss sees (logging steps only).
        self._pending = None
        if is_logging_step(trainer):
            self._pending = self.penalty_value()
            check_value(self.term, self._pending)

    def _probe(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Which of the term's tensors are scale-invariant (once, on the first batch)."""
        self._probed = True
        run = probe_run(pl_module, batch)
        if run is None:
            return
        try:
            self.scale_invariant = probe_scale_invariance(pl_module, [(a.name, a.param) for a in self.assignments], run)
        except Exception as exc:  # noqa: BLE001 - a probe must never stop training
            log.info("Term %r: the scale-invariance probe could not run the model (%s).", self.name, exc)
            return
        yes = [n for n, v in self.scale_invariant.items() if v]
        log.info("Term %r: %d of %d tensors scale-invariant%s.", self.name, len(yes), len(self.scale_invariant),
                 f" ({', '.join(yes[:8])}{' …' if len(yes) > 8 else ''})" if yes else "")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Once per real step, after backward (all micro-batches) and unscaling, before
        # clipping and before any term acts: the data gradient and w_t (logging steps only).
        if self.dynamics and not self._telemetry.pending and is_logging_step(trainer) and self._telemetry.holds(optimizer):
            self._telemetry.before_step()

    def penalty_value(self) -> torch.Tensor:
        """This term's λ·Σ c·R(w) at the current weights (no graph)."""
        return self.term.value()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not is_logging_step(trainer):
            return
        norm, sparsity = self.term.weight_stats()
        check_weights(self.term, norm)
        pl_module.log(f"weights/norm/{self.name}", norm, on_step=True, on_epoch=False)
        pl_module.log(f"weights/sparsity/{self.name}", sparsity, on_step=True, on_epoch=False)
        pl_module.log(f"train/strength/{self.name}", float(self.term.strength_now()), on_step=True, on_epoch=False)
        if self._telemetry.pending:  # the step of this batch happened: measure it
            for key, value in self._telemetry.after_step().items():
                pl_module.log(f"{key}/{self.name}", value, on_step=True, on_epoch=False)
        terms = regularizations(trainer)
        if terms and terms[0] is self:  # the first term logs the totals of all
            _log_penalties(trainer, pl_module, outputs, terms)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Diverged weights are found on logging steps, where the norm is computed anyway; a
        # run without loggers (or logging less than once an epoch) is checked here, once an
        # epoch (one norm and one host sync).
        if self.term.on_nonfinite != "off" and not is_logging_step(trainer):
            check_weights(self.term, self.term.weight_stats()[0])

    # ---- checkpoint ---------------------------------------------------------------------
    def config(self) -> dict[str, str]:
        """The term's settings as strings, saved in checkpoints to detect a changed config."""
        settings = self.term.settings()
        settings["strength"] = self._initial_strength  # a mid-run change is state, not config
        return {k: repr(v) for k, v in settings.items()}

    def state_dict(self) -> dict[str, Any]:
        # max_lr: the largest lr seen per bucket, which Decoupled(step="corrected") divides by;
        # strength: λ now, which a mid-run change may have moved from the configured one.
        return {"config": self.config(), "max_lr": [b.max_lr for b in self.term.buckets],
                "strength": self.term.strength}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, once the buckets exist (they need the restored optimizers).
        self._loaded_state = dict(state_dict)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The first term looks for term states that no term of this run takes (a renamed
        # term, a changed penalty that changed the default name): said, not dropped silently.
        terms = regularizations(trainer)
        if not terms or terms[0] is not self:
            return
        keys = {cb.state_key for cb in trainer.callbacks}
        for key, state in (checkpoint.get("callbacks") or {}).items():
            if key.startswith("Regularization{") and key not in keys and isinstance(state, dict):
                saved = state.get("config") or {}
                rank_zero_warn(
                    f"The checkpoint holds the state of a term named {saved.get('name', key)} "
                    f"({saved.get('penalty', '?')}, mode {saved.get('mode', '?')}, strength {saved.get('strength', '?')}) "
                    f"that no term of this run has (this run's terms: {', '.join(repr(t.name) for t in terms)}); its "
                    "state is not restored. If you renamed the term or changed its penalty, give it the old name "
                    f"(name={saved.get('name', '...')}) to resume it."
                )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._telemetry.clear()  # a snapshot of a step that never ended (an exception)
        super().teardown(trainer, pl_module, stage)

    def _restore(self, state: dict[str, Any]) -> None:
        # The strength schedule needs no state: it reads trainer.global_step, restored by Lightning.
        changes = _config_changes(state.get("config"), self.config())
        if changes:
            rank_zero_warn(
                f"Term {self.name!r}: the checkpoint was trained with a different regularization config; "
                f"resuming with the current one. Changed: {'; '.join(changes)}."
            )
        saved = state.get("strength")
        if self.term.timescale is not None:
            # λ is resolved again from the timescale; it differs only if the batch size, the
            # loader or the base lr changed, and then the timescale is what the run asked for.
            if saved is not None and saved != self.term.strength and not any(c.startswith("timescale:") for c in changes):
                rank_zero_warn(
                    f"Term {self.name!r}: timescale={self.term.timescale} gives λ={self.term.strength:g} in this run "
                    f"and gave λ={saved:g} in the checkpoint's (the steps per epoch or the base lr changed); "
                    f"continuing with λ={self.term.strength:g}, the same timescale."
                )
        elif saved is not None and not any(c.startswith("strength:") for c in changes):
            self.term.strength = saved  # changed mid-run before the checkpoint: continue with it
        max_lr = state.get("max_lr", [])
        if len(max_lr) == len(self.term.buckets):
            for bucket, value in zip(self.term.buckets, max_lr):
                bucket.max_lr = max(bucket.max_lr, float(value))
        elif max_lr:
            rank_zero_warn(f"Term {self.name!r}: the checkpoint has {len(max_lr)} parameter buckets, this run "
                           f"{len(self.term.buckets)}; the step-size state (max_lr) starts afresh.")


def _config_changes(saved: dict[str, str] | None, current: dict[str, str]) -> list[str]:
    """Human-readable differences ``key: saved → current`` between two configs. A setting
    the checkpoint does not have (saved before regfit had it) is not a change."""
    if not saved:
        return []
    keys = [k for k in current if k in saved] + [k for k in saved if k not in current]
    return [f"{k}: {saved.get(k, '(absent)')} → {current.get(k, '(absent)')}" for k in keys if saved.get(k) != current.get(k)]


def steps_per_epoch(trainer: pl.Trainer) -> int | float:
    """Optimizer steps per training epoch: ⌈batches / accumulate_grad_batches⌉ (Lightning
    also steps on the last, incomplete window); ``inf`` for a loader without a length."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return batches
    return math.ceil(batches / trainer.accumulate_grad_batches)


def regularizations(trainer: pl.Trainer | None) -> list["Regularization"]:
    """The Regularization callbacks of a trainer (empty without one)."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, Regularization)]


def _log_penalties(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                   terms: Sequence[Regularization]) -> None:
    """``train/penalty/<term>``, ``train/penalty``, ``train/loss`` and their epoch means,
    from the values the terms computed at the start of the batch."""
    values = {t.name: t._pending for t in terms if t._pending is not None}
    data = _data_loss(trainer, pl_module, outputs)
    device = data.device if data is not None else None
    for name, value in values.items():
        value = value.to(device) if device is not None else value
        pl_module.log(f"train/penalty/{name}", value, on_step=True, on_epoch=False)
        pl_module.log(f"train/penalty_epoch/{name}", value, on_step=False, on_epoch=True)
    if not values:
        return
    total = torch.stack([v.to(device) if device is not None else v for v in values.values()]).sum()
    pl_module.log("train/penalty", total, on_step=True, on_epoch=False)
    # Epoch means over the logging steps, next to train/data_loss_epoch (no extra cost).
    pl_module.log("train/penalty_epoch", total, on_step=False, on_epoch=True)
    if data is not None:
        # at least float32 (a bf16 loss is upcast), and float64 stays float64
        data = data.detach().to(torch.promote_types(data.dtype, torch.float32))
        pl_module.log("train/loss", data + total, on_step=True, on_epoch=False)


def _data_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> torch.Tensor | None:
    """This batch's data loss: what a RegModule recorded, else the training step's loss
    (which Lightning divides by accumulate_grad_batches under automatic optimization)."""
    recorded = getattr(pl_module, "_regfit_data_loss", None)
    if recorded is not None:
        pl_module._regfit_data_loss = None
        return recorded
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        return None
    return loss.detach() * trainer.accumulate_grad_batches if pl_module.automatic_optimization else loss.detach()
