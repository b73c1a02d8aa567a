"""``regfit groups --config FILE``: which parameter gets which penalty, without training.

Builds the model, the optimizer and the Regularization terms of a config exactly as
``regfit fit`` would, resolves each term's selection and scale against the model, and
prints one row per (tensor, term) — name (with its aliases: a tied tensor is one row),
shape, numel, term, penalty, effective coefficient λ·c, mode, and the optimizer's own
``weight_decay`` for it — then the totals per term. Tensors that no term selects are
listed as ``excluded``; the totals count each tensor once, as the rows do. Where the
optimizer's own weight decay reaches tensors a term regularizes (twice) or excludes (all
the same), a note under the table says so.

It answers "is my bias decayed?", "did ``exclude: [last_layer]`` hit the head?" and
"what does ``scale: fan`` make of λ?" before any compute is spent. With ``--ckpt_path`` it
reads a trained checkpoint's weights first; then the totals say, for a ``GroupLasso`` term,
how many of its groups are exactly zero, and a line under them gives the model's size after
``regfit thin`` (:mod:`regfit.export`).

The last column says which selected tensors are scale-invariant (``yes``: a Linear or Conv
without bias before a norm layer, whose effective learning rate weight decay sets; see
:mod:`regfit.invariance`), probed on the model's ``example_input_array`` or on one
training batch of the config's data module, which ``regfit groups`` never downloads: ``?``
when there is no such input (a note says why). A term given as a timescale shows λ when
the data module tells the steps per epoch, else the timescale.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import IO, Any, Mapping, Sequence

from torch import nn

import torch

from regfit.binding import decay_report
from regfit.functional import bundle_norms, row_norms
from regfit.invariance import probe_run, probe_scale_invariance
from regfit.modes import Mode
from regfit.penalties import GroupLasso
from regfit.regularization import Regularization
from regfit.term import Term

__all__ = ["Row", "TermTotal", "parameter_table", "render", "main"]

EXCLUDED = "excluded"


@dataclass(frozen=True)
class Row:
    """One (parameter, term) pair; ``term`` is ``None`` for a parameter no term selects."""

    name: str
    shape: tuple[int, ...]
    numel: int
    term: str | None
    penalty: str
    coeff: float | None  # effective λ·c
    mode: str
    aliases: tuple[str, ...] = ()  # other names of the same tensor (tied weights)
    weight_decay: float | None = None  # the optimizer's own, for this tensor (None: no optimizer)
    scale_invariant: bool | None = None  # None: not probed

    @property
    def label(self) -> str:
        return self.name + "".join(f" (= {a})" for a in self.aliases)


@dataclass(frozen=True)
class TermTotal:
    term: str
    penalty: str
    mode: str
    strength: float  # NaN: from a timescale not resolved here
    tensors: int
    numel: int
    value: float  # λ·Σ c·R(w) at the current weights
    timescale: Mapping[str, float] | None = None
    zero_groups: tuple[int, int] | None = None  # (exactly zero, all) groups of a GroupLasso term


def mode_label(mode: Mode) -> str:
    """``coupled``, ``decoupled``, ``proximal``, or ``decoupled(step='independent')``."""
    extra = {k: v for k, v in vars(mode).items() if not (k == "step" and v == "lr")}
    return mode.name + (f"({', '.join(f'{k}={v!r}' for k, v in extra.items())})" if extra else "")


def parameter_table(model: nn.Module, terms: Sequence[Regularization],
                    optimizers: Sequence[torch.optim.Optimizer] = (),
                    invariant: Mapping[int, bool | None] | None = None,
                    steps_per_epoch: int | None = None) -> tuple[list[Row], list[TermTotal]]:
    """Rows (one per distinct tensor and term, in ``named_parameters`` order) and per-term
    totals for a model and its terms; with ``optimizers``, each row carries the optimizer's
    own ``weight_decay`` for its tensor, and a term given as a timescale gets its λ (an
    epoch timescale needs ``steps_per_epoch``). ``invariant`` maps ``id(tensor)`` to the
    scale-invariance probe's answer.

    Raises the terms' own selection errors (a glob matching nothing, …).
    """
    decay = {id(p): float(g.get("weight_decay", 0.0) or 0.0) for o in optimizers for g in o.param_groups for p in g["params"]}
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    by_param: dict[int, list[Row]] = {}
    totals = []
    for reg in terms:
        term = reg.term
        assignments = term.assign(model)
        if term.timescale is not None and optimizers:  # λ needs the base lr (and the epoch's steps)
            term.steps_per_epoch = steps_per_epoch
            term.bind(None, optimizers)
        resolved = not math.isnan(term.strength)
        mode = mode_label(term.mode)
        for a in assignments:
            by_param.setdefault(id(a.param), []).append(
                Row(a.name, tuple(a.param.shape), a.param.numel(), term.name, repr(term.penalty),
                    term.strength * a.coeff if resolved else None, mode, a.aliases,
                    decay.get(id(a.param)) if optimizers else None, (invariant or {}).get(id(a.param)))
            )
        totals.append(TermTotal(term.name, repr(term.penalty), mode, term.strength, len(assignments),
                                sum(a.param.numel() for a in assignments),
                                float(term.value()) if resolved else math.nan, term.timescale, zero_groups(term)))
    rows = []
    for name, param in model.named_parameters():  # each tensor once, under its first name
        if id(param) in by_param:
            rows += by_param[id(param)]
        else:
            why = EXCLUDED if param.requires_grad else "frozen"
            rows.append(Row(name, tuple(param.shape), param.numel(), None, why, None, "-", tuple(aliases[id(param)][1:]),
                            decay.get(id(param)) if optimizers else None))
    return rows, totals


def zero_groups(term: Term) -> tuple[int, int] | None:
    """(groups exactly zero, groups) of a ``GroupLasso`` term at the current weights — unit
    groups with ``units=True``, rows (``dim=0``) or columns (``dim=1``) of each tensor
    otherwise — or None for another penalty."""
    penalty = term.penalty
    if not isinstance(penalty, GroupLasso):
        return None
    with torch.no_grad():
        if penalty.units:
            norms = [bundle_norms(b.tensors()) for b in term.bundles]
        else:
            norms = [row_norms(a.oriented.transpose(0, 1) if penalty.dim and a.param.ndim >= 2 else a.oriented)
                     for a in term.assignments]
    return sum(int((n == 0).sum()) for n in norms), sum(n.numel() for n in norms)


def thinning_note(model: nn.Module, terms: Sequence[Regularization]) -> str | None:
    """What ``regfit thin`` would make of the model now, for a config with a GroupLasso term
    (None without one): units removable and parameters before → after, or why not known."""
    if not any(isinstance(reg.term.penalty, GroupLasso) for reg in terms):
        return None
    from regfit.export import thinning

    try:
        result = thinning(model)
    except (ImportError, ValueError) as exc:
        return f"size after `regfit thin` unknown: {exc}"
    return (f"After `regfit thin`: {result.removed_units} zero units removed, {result.params_before:,} → "
            f"{result.params_after:,} parameters ({result.ratio:.1%}).")


def decay_notes(terms: Sequence[Regularization], optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
    """What the optimizers' own weight decay does beside each term (after
    :func:`parameter_table` assigned them), one sentence per term that it touches."""
    notes = []
    for reg in terms:
        report = decay_report(reg.term, optimizers)
        if report:
            notes.append(report.message(", ".join(sorted({type(o).__name__ for o in optimizers}))))
    return notes


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _cells(rows: list[Row], totals: list[TermTotal]) -> tuple[list[list[str]], list[list[str]]]:
    body = [[r.label, _fmt_shape(r.shape), f"{r.numel:,}", r.term or "-", r.penalty,
             "-" if r.coeff is None else f"{r.coeff:.4g}", r.mode,
             "-" if r.weight_decay is None else f"{r.weight_decay:g}",
             "-" if r.term is None else {True: "yes", False: "no", None: "?"}[r.scale_invariant]] for r in rows]
    foot = [[t.term, t.penalty, t.mode, _strength(t), str(t.tensors), f"{t.numel:,}",
             "-" if math.isnan(t.value) else f"{t.value:.4g}",
             "-" if t.zero_groups is None else f"{t.zero_groups[0]:,} of {t.zero_groups[1]:,}"] for t in totals]
    return body, foot


def _strength(t: TermTotal) -> str:
    """λ, with the timescale it comes from (or only the timescale, unresolved)."""
    if t.timescale is None:
        return f"{t.strength:.4g}"
    (unit, tau), = t.timescale.items()
    given = f"τ={tau:g} {unit}"
    return given if math.isnan(t.strength) else f"{t.strength:.4g} ({given})"


PARAM_HEADER = ["parameter", "shape", "numel", "term", "penalty", "λ·c", "mode", "opt wd", "scale-inv"]
TOTAL_HEADER = ["term", "penalty", "mode", "λ", "tensors", "numel", "λ·Σc·R(w) now", "zero groups"]


def _summary(rows: list[Row]) -> str:
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r.name, 0)
        if r.term is not None:
            seen[r.name] = r.numel
    all_numel = {r.name: r.numel for r in rows}
    reg = sum(seen.values())
    total = sum(all_numel.values())
    return f"{reg:,} of {total:,} weights regularized ({sum(1 for v in seen.values() if v)} of {len(seen)} tensors)."


def _plain_table(header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def render(rows: list[Row], totals: list[TermTotal], file: IO[str], plain: bool = False,
           notes: Sequence[str] = ()) -> None:
    """Write the parameter table, the per-term totals and any notes (rich table, or plain text)."""
    body, foot = _cells(rows, totals)
    if plain:
        file.write(_plain_table(PARAM_HEADER, body) + "\n\n")
        file.write(_plain_table(TOTAL_HEADER, foot) + "\n\n" if foot else "No Regularization terms.\n\n")
        file.write(_summary(rows) + "\n")
        for note in notes:
            file.write(f"\nNote: {note}\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    table = Table(title="Parameters")
    for h in PARAM_HEADER:
        table.add_column(h, justify="right" if h in ("numel", "λ·c") else "left")
    for r, cells in zip(rows, body):
        table.add_row(*cells, style="dim" if r.term is None else None)
    console.print(table)
    totals_table = Table(title="Terms")
    for h in TOTAL_HEADER:
        totals_table.add_column(h, justify="right" if h in ("λ", "tensors", "numel", "λ·Σc·R(w) now") else "left")
    for cells in foot:
        totals_table.add_row(*cells)
    console.print(totals_table if foot else "No Regularization terms.")
    console.print(_summary(rows))
    for note in notes:
        console.print(f"[bold]Note:[/bold] {note}", markup=True, highlight=False)


USAGE = """usage: regfit groups --config FILE [--plain] [--ckpt_path CKPT] [--section.key=value ...]

Print which parameter gets which penalty, λ·c and mode, for the model and Regularization
terms of a config (the same overrides as `regfit fit`), without training. With --ckpt_path,
at the weights of a checkpoint: how many groups of a GroupLasso term are exactly zero, and
the model's size after `regfit thin`.
"""


def main(argv: Sequence[str]) -> int:
    """``regfit groups`` entry point; errors propagate to :func:`regfit.cli.main`."""
    from regfit.errors import take_flag, take_option
    from regfit.lightning_cli import build_from_config
    from regfit.regularization import regularizations

    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE)
        return 0
    plain, args = take_flag(args, "--plain")
    ckpt_path, args = take_option(args, "--ckpt_path")
    cli = build_from_config("groups", args, ckpt_path)
    terms = regularizations(cli.trainer)
    optimizers = _optimizers(cli.model)
    batch, steps, why = _first_batch(cli.datamodule, cli.trainer)
    run = probe_run(cli.model, batch)
    invariant: dict[int, bool | None] = {}
    if run is not None:
        params = {id(p): (name, p) for name, p in cli.model.named_parameters()}
        try:
            found = probe_scale_invariance(cli.model, list(params.values()), run)
            invariant = {i: found[name] for i, (name, _) in params.items()}
        except Exception as exc:  # noqa: BLE001 - the table is useful without the column
            why = f"the model failed on the probe's input ({type(exc).__name__}: {exc})"
    rows, totals = parameter_table(cli.model, terms, optimizers, invariant, steps)
    notes = decay_notes(terms, optimizers)
    if run is None or not invariant:
        notes.append(f"scale invariance not probed (scale-inv ?): {why}.")
    size = thinning_note(cli.model, terms)
    if size:
        notes.append(size)
    render(rows, totals, sys.stdout, plain=plain, notes=notes)
    return 0


def _first_batch(datamodule: Any, trainer: Any) -> tuple[Any, int | None, str]:
    """(a training batch, optimizer steps per epoch, why there is none) from the config's
    data module, without downloading: its files must be there already."""
    if datamodule is None:
        return None, None, "the config has no data module and the model no example_input_array"
    had = getattr(datamodule, "download", None)
    try:
        if had is not None:
            datamodule.download = False
        datamodule.prepare_data()
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        batch = next(iter(loader))
        steps = math.ceil(len(loader) / getattr(trainer, "accumulate_grad_batches", 1))
    except Exception as exc:  # noqa: BLE001 - missing data is not an error for a dry run
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = text.split("; ")[0].split(" (looked in")[0]  # the reason, not the whole advice
        return None, None, f"no training batch from the data module ({first})"
    finally:
        if had is not None:
            datamodule.download = had
    return batch, steps, ""


def _optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    """The optimizers the model's ``configure_optimizers`` makes (the config's ``optimizer:``
    section under the CLI), in any of the forms Lightning accepts; none if it makes none."""
    try:
        made = model.configure_optimizers()
    except Exception:  # noqa: BLE001 - the table is still useful without the optimizer's column
        return []
    found: list[torch.optim.Optimizer] = []

    def collect(x: object) -> None:
        if isinstance(x, torch.optim.Optimizer):
            found.append(x)
        elif isinstance(x, dict):
            collect(x.get("optimizer"))
        elif isinstance(x, (list, tuple)):
            for item in x:
                collect(item)

    collect(made)
    return found
