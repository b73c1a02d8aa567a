"""Which named parameters a term applies to.

A selector is a list of rules, each a predicate over ``(name, parameter, module)``; a
parameter is selected when it matches some ``include`` rule (all parameters when
``include`` is empty) and no ``exclude`` rule. A rule is written as a string:

* a **keyword**: ``bias``, ``norm`` (parameters of any torch norm layer), ``embedding``,
  ``last_layer`` (see :func:`last_layer`), ``ndim<2`` (biases, norm gains, scalars);
* ``type:NAME`` — parameters owned directly by a module of that class, by class name
  (``type:Conv2d``) or import path (``type:torch.nn.Conv2d``);
* anything else is a glob on the parameter's full name (``body.0.*``, ``*.weight``).

Parameters with ``requires_grad=False`` are never selected. Selection has no side
effects: it reports what matched and never touches ``requires_grad``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import Tensor, nn

__all__ = ["Selector", "SelectionError", "KEYWORDS", "last_layer", "last_parametrized_module", "named_parameters_with_modules"]

log = logging.getLogger(__name__)

# Every torch normalization layer with parameters. Norm gains/offsets are not decayed by
# convention: shrinking a LayerNorm gain towards 0 fights the normalization itself.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


class SelectionError(ValueError):
    """A selector rule is malformed or matches nothing."""


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter as the selector sees it."""

    name: str
    param: Tensor
    module: nn.Module  # the module that owns the parameter directly
    in_last_layer: bool


def last_layer(model: nn.Module) -> nn.Module | None:
    """The module whose parameters the ``last_layer`` keyword means.

    A model may name it by defining ``last_layer()`` (``RegModule`` subclasses can
    override it). Otherwise it is the last module, in registration order, that owns
    parameters directly — for the usual ``body → head`` layout, the classifier head.
    """
    custom = getattr(model, "last_layer", None)
    if not callable(custom):
        return last_parametrized_module(model)
    head = custom()
    if head is not None and not isinstance(head, nn.Module):
        shown = f"{head!r:.60}" if isinstance(head, (str, list, tuple)) else f"a {type(head).__name__}"
        raise SelectionError(
            f"{type(model).__name__}.last_layer() returned {shown}; it must return the head "
            "module itself (e.g. `return self.head`), or None for a model without one."
        )
    return head


def last_parametrized_module(model: nn.Module) -> nn.Module | None:
    """The last module, in registration order, that owns parameters directly."""
    last = None
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = module
    return last


def named_parameters_with_modules(model: nn.Module) -> list[ParamInfo]:
    """Every trainable parameter with its owning module, in ``named_parameters`` order."""
    head = last_layer(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    infos = []
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            infos.append(ParamInfo(name, param, module, id(param) in head_ids))
    # named_modules() may visit shared modules once; keep named_parameters() order.
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return sorted(infos, key=lambda info: order.get(info.name, len(order)))


Rule = Callable[[ParamInfo], bool]

KEYWORDS: dict[str, Rule] = {
    "bias": lambda i: i.name.rsplit(".", 1)[-1] == "bias",
    "norm": lambda i: isinstance(i.module, NORM_TYPES),
    "embedding": lambda i: isinstance(i.module, EMBEDDING_TYPES),
    "last_layer": lambda i: i.in_last_layer,
    # nanoGPT's rule: matrices and conv kernels are decayed, vectors and scalars are not.
    "ndim<2": lambda i: i.param.ndim < 2,
}


def _type_rule(spec: str) -> Rule:
    target = spec.split(":", 1)[1].strip()
    if not target:
        raise SelectionError(f"Selector rule {spec!r} names no module type; write e.g. 'type:Conv2d'.")
    if "." not in target:
        return lambda i: any(c.__name__ == target for c in type(i.module).__mro__)
    module_path, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), cls_name)
    except (ImportError, AttributeError):
        raise SelectionError(
            f"Selector rule {spec!r}: cannot import {target!r}. Use an import path such as "
            "'type:torch.nn.Conv2d' or a bare class name such as 'type:Conv2d'."
        ) from None
    return lambda i: isinstance(i.module, cls)


def _glob_rule(pattern: str) -> Rule:
    return lambda i: fnmatch.fnmatchcase(i.name, pattern)


def compile_rule(spec: str) -> Rule:
    """A predicate from one rule string (keyword, ``type:…`` or name glob)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SelectionError(f"Selector rule {spec!r} must be a non-empty string.")
    if spec in KEYWORDS:
        return KEYWORDS[spec]
    if spec.startswith("type:"):
        return _type_rule(spec)
    if not any(ch in spec for ch in ".*?["):
        # A bare word close to a keyword is a typo ("biases", "norms", "last-layer"),
        # not a top-level parameter name: fail now rather than at fit start.
        close = difflib.get_close_matches(spec, list(KEYWORDS), n=3, cutoff=0.6)
        if close:
            raise SelectionError(
                f"Unknown selector keyword {spec!r}. Did you mean {', '.join(map(repr, close))}? "
                f"Keywords: {', '.join(KEYWORDS)}; 'type:ClassName' selects a module type; "
                "anything else is a glob on parameter names like 'body.*'."
            )
    return _glob_rule(spec)


@dataclass(frozen=True)
class Selector:
    """Include/exclude rules over named parameters.

    Args:
        include: rules a parameter must match one of (empty: every trainable parameter).
        exclude: rules a parameter must match none of.
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                raise SelectionError(f"{field}={value!r} must be a list of rules, e.g. {field}=[{value!r}].")
            object.__setattr__(self, field, tuple(value))
        self._rules()  # validate keywords and syntax early

    def _rules(self) -> tuple[list[tuple[str, Rule]], list[tuple[str, Rule]]]:
        return ([(s, compile_rule(s)) for s in self.include], [(s, compile_rule(s)) for s in self.exclude])

    def select(self, model: nn.Module) -> list[ParamInfo]:
        """The selected parameters; a glob or type rule that matches nothing is an error."""
        infos = named_parameters_with_modules(model)
        include, exclude = self._rules()
        for field, rules in (("include", include), ("exclude", exclude)):
            for spec, rule in rules:
                if not any(rule(i) for i in infos):
                    _no_match(field, spec, infos, model)
        return [
            i
            for i in infos
            if (not include or any(rule(i) for _, rule in include)) and not any(rule(i) for _, rule in exclude)
        ]

    def select_some(self, model: nn.Module, owner: str) -> list[ParamInfo]:
        """:meth:`select` for a term or constraint (``owner``, e.g. ``"Term 'l2'"``), which
        would do nothing at all with no parameter: that is an error naming its rules.
        (An override may select nothing: it only adjusts the term's λ where it matches.)"""
        selected = self.select(model)
        if not selected:
            raise SelectionError(
                f"{owner}: include={list(self.include)}, exclude={list(self.exclude)} select no trainable "
                f"parameter of {type(model).__name__}, so it would do nothing. Widen include or narrow exclude; "
                "`regfit groups --config …` lists every parameter."
            )
        return selected


def _no_match(field: str, spec: str, infos: Iterable[ParamInfo], model: nn.Module) -> None:
    names = [i.name for i in infos]
    if spec in KEYWORDS:
        # A keyword names a category that may legitimately be empty (an MLP without norm
        # layers), so one config can serve several models: say so, but do not fail.
        log.warning("%s keyword %r matches no parameter of %s.", field, spec, type(model).__name__)
        return
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    if not close and spec.startswith("type:"):
        close = sorted({f"type:{type(i.module).__name__}" for i in infos})
    shown = close or names[:8]
    raise SelectionError(
        f"{field} rule {spec!r} matches no trainable parameter of {type(model).__name__}. "
        f"{'Close names' if close else 'Some names'}: {', '.join(shown)}. Keywords: {', '.join(KEYWORDS)}. "
        "Run `regfit groups --config …` to list every parameter."
    )
