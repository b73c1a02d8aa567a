"""``regfit thin --config FILE --ckpt_path CKPT --out model.pt``: a trained model without its
exactly-zero units, saved.

Builds the model of a config as ``regfit fit`` would (the same ``--section.key=value``
overrides), loads the checkpoint's weights, removes every unit whose incoming group (or
whose outgoing columns) is exactly zero with :func:`regfit.export.thinning` — which checks
on the model's ``example_input_array`` that the outputs are unchanged — and saves the
smaller module with ``torch.save`` (in eval mode; load it with
``torch.load(path, weights_only=False)`` where regfit is installed). It prints, per unit
group, the units before and after, and the parameters before → after.

The file is written atomically (a temporary file beside it, then renamed): an existing
``--out`` is replaced only by a complete new one. A missing or unreadable checkpoint, a
folder that cannot take ``--out``, and a model with no zero unit are user errors (exit 2,
one paragraph), checked before any work where they can be.
"""

from __future__ import annotations

import sys
from typing import IO, Sequence

from regfit.atomic import atomic_save
from regfit.export import Thinning

__all__ = ["main", "render", "USAGE"]

USAGE = """usage: regfit thin --config FILE --ckpt_path CKPT --out FILE [--ignore LAYER ...] [--plain]
                   [--section.key=value ...]

Remove the units (Conv channels, Linear features) of a trained model that are exactly zero —
all their weights, biases and BatchNorm scale/shift, or all the columns that read them — with
everything that depends on them, check that the outputs are unchanged, and save the smaller
model (torch.save; load it with torch.load(FILE, weights_only=False)). Train with a proximal
GroupLasso(units=True) term to get such units (configs/mnist_cnn_thin.yaml).

  --ckpt_path CKPT   the checkpoint to thin (a .ckpt file regfit fit saved)
  --out FILE         where to save the thinned model (written atomically)
  --ignore LAYER     keep the units of this layer's group (repeatable)
  --plain            plain text instead of a rich table
"""


def main(argv: Sequence[str]) -> int:
    """``regfit thin`` entry point; errors propagate to :func:`regfit.cli.main`."""
    from regfit.errors import UsageError, check_config_given, check_output_file, take_flag, take_option
    from regfit.export import thinning
    from regfit.lightning_cli import build_from_config

    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(USAGE)
        return 0
    plain, args = take_flag(args, "--plain")
    ckpt_path, args = take_option(args, "--ckpt_path")
    out, args = take_option(args, "--out")
    ignore, args = take_option(args, "--ignore", repeat=True)
    check_config_given("thin", args)
    if ckpt_path is None or out is None:
        missing = " and ".join(o for o, v in (("--ckpt_path CKPT", ckpt_path), ("--out FILE", out)) if v is None)
        raise UsageError(f"`regfit thin` needs {missing}: `regfit thin --config FILE --ckpt_path last.ckpt "
                         "--out model.pt`.")
    check_output_file(out)
    cli = build_from_config("thin", args, ckpt_path)
    try:
        result = thinning(cli.model, ignore=ignore)
    except ImportError as exc:  # the export extra is missing: the message names it
        raise UsageError(str(exc)) from None
    if not result.removed_units:
        zero = sum(g.zero for g in result.groups)
        why = (f"its {zero} zero units are kept ({'; '.join(sorted({g.kept for g in result.groups if g.kept}))})"
               if zero else "no unit has all its weights, bias and norm parameters exactly zero")
        raise UsageError(
            f"Nothing to thin in {type(cli.model).__name__} at {ckpt_path}: {why}. Train with a proximal "
            "GroupLasso(units=True) term, whose prox zeroes a unit's weights, bias and BatchNorm channel together "
            "(configs/mnist_cnn_thin.yaml); a GroupLasso that excludes biases leaves each zeroed unit its bias."
        )
    result.model.eval()
    try:
        atomic_save(result.model, out)
    except OSError as exc:  # a full disk, a folder that turned read-only: nothing half-written stays
        raise UsageError(f"--out {out} could not be written ({exc.strerror or exc}); an existing file there is "
                         "unchanged. Choose another --out.") from None
    render(result, sys.stdout, plain=plain)
    sys.stdout.write(f"Saved {out} (load it with torch.load({out!r}, weights_only=False)).\n")
    return 0


HEADER = ["unit group", "layers", "units", "zero", "removed", "after", "kept because"]


def _cells(result: Thinning) -> list[list[str]]:
    return [[g.name, ", ".join(g.layers), str(g.units), str(g.zero), str(g.removed), str(g.units - g.removed),
             g.kept or "-"] for g in result.groups]


def render(result: Thinning, file: IO[str], plain: bool = False) -> None:
    """The per-group table and the parameter counts."""
    summary = (f"{result.removed_units} units removed: {result.params_before:,} → {result.params_after:,} parameters "
               f"({result.ratio:.1%}); outputs on the example input differ by {result.max_abs_diff:.2g} at most.")
    cells = _cells(result)
    if plain:
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(HEADER)]
        for row in [HEADER, ["-" * w for w in widths], *cells]:
            file.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        file.write("\n" + summary + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Thinned")
    for h in HEADER:
        table.add_column(h, justify="right" if h in ("units", "zero", "removed", "after") else "left")
    for row in cells:
        table.add_row(*row)
    console = Console(file=file)
    console.print(table)
    console.print(summary, highlight=False)
