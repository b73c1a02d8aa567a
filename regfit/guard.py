"""Non-finite guard: a term's update never silently writes NaN or inf into training.

A term writes either gradients (``coupled``) or weights (``decoupled``, ``proximal``).
With the built-in penalties a non-finite result can only come from non-finite weights
(the data step diverged) or from an overflow; with a user :class:`~regfit.penalties.Penalty`
it can also come from its ``value``/``grad``/``prox`` (e.g. ``log(w)`` at ``w ≤ 0``).

Built-in penalties are finite for finite input (the penalty test harness checks this at
0, ±1e-30 and ±1e6, and in float32, bfloat16 and float16), and so are subclasses that
only rename them (no method of their own: :func:`finite_for_finite_input`). They cannot
*cause* NaN/inf, and checking them every step would cost a copy and a host sync per step
for nothing. For them a non-finite value can only mean the weights already diverged;
that is caught on logging steps, where the weight norm is computed (and synchronized)
anyway: :func:`check_weights`.

Any other penalty (a user's ``value``/``grad``/``prox``, a subclass with methods of its
own, the matrix penalties) is guarded every step: the guard keeps a copy of the tensors
the term writes, applies the term, checks with one fused reduction and one host sync,
and if the *term* made a finite tensor non-finite restores it from the copy, so weights
and gradients are exactly what they were before the term ran; then:

* ``raise`` — :class:`NonFinitePenaltyError` names the term and the parameters; training
  stops cleanly (Lightning runs its exception teardown, loggers are finalized, the last
  checkpoint on disk is untouched);
* ``skip`` — a warning names them and the step goes on without this term's update.

A gradient that was already non-finite before the term (the data gradient of a step that
a ``16-mixed`` GradScaler is about to skip) is not the term's doing and is left alone.

Cost per step and guarded term: one copy and one read of the written tensors and one host
sync. ``off`` removes them.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import Tensor

from regfit.modes import Coupled, Decoupled
from regfit.penalties import BUILTINS, L2
from regfit.sharding import all_ranks_agree, local
from regfit.term import OnNonFinite, Term

__all__ = [
    "NonFinitePenaltyError",
    "OnNonFinite",
    "apply_guarded",
    "all_finite",
    "check_weights",
    "check_value",
    "stability_problem",
    "finite_for_finite_input",
]

log = logging.getLogger(__name__)

class NonFinitePenaltyError(FloatingPointError):
    """A term produced NaN or inf; the message names the term and the parameters."""


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one reduction per tensor, one sync)."""
    if not tensors:
        return True
    # A sum is NaN/inf if any entry is; it is the cheapest reduction (an inf-norm is 20×
    # slower on CPU). A finite tensor whose sum overflows is rechecked entry-wise.
    if bool(torch.stack([t.sum() for t in tensors]).isfinite().all()):
        return True
    return all(bool(t.isfinite().all()) for t in tensors)


# Closed-form kernels that map finite weights (and gradients) to finite results.
_FINITE_FOR_FINITE_INPUT = tuple(b.cls for b in BUILTINS if b.finite)


@functools.lru_cache(maxsize=None)
def finite_for_finite_input(cls: type) -> bool:
    """Whether penalties of type ``cls`` run a built-in kernel: a built-in type, or a
    subclass of one that defines no method of its own (only a ``name``, a docstring or
    other plain attributes). A subclass that defines any method — ``value``, ``grad``,
    ``prox``, a kernel, even ``__init__`` — may leave the domain and is guarded."""
    mro = cls.__mro__
    for i, base in enumerate(mro):
        if base in _FINITE_FOR_FINITE_INPUT:
            return not any(callable(v) or isinstance(v, (staticmethod, classmethod, property))
                            for sub in mro[:i] for v in vars(sub).values())
    return False


def _targets(term: Term, group_ids: set[int] | None) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """(names, tensors, params) the term writes in this step: grads or weights that have a
    grad, a sharded one as its local shard (what the kernels write), and their parameters."""
    writes_grad = term.mode.phase == "gradient"
    names, tensors, params = [], [], []
    for bucket in term.buckets:
        if group_ids is not None and id(bucket.group) not in group_ids:
            continue
        idx = bucket.stepping_indices()
        names += [bucket.names[i] for i in idx]
        tensors += bucket.stepping_grads() if writes_grad else bucket.stepping()
        params += [bucket.params[i] for i in idx]
    return names, tensors, params


def apply_guarded(term: Term, group_ids: set[int] | None, on_nonfinite: OnNonFinite | None = None,
                  grad_scale: float = 1.0) -> None:
    """``term.apply(group_ids, grad_scale)``, rolled back and reported if it writes NaN/inf.
    ``on_nonfinite`` defaults to the term's own setting."""
    on_nonfinite = term.on_nonfinite if on_nonfinite is None else on_nonfinite
    if on_nonfinite == "off" or finite_for_finite_input(type(term.penalty)):
        term.apply(group_ids, grad_scale)  # no per-step sync: see the module docstring and check_weights
        return
    names, tensors, params = _targets(term, group_ids)
    with torch.no_grad():
        backup = [t.clone() for t in tensors]
        term.apply(group_ids, grad_scale)
        # Each rank checked its own shards; all of them undo (or keep) the update together.
        if all_ranks_agree(all_finite(tensors), params):
            return
        caused = [n for n, t, b in zip(names, tensors, backup) if not t.isfinite().all() and b.isfinite().all()]
        if not caused and all_finite(tensors):  # sharded: the non-finite shard is on another rank
            caused = ["a shard on another rank"]
        before = [n for n, b in zip(names, backup) if not b.isfinite().all()]
        torch._foreach_copy_(tensors, backup)
    what = "gradient" if term.mode.phase == "gradient" else "weights"
    if caused:
        msg = (f"Term {term.name!r} ({term.penalty!r}, {term.mode.name}, λ={term.strength_now():g}) made the {what} "
               f"of {_names(caused)} non-finite (NaN/inf); its update was undone, the {what} are unchanged. "
               "Check the penalty for values outside its domain (e.g. log or sqrt of w ≤ 0) or an overflowing λ.")
        if on_nonfinite == "raise":
            raise NonFinitePenaltyError(msg + " Pass on_nonfinite='skip' to drop the term's update on such steps instead.")
        log.warning("%s Skipped this step's update of the term (on_nonfinite='skip').", msg)
    elif before and what == "weights":
        _diverged(term, before, on_nonfinite)


def _weights_diverged(term: Term, on_nonfinite: OnNonFinite) -> bool:
    """Report the term's tensors that hold NaN/inf, if any (True then)."""
    bad = [a.name for a in term.assignments if not torch.isfinite(local(a.param)).all()]
    if bad:
        _diverged(term, bad, on_nonfinite)
    return bool(bad)


def check_weights(term: Term, norm: Tensor, on_nonfinite: OnNonFinite | None = None) -> None:
    """On a logging step: report weights that are already non-finite. ``norm`` is the
    term's weight norm, computed for logging anyway."""
    on_nonfinite = term.on_nonfinite if on_nonfinite is None else on_nonfinite
    if on_nonfinite == "off" or bool(torch.isfinite(norm)) or _weights_diverged(term, on_nonfinite):
        return
    # Every entry is finite but the norm overflowed: the weights are on their way to inf.
    largest = max(term.assignments, key=lambda a: float(local(a.param).detach().abs().max()))
    size = float(local(largest.param).detach().abs().max())
    _diverged(term, [largest.name], on_nonfinite, f"grew to |w| = {size:.3g}, so large that their norm overflows")


def check_value(term: Term, value: Tensor, on_nonfinite: OnNonFinite | None = None) -> None:
    """On a logging step: a penalty value λ·Σc·R(w) that is NaN/inf. At finite weights the
    penalty left its domain (``log(w)`` at w ≤ 0) or overflowed; at non-finite weights
    the run diverged (see :func:`check_weights`)."""
    on_nonfinite = term.on_nonfinite if on_nonfinite is None else on_nonfinite
    if on_nonfinite == "off" or bool(torch.isfinite(value)) or _weights_diverged(term, on_nonfinite):
        return
    msg = (f"Term {term.name!r} ({term.penalty!r}, λ={term.strength_now():g}): its penalty value is {float(value)} at "
           "finite weights, so the logged penalty and train/loss are not numbers. The penalty leaves its domain "
           "(e.g. log or sqrt of w ≤ 0) or overflows: check value(w) for the weights it sees.")
    if on_nonfinite == "raise":
        raise NonFinitePenaltyError(msg + " Pass on_nonfinite='skip' to warn and train on.")
    log.warning(msg)


def stability_problem(term: Term) -> str | None:
    """Why the term's *own* update would blow the weights up at the current λ and lr, or
    None: a decoupled factor 1 − η·λ·c ≤ 0 (every step flips or zeroes the weights), a
    coupled ``L2`` on plain SGD with η·λ·c > 2(1 + momentum) (w ← w(1 − η·λ·c) grows
    geometrically), or a coupled gradient λ·c·w whose square overflows the weights' dtype
    in Adam's second moment (the weights stop moving)."""
    if math.isnan(term.strength):  # a timescale resolved later: checked once it is
        return None
    strength = term.strength_now()
    for bucket in term.buckets:
        lam = strength * bucket.coeff
        if not lam or not bucket.params:
            continue
        where = f"{bucket.names[0]}{' and others' if len(bucket.names) > 1 else ''}"
        if isinstance(term.mode, Decoupled) and type(term.mode) is Decoupled:
            a = term.mode.step_size(bucket) * lam
            if a >= 1:
                return (f"its decoupled step η·λ·c = {a:.3g} ≥ 1 on {where}: w ← w·(1 − η·λ·c) flips or zeroes the "
                        "weights every step. Lower the strength or the learning rate so that lr·λ·c < 1 "
                        "(typically ≤ 0.01).")
        if isinstance(term.mode, Coupled) and isinstance(term.penalty, L2):
            group = bucket.group
            if "betas" in group:  # Adam-like: g² in the second moment
                big = max(float(local(p).detach().abs().max()) for p in bucket.params if local(p).numel())
                limit = torch.finfo(bucket.params[0].dtype).max if bucket.params[0].is_floating_point() else math.inf
                if (lam * big) ** 2 >= limit:
                    return (f"its coupled gradient λ·c·w reaches {lam * big:.3g} on {where}, whose square overflows "
                            f"{bucket.params[0].dtype} in the optimizer's second moment: the weights would stop moving. "
                            "Lower the strength.")
            else:
                a = bucket.lr * lam
                momentum = float(group.get("momentum", 0.0) or 0.0)
                if a > 2 * (1 + momentum):
                    return (f"with lr = {bucket.lr:g}, λ·c = {lam:.3g} on {where}, the coupled step w ← w·(1 − lr·λ·c) "
                            f"has |1 − lr·λ·c| = {abs(1 - a):.3g} > 1 (momentum {momentum:g}): the weights grow "
                            "without bound whatever the data. Lower the strength or the learning rate.")
    return None


def _diverged(term: Term, names: list[str], on_nonfinite: OnNonFinite, what: str = "are non-finite") -> None:
    cause = stability_problem(term)
    if cause:
        msg = f"Term {term.name!r}: the weights of {_names(names)} {what}, and the term itself is the cause: {cause}"
    else:
        when = "were already non-finite before the term was applied" if what == "are non-finite" else what
        msg = (f"Term {term.name!r}: the weights of {_names(names)} {when}: the data step diverged (lower the learning "
               "rate, clip gradients, or check the loss).")
    if on_nonfinite == "raise":
        raise NonFinitePenaltyError(msg)
    log.warning(msg)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
