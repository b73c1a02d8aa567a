"""Which parameters a term applies to.

A selector is a list of rules, each a predicate over one *name* of a parameter — its full
name, the tensor, and the module that owns it under that name. A parameter is selected when
it matches some ``include`` rule (all parameters when ``include`` is empty) and no
``exclude`` rule. A rule is written as a string:

* a **keyword**:

  - ``bias`` — every bias-like leaf: ``bias``, ``bias_*`` and ``*_bias``
    (``nn.MultiheadAttention.in_proj_bias``, ``bias_k``/``bias_v``, LSTM/GRU
    ``bias_ih_l0``/``bias_hh_l0``), and the parameters of a module so named (T5's
    ``relative_attention_bias`` table, an embedding of additive attention biases);
  - ``norm`` — the parameters of normalization modules (:func:`is_norm`): every torch norm
    layer, and any module whose class name ends in ``Norm``/``Normalization`` (optionally
    followed by ``Act``/``Gated`` and a ``1d``/``2d``/``3d`` suffix) and whose own
    parameters are vectors — HF ``LlamaRMSNorm``, ``T5LayerNorm``, apex ``FusedRMSNorm``,
    timm ``LayerNorm2d``/``RmsNorm``. Add your own classes to :data:`NORM_TYPES`
    (``regfit.selection.NORM_TYPES += (MyNorm,)``) or select them with ``type:MyNorm``;
  - ``embedding`` — parameters of ``nn.Embedding``/``nn.EmbeddingBag`` and of modules whose
    class name ends in ``Embedding``;
  - ``linear`` — dense layers: ``nn.Linear`` (and subclasses) and HF ``Conv1D``, which
    stores its weight as (in, out);
  - ``last_layer`` (see :func:`last_layer`); ``ndim<2`` (biases, norm gains, scalars);

* ``type:NAME`` — parameters owned directly by a module of that class, by class name
  (``type:Conv2d``) or import path (``type:torch.nn.Conv2d``);
* anything else is a glob on the parameter's full name (``body.0.*``, ``*.weight``).

**Tensors, not names.** A tensor reachable under several names — tied weights, such as
``lm_head.weight is transformer.wte.weight`` in GPT-2 — is *one* selected parameter with
aliases: its name is the one ``named_parameters()`` gives (the first), and every rule is
tried on every alias. It is included when any alias matches an include rule and excluded
when any alias matches an exclude rule: ``exclude=["embedding"]`` keeps a tied output
head out of the term too, and ``exclude=["last_layer"]`` keeps the tied embedding out.

Parameters with ``requires_grad=False`` are not selected (a term reaches them once they
become trainable: the binding looks again, see :mod:`regfit.binding`). Selection has no
side effects: it reports what matched and never touches ``requires_grad``.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import Tensor, nn

__all__ = ["Selector", "SelectionError", "ParamInfo", "KEYWORDS", "NORM_TYPES", "is_norm", "is_bias", "output_dim",
           "last_layer", "last_parametrized_module", "named_parameters_with_modules"]

log = logging.getLogger(__name__)

#: Normalization layers by type: every torch norm layer with parameters. Extend it for a
#: class whose name does not say it is a norm. Norm gains/offsets are not decayed by
#: convention: shrinking a LayerNorm gain towards 0 fights the normalization itself.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

# Class names of other libraries' norm layers: LlamaRMSNorm, T5LayerNorm, FusedLayerNorm,
# LayerNorm2d, RmsNorm, BatchNormAct2d, MambaRMSNormGated, SomethingNormalization.
_NORM_NAME = re.compile(r"(?:Norm|Normalization)(?:Act|Gated)?(?:[123][dD])?$")
_EMBEDDING_NAME = re.compile(r"Embedding(?:Bag)?$")
# bias, bias_ih_l0, bias_hh_l0_reverse, bias_k, bias_v, in_proj_bias
_BIAS_LEAF = re.compile(r"^bias(?:_|$)|_bias$")


def _class_names(module: nn.Module) -> Iterable[str]:
    return (c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object))


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: an instance of :data:`NORM_TYPES`, or a
    class named like one (``…Norm``, ``…Normalization``, with an ``Act``/``Gated`` or
    ``2d``-style suffix) whose own parameters are all vectors or scalars — a name alone
    does not make a weight matrix a norm gain."""
    if isinstance(module, NORM_TYPES):
        return True
    if not any(_NORM_NAME.search(name) for name in _class_names(module)):
        return False
    return all(p.ndim <= 1 for p in module.parameters(recurse=False))


def is_bias(leaf: str) -> bool:
    """Whether a parameter's leaf name (the part after the last dot) is a bias."""
    return bool(_BIAS_LEAF.search(leaf))


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, EMBEDDING_TYPES) or any(_EMBEDDING_NAME.search(n) for n in _class_names(module))


def _is_conv1d_hf(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2, nanoGPT ports): a Linear whose weight is (in, out).
    return type(module).__name__ == "Conv1D"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d_hf(module)


def output_dim(module: nn.Module, leaf: str, param: Tensor) -> int:
    """The dim of ``param`` that indexes the module's output units: 0 for torch's Linear and
    Conv weights (out, in, …); 1 for HF ``Conv1D`` (in, out) and transposed convolutions
    (in, out/groups, …). Row-structured penalties (``GroupLasso``, the matrix penalties) and
    scale callables see every weight with its output dim first."""
    if leaf == "weight" and param.ndim >= 2 and (_is_conv1d_hf(module) or isinstance(module, nn.modules.conv._ConvTransposeNd)):
        return 1
    return 0


class SelectionError(ValueError):
    """A selector rule is malformed or matches nothing."""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor as the selector sees it, under one of its names.

    ``aliases`` holds the other names of the same tensor (tied weights) as ParamInfos of
    their own (with their owning modules); :meth:`views` yields them all, this one first.
    """

    name: str
    param: Tensor
    module: nn.Module  # the module that owns the parameter directly, under this name
    in_last_layer: bool
    aliases: tuple["ParamInfo", ...] = ()

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the tensor, the canonical one first."""
        return (self.name, *(a.name for a in self.aliases))

    def views(self) -> tuple["ParamInfo", ...]:
        return (self, *self.aliases)

    @property
    def out_dim(self) -> int:
        """The output-unit dim of the tensor (see :func:`output_dim`), from its canonical owner."""
        return output_dim(self.module, self.leaf, self.param)


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


def named_parameters_with_modules(model: nn.Module, trainable: bool | None = True) -> list[ParamInfo]:
    """Every distinct parameter tensor with its owning module and its aliases, in
    ``named_parameters`` order. ``trainable``: only ``requires_grad`` ones (True), only
    frozen ones (False), or all (None)."""
    head = last_layer(model)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    by_tensor: dict[int, list[ParamInfo]] = {}
    # remove_duplicate=False: a module reachable under two names (shared blocks) gives
    # each name; a tensor owned by two modules (tied weights) appears under both.
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if trainable is not None and param.requires_grad != trainable:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            by_tensor.setdefault(id(param), []).append(ParamInfo(name, param, module, id(param) in head_ids))
    order = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    infos = []
    for views in by_tensor.values():
        views.sort(key=lambda v: order.get(v.name, len(order)))
        first, rest = views[0], tuple(dict((v.name, v) for v in views[1:] if v.name != views[0].name).values())
        infos.append(ParamInfo(first.name, first.param, first.module, first.in_last_layer, rest))
    return sorted(infos, key=lambda info: order.get(info.name, len(order)))


Rule = Callable[[ParamInfo], bool]

KEYWORDS: dict[str, Rule] = {
    "bias": lambda i: is_bias(i.leaf) or ("." in i.name and is_bias(i.name.rsplit(".", 2)[-2])),
    "norm": lambda i: is_norm(i.module),
    "embedding": lambda i: _is_embedding(i.module),
    "linear": lambda i: _is_linear(i.module),
    "last_layer": lambda i: i.in_last_layer,
    # nanoGPT's rule: matrices and conv kernels are decayed, vectors and scalars are not.
    "ndim<2": lambda i: i.param.ndim < 2,
}


def matches(rule: Rule, info: ParamInfo) -> bool:
    """Whether ``rule`` holds for the tensor under any of its names."""
    return any(rule(view) for view in info.views())


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

    def select(self, model: nn.Module, frozen: bool = False) -> list[ParamInfo]:
        """The selected tensors; a glob or type rule that matches nothing is an error.

        ``frozen=True``: the frozen tensors these rules would select if they were trainable
        (what a term starts regularizing when they are unfrozen), with no error for rules
        that match none of them."""
        include, exclude = self._rules()
        if frozen:
            infos = named_parameters_with_modules(model, trainable=False)
        else:
            infos = named_parameters_with_modules(model)
            for field, rules in (("include", include), ("exclude", exclude)):
                for spec, rule in rules:
                    if not any(matches(rule, i) for i in infos):
                        _no_match(field, spec, infos, model)
        return [
            i
            for i in infos
            if (not include or any(matches(rule, i) for _, rule in include))
            and not any(matches(rule, i) for _, rule in exclude)
        ]

    def excluded(self, model: nn.Module) -> list[ParamInfo]:
        """The trainable tensors that the include rules select and an exclude rule removes."""
        include, exclude = self._rules()
        return [i for i in named_parameters_with_modules(model)
                if (not include or any(matches(rule, i) for _, rule in include))
                and any(matches(rule, i) for _, rule in exclude)]

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
    names = [n for i in infos for n in i.names]
    if spec in KEYWORDS:
        # A keyword names a category that may legitimately be empty (an MLP without norm
        # layers, the frozen base of a LoRA model), so one config can serve several models:
        # say so, but do not fail.
        frozen = [i.name for i in named_parameters_with_modules(model, trainable=False) if matches(KEYWORDS[spec], i)]
        why = (f"; {len(frozen)} frozen tensors match it ({', '.join(frozen[:3])}{' …' if len(frozen) > 3 else ''}) "
               "and are left alone while frozen" if frozen else "")
        log.warning("%s keyword %r matches no trainable parameter of %s%s.", field, spec, type(model).__name__, why)
        return
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.4)
    if not close and spec.startswith("type:"):
        close = sorted({f"type:{type(v.module).__name__}" for i in infos for v in i.views()})
    shown = close or names[:8]
    raise SelectionError(
        f"{field} rule {spec!r} matches no trainable parameter of {type(model).__name__}. "
        f"{'Close names' if close else 'Some names'}: {', '.join(shown)}. Keywords: {', '.join(KEYWORDS)}. "
        "List them with `regfit groups --config …`, or in Python with [n for n, _ in model.named_parameters()]."
    )
