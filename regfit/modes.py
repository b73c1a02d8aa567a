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
=============  ==========================================  ===============================

``coupled L2 + SGD`` ≡ ``SGD(weight_decay=λ)``; ``decoupled L2 + Adam`` ≡
``AdamW(weight_decay=λ)`` — bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

from torch import Tensor

from regfit.penalties import Penalty

__all__ = ["Mode", "Coupled", "Decoupled", "Proximal", "Bucket", "ModeSpec", "resolve_mode"]

Phase = Literal["gradient", "pre_update", "post_update"]


@dataclass
class Bucket:
    """Tensors of one term in one optimizer param group, sharing the coefficient ``coeff`` (= c).

    ``group`` is the optimizer's live param-group dict, so the current learning rate is
    read at every step; ``initial_lr`` and ``max_lr`` are what the decoupled step-size
    variants need.
    """

    params: list[Tensor]
    coeff: float
    group: dict
    initial_lr: float = 0.0
    max_lr: float = 0.0
    names: list[str] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return float(self.group["lr"])

    def stepping(self) -> list[Tensor]:
        """The parameters that take a step now: those with a gradient."""
        return [p for p in self.params if p.grad is not None]


class Mode:
    """Base class. ``phase`` says at which point of the step :meth:`apply` runs."""

    phase: ClassVar[Phase]
    name: ClassVar[str]

    def apply(self, penalty: Penalty, bucket: Bucket, strength: float) -> None:
        raise NotImplementedError

    def step_size(self, bucket: Bucket) -> float:
        """η in the update formula (1 for coupled: the optimizer supplies the step)."""
        return 1.0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class Coupled(Mode):
    """Add λ·c·∇R to the data gradient; the optimizer's momentum / Adam scaling then acts
    on it exactly as on torch's own ``weight_decay``."""

    phase = "gradient"
    name = "coupled"

    def apply(self, penalty, bucket, strength):
        params = bucket.stepping()
        if params and strength:
            penalty.add_grad_([p.grad for p in params], params, alpha=strength * bucket.coeff)


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


ModeSpec = Union[Literal["coupled", "decoupled", "proximal"], Mode]
_BY_NAME = {"coupled": Coupled, "decoupled": Decoupled, "proximal": Proximal}


def resolve_mode(mode: ModeSpec) -> Mode:
    """A Mode instance from an instance or its name."""
    if isinstance(mode, Mode):
        return mode
    if isinstance(mode, str) and mode in _BY_NAME:
        return _BY_NAME[mode]()
    raise ValueError(
        f"Unknown mode {mode!r}. Use 'coupled', 'decoupled' or 'proximal' "
        "(or regfit.modes.Decoupled(step='independent') for a step-size variant)."
    )
