"""``regfit report RUN_DIR``: one page of plots for a run, from its CSV or W&B logs.

::

    regfit report logs/lightning_logs/version_0          # a CSVLogger folder (metrics.csv)
    regfit report logs/wandb/offline-run-20250101_120000-abc123   # a W&B run folder (run-*.wandb)
    regfit report RUN_DIR --out reports/run0             # write elsewhere than RUN_DIR

writes ``report.png`` (every panel in one image) and ``report.html`` (a summary table, the
image embedded, and the run's config when the folder holds one) into the run folder or
``--out``. The panels: data loss, penalty and total (with validation loss and accuracy);
weight norm and sparsity per term; the angular update per step against the equilibrium
angle the theory predicts (:mod:`regfit.dynamics`); the effective learning rate η/‖w‖²;
the strength λ_t (and the timescale it comes from); the penalty's share of the gradient.
A panel whose metrics the run did not log says so.

W&B runs are read from the run's own record file (``run-<id>.wandb``, the format
``wandb sync`` uploads), so offline runs need no account. Plots are drawn with
matplotlib (the ``sweep`` extra) on its Agg canvas, without touching pyplot's state.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from regfit.errors import UsageError

__all__ = ["Run", "load_run", "read_csv_run", "read_wandb_run", "summary", "render", "write_report", "main"]

#: the metric prefixes whose suffix is a term name
TERM_METRICS = ("weights/norm/", "weights/sparsity/", "weights/angular_update/", "weights/equilibrium_angle/",
                "weights/effective_lr/", "weights/grad_ratio/", "train/strength/", "train/penalty/")


@dataclass
class Run:
    """A run's logged metrics: ``series[key]`` is ``(steps, values)`` in step order."""

    source: Path
    kind: str  # "csv" or "wandb"
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    config: str | None = None  # the resolved config (YAML), when the folder holds one

    def get(self, key: str) -> tuple[list[float], list[float]]:
        return self.series.get(key, ([], []))

    @property
    def terms(self) -> list[str]:
        """The terms the run logged, in the order first seen."""
        names: dict[str, None] = {}
        for key in self.series:
            for prefix in TERM_METRICS:
                if key.startswith(prefix) and "/" not in key[len(prefix):]:
                    names[key[len(prefix):]] = None
        return list(names)


# ---- reading -------------------------------------------------------------------------------


def _add(series: dict[str, list[tuple[float, float]]], key: str, step: float, value: Any) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return  # a histogram, an image, a string: not a curve
    series.setdefault(key, []).append((step, number))


def _sorted(points: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for key, pairs in points.items():
        pairs.sort(key=lambda p: p[0])
        out[key] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def read_csv_run(folder: Path) -> Run:
    """A Lightning ``CSVLogger`` folder: ``metrics.csv`` (one row per logging call, a ``step``
    column), and the ``config.yaml`` that ``regfit fit`` saves beside it."""
    path = folder / "metrics.csv"
    points: dict[str, list[tuple[float, float]]] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        _add(points, key, float(step), value)
    except (OSError, csv.Error, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read as a CSV metrics file ({exc}). Give the folder of a CSVLogger run, "
                         "whose metrics.csv Lightning wrote.") from None
    config = folder / "config.yaml"
    return Run(folder, "csv", _sorted(points), config.read_text() if config.is_file() else None)


# W&B's run file: a LevelDB-style log of protobuf records (what `wandb sync` reads): a
# 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records, each with
# a 7-byte header (CRC-32, length, type: full, or first/middle/last fragment).
_WANDB_IDENT, _WANDB_MAGIC, _BLOCK, _HEADER = b":W&B", 0xBEE1, 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(data: bytes) -> Iterator[bytes]:
    """The protobuf records of a ``run-*.wandb`` file's bytes."""
    ident, magic, version = struct.unpack_from("<4sHB", data, 0)
    if ident != _WANDB_IDENT or magic != _WANDB_MAGIC or version > 1:
        raise ValueError(f"not a W&B run file (header {data[:7]!r})")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += _HEADER
        if kind == 0 and length == 0:  # zero padding at the end of a block, or of a file being written
            pos += left - _HEADER
            continue
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"record of unknown type {kind} at byte {pos - length - _HEADER}")


def read_wandb_run(folder: Path) -> Run:
    """A W&B run folder (``offline-run-…`` or ``run-…``): the history in its ``run-*.wandb``
    file, x = ``trainer/global_step`` (what Lightning's WandbLogger logs) or W&B's step."""
    files = sorted(folder.glob("run-*.wandb"))
    path = files[-1]
    try:
        from wandb.proto import wandb_internal_pb2 as pb

        points: dict[str, list[tuple[float, float]]] = {}
        for raw in _wandb_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    row[key] = json.loads(item.value_json)
                except ValueError:
                    continue
            step = row.get("trainer/global_step", row.get("_step", record.history.step.num))
            for key, value in row.items():
                if not key.startswith("_") and key != "trainer/global_step":
                    _add(points, key, float(step), value)
    except Exception as exc:  # noqa: BLE001 - a format or version regfit cannot read is a user-facing error
        raise UsageError(
            f"{path} cannot be read as a W&B run file ({type(exc).__name__}: {exc}). It may come from a newer W&B "
            "or still be written by a running process. Log to CSV as well to get a report of the run: "
            "--trainer.logger+=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=logs "
            "(or export the run's history from W&B)."
        ) from None
    config = folder / "files" / "regfit-config.yaml"
    return Run(folder, "wandb", _sorted(points), config.read_text() if config.is_file() else None)


def load_run(path: str | Path) -> Run:
    """Read a CSVLogger folder or a W&B run folder; a :class:`UsageError` names the fix."""
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"{folder}: no such folder. Give the folder of a run: a CSVLogger version folder "
                         "(logs/lightning_logs/version_0, with metrics.csv) or a W&B run folder "
                         "(logs/wandb/offline-run-…, with run-*.wandb).")
    if folder.is_file():
        if folder.name == "metrics.csv" or folder.suffix == ".wandb":
            folder = folder.parent
        else:
            raise UsageError(f"{folder} is a file; give the run's folder (the one holding metrics.csv or run-*.wandb).")
    if (folder / "metrics.csv").is_file():
        run = read_csv_run(folder)
    elif any(folder.glob("run-*.wandb")):
        run = read_wandb_run(folder)
    else:
        inside = sorted({p.parent for p in [*folder.glob("*/metrics.csv"), *folder.glob("*/*/metrics.csv"),
                                             *folder.glob("*/run-*.wandb"), *folder.glob("*/*/run-*.wandb")]})
        hint = (f" It holds runs in subfolders; give one of them, e.g. `regfit report {inside[-1]}`"
                f" ({len(inside)} found: {', '.join(p.name for p in inside[:4])}{' …' if len(inside) > 4 else ''})."
                if inside else " Log with a CSVLogger (--trainer.logger=lightning.pytorch.loggers.CSVLogger) or W&B.")
        raise UsageError(f"{folder} holds no metrics.csv (CSVLogger) and no run-*.wandb (W&B run).{hint}")
    if not run.series:
        raise UsageError(f"{run.source}: the run logged no metric yet (is it still starting, or did it log "
                         "nothing with log_every_n_steps larger than its steps?).")
    return run


# ---- numbers ---------------------------------------------------------------------------------


def _tail(values: Sequence[float], fraction: float = 0.25) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    return finite[int(len(finite) * (1 - fraction)):] if finite else []


def _rms(values: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else math.nan


def summary(run: Run) -> list[dict[str, Any]]:
    """Per term, the numbers of the report's table: last weight norm and sparsity, the
    angular update (RMS over the last quarter of its logged steps) against the predicted
    equilibrium angle, the effective lr, λ and the gradient ratio (median, last quarter)."""
    rows = []
    for term in run.terms:
        def last(key: str) -> float:
            values = run.get(f"{key}/{term}")[1]
            return values[-1] if values else math.nan

        measured = _rms(_tail(run.get(f"weights/angular_update/{term}")[1]))
        predicted = _rms(_tail(run.get(f"weights/equilibrium_angle/{term}")[1]))
        ratio = _tail(run.get(f"weights/grad_ratio/{term}")[1])
        rows.append({
            "term": term,
            "weight norm": last("weights/norm"),
            "sparsity": last("weights/sparsity"),
            "angular update (rad/step)": measured,
            "predicted θ_eq": predicted,
            "measured / predicted": measured / predicted if predicted and math.isfinite(predicted) else math.nan,
            "effective lr": last("weights/effective_lr"),
            "λ": last("train/strength"),
            "grad ratio": sorted(ratio)[len(ratio) // 2] if ratio else math.nan,
        })
    return rows


# ---- drawing ---------------------------------------------------------------------------------


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Running RMS over ``window`` points (a rotation's typical size, as the theory states it)."""
    out, acc, buf = [], 0.0, []
    for v in values:
        buf.append(v * v)
        acc += v * v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(math.sqrt(max(acc, 0.0) / len(buf)))
    return out


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"not logged\n({what})", ha="center", va="center", transform=ax.transAxes, color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])


def _positive(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


def _panel_loss(ax: Any, run: Run) -> None:
    drawn = False
    for key, label, style in (("train/data_loss", "data loss", "-"), ("train/penalty", "penalty", "-"),
                              ("train/loss", "total (data + penalty)", "--"), ("val/data_loss", "val data loss", "o-")):
        steps, values = run.get(key)
        if steps:
            ax.plot(steps, values, style, label=label, lw=1.2, ms=3)
            drawn = True
    if not drawn:
        return _empty(ax, "train/data_loss, train/penalty, train/loss")
    if all(_positive(run.get(k)[1]) for k in ("train/data_loss", "train/penalty") if run.get(k)[0]):
        ax.set_yscale("log")
    acc_steps, acc = run.get("val/acc")
    if acc_steps:
        twin = ax.twinx()
        twin.plot(acc_steps, acc, "s:", color="0.3", ms=3, label="val acc")
        twin.set_ylabel("val acc")
        twin.legend(loc="center right", fontsize=7)
    ax.set_title("Data loss vs penalty vs total")
    ax.legend(fontsize=7, loc="upper right")


def _panel_terms(ax: Any, run: Run, prefix: str, title: str, log: bool = False, what: str = "") -> None:
    drawn = False
    for i, term in enumerate(run.terms):
        steps, values = run.get(f"{prefix}/{term}")
        if steps:
            ax.plot(steps, values, lw=1.2, color=f"C{i}", label=term)
            drawn = True
    if not drawn:
        return _empty(ax, what or f"{prefix}/<term>")
    if log and all(_positive(run.get(f"{prefix}/{t}")[1]) for t in run.terms if run.get(f"{prefix}/{t}")[0]):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)


def _panel_rotation(ax: Any, run: Run) -> None:
    drawn = False
    for i, term in enumerate(run.terms):
        steps, values = run.get(f"weights/angular_update/{term}")
        if not steps:
            continue
        drawn = True
        ax.plot(steps, values, lw=0.6, alpha=0.35, color=f"C{i}")
        ax.plot(steps, _smooth(values, max(5, len(values) // 20)), lw=1.6, color=f"C{i}", label=f"{term}: measured (running RMS)")
        eq_steps, eq = run.get(f"weights/equilibrium_angle/{term}")
        if eq_steps:
            ax.plot(eq_steps, eq, "--", lw=1.4, color=f"C{i}", label=f"{term}: predicted equilibrium")
    if not drawn:
        return _empty(ax, "weights/angular_update/<term>: dynamics=True and a logger")
    if any(_positive(run.get(f"weights/angular_update/{t}")[1]) for t in run.terms):
        ax.set_yscale("log")
    ax.set_title("Angular update per step (rad) vs rotational equilibrium")
    ax.legend(fontsize=7)


def _panel_text(ax: Any, run: Run, rows: list[dict[str, Any]]) -> None:
    ax.axis("off")
    lines = [f"{run.kind.upper()} run: {run.source.name}"]
    for key in ("train/data_loss", "val/data_loss", "val/acc"):
        values = run.get(key)[1]
        if values:
            lines.append(f"last {key}: {values[-1]:.4g}")
    for r in rows:
        lines.append("")
        lines.append(f"term {r['term']}: ‖w‖ {r['weight norm']:.4g}, sparsity {r['sparsity']:.3g}, λ {r['λ']:.3g}")
        if math.isfinite(r["angular update (rad/step)"]):
            pred = f", predicted {r['predicted θ_eq']:.3g} (×{r['measured / predicted']:.3f})" \
                if math.isfinite(r["predicted θ_eq"]) else ""
            lines.append(f"  angular update {r['angular update (rad/step)']:.3g} rad/step (last quarter){pred}")
            lines.append(f"  effective lr {r['effective lr']:.3g}, grad ratio {r['grad ratio']:.3g}")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, transform=ax.transAxes)


def render(run: Run) -> bytes:
    """The report's figure as PNG bytes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("regfit report draws with matplotlib, which is not installed: "
                         "pip install -c constraints.txt -e \".[sweep]\" (or pip install matplotlib).") from None
    fig = Figure(figsize=(13, 15), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, 2)
    _panel_loss(axes[0][0], run)
    _panel_text(axes[0][1], run, summary(run))
    _panel_terms(axes[1][0], run, "weights/norm", "Weight norm ‖w‖ per term")
    _panel_terms(axes[1][1], run, "weights/sparsity", "Sparsity (fraction of exact zeros)")
    _panel_rotation(axes[2][0], run)
    _panel_terms(axes[2][1], run, "weights/effective_lr", "Effective learning rate η/‖w‖²", log=True)
    strengths = [v for t in run.terms for v in run.get(f"train/strength/{t}")[1] if v > 0]
    _panel_terms(axes[3][0], run, "train/strength", "Strength λ_t" + _timescales(run),
                 log=bool(strengths) and max(strengths) > 3 * min(strengths))
    _panel_terms(axes[3][1], run, "weights/grad_ratio", "Penalty's share of the gradient ‖λc∇R‖ / ‖∇L_data‖",
                 log=True)
    for row in axes:
        for ax in row:
            if ax.get_title():
                ax.set_xlabel("step")
                ax.grid(alpha=0.3)
    fig.suptitle(f"regfit report: {run.source}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _timescales(run: Run) -> str:
    """' (timescale {'epochs': 5.0})' when the run's config gives one."""
    if not run.config:
        return ""
    try:
        import yaml

        config = yaml.safe_load(run.config) or {}
    except Exception:  # noqa: BLE001 - the title is still fine without it
        return ""
    section = config.get("regularization") if isinstance(config, dict) else None
    if isinstance(section, dict) and section.get("timescale"):
        return f" (from timescale {section['timescale']})"
    return ""


def _html(run: Run, png: bytes, rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))

    table = ""
    if rows:
        head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
        table = f"<table><tr>{head}</tr>{body}</table>"
    config = (f"<details><summary>config</summary><pre>{html.escape(run.config)}</pre></details>"
              if run.config else "")
    image = base64.b64encode(png).decode()
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>regfit report</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1320px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "img{max-width:100%}</style></head><body>"
        f"<h2>regfit report</h2><p>{html.escape(run.kind.upper())} run <code>{html.escape(str(run.source))}</code>"
        f" — {len(run.series)} metrics.</p>{table}"
        f"<img alt='regfit report' src='data:image/png;base64,{image}'>{config}</body></html>"
    )


def write_report(run: Run, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into ``out`` (default: the run's folder)."""
    folder = Path(out) if out is not None else run.source
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {folder} for the report ({exc.strerror or exc}); give --out DIR.") from None
    png = render(run)
    png_path, html_path = folder / "report.png", folder / "report.html"
    png_path.write_bytes(png)
    html_path.write_text(_html(run, png, summary(run)), encoding="utf-8")
    return png_path, html_path


def main(argv: Sequence[str]) -> int:
    """``regfit report RUN_DIR [--out DIR]``; errors propagate to :func:`regfit.cli.main`."""
    parser = argparse.ArgumentParser(
        prog="regfit report", description="One page of plots for a run: losses, weight norms, sparsity, the "
        "angular update against its predicted equilibrium, effective lr, strength.")
    parser.add_argument("run", help="a CSVLogger run folder (with metrics.csv) or a W&B run folder (with run-*.wandb)")
    parser.add_argument("--out", help="folder for report.png and report.html (default: the run folder)")
    args = parser.parse_args(list(argv))
    run = load_run(args.run)
    png, page = write_report(run, args.out)
    sys.stdout.write(f"{page}\n{png}\n")
    return 0
