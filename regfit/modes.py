"""How a term touches training: coupled, decoupled or proximal.

Each mode acts once per real optimizer step, on *buckets*: the tensors of one term that
share an optimizer param group and one coefficient λ·c, so one ``torch._foreach_*`` call
serves them all. Like torch's optimizers, a mode skips parameters that have no gradient in
this step (``p.grad is None``).

=============  ==========================================  ===============================
mode           update                                      when
=============  ==========================================  ===============================
coupled        g ← g + λ·c·∇R(w)                           after backward (and clipping),
                                                           before the update; ≡ adding
                                                           λ·c·R to the loss
decoupled      w ← w − η·λ·c·∇R(w)                         before the update (AdamW)
proximal       w ← prox_{η·λ·c·R}(w)                       after the update
cautious       w ← w − η·λ·c·𝕀(u ⊙ ∇R(w) ≥ 0) ⊙ ∇R(w)      after the update u, with the
                                                           weights from before it
=============  ==========================================  ===============================

``coupled L2 + SGD`` ≡ ``SGD(weight_decay=λ)``; ``decoupled L2 + Adam`` ≡
``AdamW(weight_decay=λ)`` — bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

import torch
from torch import Tensor

from regfit.hyperparams import Hyperparams
from regfit.penalties import Penalty
from regfit.sharding import is_sharded, local

__all__ = ["Mode", "Coupled", "Decoupled", "CautiousDecoupled", "Proximal", "Bucket", "ModeSpec", "resolve_mode"]

Phase = Literal["gradient", "pre_update", "post_update"]


@dataclass
class Bucket:
    """Tensors of one term in one optimizer param group, sharing the coefficient ``coeff`` (= c).

    ``group`` is the optimizer's live param-group dict, so the current learning rate is
    read at every step; ``initial_lr`` and ``max_lr`` are what the decoupled step-size
    variants need. ``out_dim`` 1 means the kernels get each tensor (and gradient)
    transposed, its output units first (HF ``Conv1D``, transposed convs), for penalties
    that act on rows. ``views`` (one ``(dim, start, length)`` per parameter) instead hands
    the kernels ``p.transpose(0, dim).narrow(0, start, length)``: the slices of one unit
    group (:mod:`regfit.units`), whose tensors hold the unit along different dims, or only
    some of their rows (a BatchNorm after a concatenation).
    """

    params: list[Tensor]
    coeff: float
    group: dict
    initial_lr: float = 0.0
    max_lr: float = 0.0
    names: list[str] = field(default_factory=list)
    out_dim: int = 0
    views: list[tuple[int, int, int]] | None = None
    #: scratch space a mode may keep between ``prepare`` and ``apply`` of one step
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    _sharded: bool | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def lr(self) -> float:
        return float(self.group["lr"])

    def stepping_indices(self) -> list[int]:
        """Positions in ``params`` of the parameters that take a step now: those with a
        gradient, as torch's optimizers decide (the one place this rule lives)."""
        return [i for i, p in enumerate(self.params) if p.grad is not None]

    def stepping(self) -> list[Tensor]:
        """The stepping parameters as the tensors the kernels update in place: a sharded
        (DTensor) parameter as its local shard."""
        return self.stepping_with_grads()[0]

    def stepping_grads(self) -> list[Tensor]:
        """The gradients of :meth:`stepping`'s parameters, in the same order and form."""
        return self.stepping_with_grads()[1]

    def stepping_with_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`stepping` and :meth:`stepping_grads` in one pass over the parameters (this
        runs every step; no per-tensor call unless the bucket holds shards)."""
        params, grads = [], []
        for p in self.params:
            g = p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
        if self.views is not None:  # a unit group (never sharded: refused at assignment)
            views = [v for p, v in zip(self.params, self.views) if p.grad is not None]
            return [unit_view(p, v) for p, v in zip(params, views)], [unit_view(g, v) for g, v in zip(grads, views)]
        if self._has_shards():
            params, grads = [local(p) for p in params], [local(g) for g in grads]
        if self.out_dim:  # views: the kernels' in-place writes reach the parameter
            return [p.transpose(0, 1) for p in params], [g.transpose(0, 1) for g in grads]
        return params, grads

    def _has_shards(self) -> bool:
        # Looked at on the first step, when binding has filled ``params``; a re-bind makes
        # new buckets (and FSDP's sharding makes new parameters, never changes these).
        if self._sharded is None:
            self._sharded = any(map(is_sharded, self.params))
        return self._sharded


def unit_view(t: Tensor, view: tuple[int, int, int]) -> Tensor:
    """The rows ``start … start + length`` of ``t`` with dim ``dim`` first (a view: writes reach ``t``)."""
    dim, start, length = view
    if t.ndim == 0:
        return t
    t = t.transpose(0, dim) if dim else t
    return t if start == 0 and length == t.shape[0] else t.narrow(0, start, length)


class Mode(Hyperparams):
    """Base class. ``phase`` says at which point of the step :meth:`apply` runs."""

    phase: ClassVar[Phase]
    name: ClassVar[str]

    def apply(self, penalty: Penalty, bucket: Bucket, strength: float) -> None:
        raise NotImplementedError

    def prepare(self, penalty: Penalty, bucket: Bucket) -> None:
        """Called before the optimizer update of every real step (after backward), for a
        mode that needs the pre-update weights; the default does nothing."""

    @property
    def prepares(self) -> bool:
        """Whether this mode defines :meth:`prepare` (the step engine skips it otherwise)."""
        return type(self).prepare is not Mode.prepare

    def step_size(self, bucket: Bucket) -> float:
        """η in the update formula (1 for coupled: the optimizer supplies the step)."""
        return 1.0


class Coupled(Mode):
    """Add λ·c·∇R to the data gradient; the optimizer's momentum / Adam scaling then acts
    on it exactly as on torch's own ``weight_decay``."""

    phase = "gradient"
    name = "coupled"

    def apply(self, penalty, bucket, strength):
        params, grads = bucket.stepping_with_grads()
        if params and strength:
            penalty.add_grad_(grads, params, alpha=strength * bucket.coeff)


class Decoupled(Mode):
    """Shrink the weights directly, before the optimizer update (Loshchilov & Hutter, AdamW).

    Args:
        step: the step size η multiplying λ·c·∇R:
            ``lr`` — the param group's current lr (torch AdamW);
            ``independent`` — lr_t / lr_0, so λ is a per-step fraction independent of the
            peak lr (Wortsman et al. 2023);
            ``corrected`` — lr_t² / lr_max, lr_max the largest lr seen so far (AdamC 2025).
    """

    phase = "pre_update"
    name = "decoupled"

    def __init__(self, step: Literal["lr", "independent", "corrected"] = "lr") -> None:
        if step not in ("lr", "independent", "corrected"):
            raise ValueError(f"Decoupled(step={step!r}): use 'lr', 'independent' or 'corrected'.")
        self.step = step

    def step_size(self, bucket):
        lr = bucket.lr
        if self.step == "lr":
            return lr
        if self.step == "independent":
            return lr / bucket.initial_lr if bucket.initial_lr else 0.0
        bucket.max_lr = max(bucket.max_lr, lr)
        return lr * lr / bucket.max_lr if bucket.max_lr else 0.0

    def apply(self, penalty, bucket, strength):
        params = bucket.stepping()
        alpha = self.step_size(bucket) * strength * bucket.coeff
        if params and alpha:
            penalty.decay_(params, alpha)


class CautiousDecoupled(Decoupled):
    r"""Cautious weight decay: a decoupled step applied only on the coordinates where the
    optimizer's update agrees in sign with the penalty's gradient (Chen et al. 2025,
    arXiv:2510.12402).

    .. math::  w_{t+1} = w_t - \eta_t u_t - \eta\lambda c\;
               \mathbb{1}[u_t \odot \nabla R(w_t) \ge 0] \odot \nabla R(w_t)

    where the optimizer's own step is ``w ← w − η·u``. For ``L2`` (∇R = w) this is the
    paper's rule 𝕀(u ⊙ w ≥ 0): decay only weights the update already pushes towards 0,
    never fight an update that moves a weight away from 0. For ``L1`` (∇R = sign w) the
    mask is the same.

    The update direction exists only after the optimizer step, so the mode works in two
    halves: ``prepare`` (before the update) keeps a copy of the weights w_t, and ``apply``
    (after the update) reads sign(u) = sign(w_t − w_{t+1}) from the change and decays
    with ∇R(w_t). This holds for any optimizer (SGD, Adam, Lion, …) and costs one copy of
    the selected weights during the step. An update too small to change a weight in its
    floating-point format counts as u = 0 (decayed, as 𝕀(·≥0) says). Under a GradScaler a
    skipped step neither copies nor decays.

    Args:
        step: η, as for :class:`Decoupled` (``lr``, ``independent``, ``corrected``).
    """

    phase = "post_update"
    name = "cautious"

    def prepare(self, penalty, bucket):
        params = bucket.stepping()
        bucket.state["before"] = (params, torch._foreach_clone(params) if params else [])

    def apply(self, penalty, bucket, strength):
        params, before = bucket.state.pop("before", ((), ()))
        alpha = self.step_size(bucket) * strength * bucket.coeff
        if not params or not alpha:
            return
        for w, w0 in zip(params, before):
            g = penalty.grad(w0)
            # −u ∝ w_{t+1} − w_t; the mask keeps coordinates where u·∇R ≥ 0.
            agree = (w0 - w).mul_(g) >= 0
            w.sub_(g.mul_(agree), alpha=alpha)


class Proximal(Mode):
    """Replace the weights by ``prox_{η·λ·c·R}`` after the optimizer update, η = current lr
    (proximal gradient descent; exact zeros for L1, L1/2 and group lasso)."""

    phase = "post_update"
    name = "proximal"

    def step_size(self, bucket):
        return bucket.lr

    def apply(self, penalty, bucket, strength):
        params = bucket.stepping()
        t = self.step_size(bucket) * strength * bucket.coeff
        if params and t:
            penalty.prox_(params, t)


ModeSpec = Union[Literal["coupled", "decoupled", "proximal", "cautious"], Mode]
_BY_NAME = {"coupled": Coupled, "decoupled": Decoupled, "proximal": Proximal, "cautious": CautiousDecoupled}


def resolve_mode(mode: ModeSpec) -> Mode:
    """A Mode instance from an instance or its name."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str) and mode in _BY_NAME:
        return _BY_NAME[mode]()
    if isinstance(mode, type) and issubclass(mode, Mode):
        raise ValueError(f"mode={mode.__name__} is a class; pass an instance, {mode.__name__}().")
    raise ValueError(
        f"Unknown mode {mode!r}. Use 'coupled', 'decoupled', 'proximal' or 'cautious' "
        "(or regfit.modes.Decoupled(step='independent') for a step-size variant)."
    )
