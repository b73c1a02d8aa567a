"""``regfit groups --config FILE``: which parameter gets which penalty, without training.

Builds the model and the Regularization terms of a config exactly as ``regfit fit`` would,
resolves each term's selection and scale against the model, and prints one row per
(parameter, term) — name, shape, numel, term, penalty, effective coefficient λ·c, mode —
then the totals per term. Parameters that no term selects are listed as ``excluded``.

It answers "is my bias decayed?", "did ``exclude: [last_layer]`` hit the head?" and
"what does ``scale: fan`` make of λ?" before any compute is spent.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import IO, Sequence

from torch import nn

from regfit.modes import Mode
from regfit.regularization import Regularization

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


@dataclass(frozen=True)
class TermTotal:
    term: str
    penalty: str
    mode: str
    strength: float
    tensors: int
    numel: int
    value: float  # λ·Σ c·R(w) at the current weights


def mode_label(mode: Mode) -> str:
    """``coupled``, ``decoupled``, ``proximal``, or ``decoupled(step='independent')``."""
    extra = {k: v for k, v in vars(mode).items() if not (k == "step" and v == "lr")}
    return mode.name + (f"({', '.join(f'{k}={v!r}' for k, v in extra.items())})" if extra else "")


def parameter_table(model: nn.Module, terms: Sequence[Regularization]) -> tuple[list[Row], list[TermTotal]]:
    """Rows (in ``named_parameters`` order) and per-term totals for a model and its terms.

    Raises the terms' own selection errors (a glob matching nothing, …).
    """
    by_param: dict[str, list[Row]] = {}
    totals = []
    for reg in terms:
        term = reg.term
        assignments = term.assign(model)
        mode = mode_label(term.mode)
        for a in assignments:
            by_param.setdefault(a.name, []).append(
                Row(a.name, tuple(a.param.shape), a.param.numel(), term.name, repr(term.penalty), term.strength * a.coeff, mode)
            )
        totals.append(TermTotal(term.name, repr(term.penalty), mode, term.strength, len(assignments),
                                sum(a.param.numel() for a in assignments), float(term.value())))
    rows = []
    for name, param in model.named_parameters():
        if name in by_param:
            rows += by_param[name]
        else:
            why = EXCLUDED if param.requires_grad else "frozen"
            rows.append(Row(name, tuple(param.shape), param.numel(), None, why, None, "-"))
    return rows, totals


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _cells(rows: list[Row], totals: list[TermTotal]) -> tuple[list[list[str]], list[list[str]]]:
    body = [[r.name, _fmt_shape(r.shape), f"{r.numel:,}", r.term or "-", r.penalty,
             "-" if r.coeff is None else f"{r.coeff:.4g}", r.mode] for r in rows]
    foot = [[t.term, t.penalty, t.mode, f"{t.strength:.4g}", str(t.tensors), f"{t.numel:,}", f"{t.value:.4g}"]
            for t in totals]
    return body, foot


PARAM_HEADER = ["parameter", "shape", "numel", "term", "penalty", "λ·c", "mode"]
TOTAL_HEADER = ["term", "penalty", "mode", "λ", "tensors", "numel", "λ·Σc·R(w) now"]


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


def render(rows: list[Row], totals: list[TermTotal], file: IO[str], plain: bool = False) -> None:
    """Write the parameter table and the per-term totals (rich table, or plain text)."""
    body, foot = _cells(rows, totals)
    if plain:
        file.write(_plain_table(PARAM_HEADER, body) + "\n\n")
        file.write(_plain_table(TOTAL_HEADER, foot) + "\n\n" if foot else "No Regularization terms.\n\n")
        file.write(_summary(rows) + "\n")
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


USAGE = """usage: regfit groups --config FILE [--plain] [--section.key=value ...]

Print which parameter gets which penalty, λ·c and mode, for the model and Regularization
terms of a config (the same overrides as `regfit fit`), without training.
"""


def main(argv: Sequence[str]) -> int:
    """``regfit groups`` entry point; errors propagate to :func:`regfit.cli.main`."""
    from regfit.configfile import check_config_files
    from regfit.errors import check_config_given
    from regfit.lightning_cli import run_cli
    from regfit.regularization import regularizations

    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE)
        return 0
    # Trainer and seeding chatter is noise before a table; warnings still show.
    logging.getLogger("lightning").setLevel(logging.WARNING)
    plain = "--plain" in args
    args = [a for a in args if a != "--plain"]
    check_config_given("groups", args)
    check_config_files(args)
    cli = run_cli(args, run=False)
    rows, totals = parameter_table(cli.model, regularizations(cli.trainer))
    render(rows, totals, sys.stdout, plain=plain)
    return 0
