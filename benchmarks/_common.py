"""Shared pieces of the benchmarks: options, the machine line, timing, interleaved rounds, tables."""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a fresh clone without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    parts = [
        f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"python {platform.python_version()}",
    ]
    if device.type == "cuda":
        parts.insert(1, f"GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    return " | ".join(parts)


def bench_parser(doc: str, rounds: int, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark has: device, threads, rounds, batch and a smoke mode."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    return parser


def start(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.device, Callable[[], None]]:
    """Checks the device, sets the threads and prints the machine line: (device, sync)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch; use --device cpu")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine(device)}")
    return device, synchronizer(device)


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_per_call(fn: Callable[[], None], n: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``fn`` over ``n`` calls (device work included)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def interleaved(runners: dict[str, Callable[[], float]], rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Run every runner once per round, in a fresh random order each round.

    Each runner returns one measurement (seconds). Interleaving spreads slow phases of a
    shared machine over all variants; per-round ratios then cancel most of them.
    """
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            times[name].append(runners[name]())
    return times


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios num[i] / den[i]."""
    ratios = sorted(a / b for a, b in zip(num, den))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q[0], q[2]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into the README)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])


def check(ratio: float, op: str, target: float, q1: float | None = None, q3: float | None = None) -> str:
    """``ok`` when the median meets the target; ``tie`` when it does not but the target lies
    inside the quartiles of the per-round ratios (this run cannot tell them apart);
    ``MISSED`` otherwise."""
    ok = ratio <= target if op == "<=" else ratio >= target
    if ok:
        verdict = "ok"
    elif q1 is not None and q3 is not None and q1 <= target <= q3:
        verdict = "tie (within quartiles)"
    else:
        verdict = "MISSED"
    return f"{op} {target:g}: {verdict}"


class Repeat:
    """The same batch ``n`` times, as a loader (a Trainer's ``train_dataloaders``)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)

    def __len__(self) -> int:
        return self.n


def step_clock(sync: Callable[[], None]):
    """A Lightning callback that stamps the time (after ``sync``) at each training batch's
    start, into ``.stamps``: a Trainer's mean step time is their spread ÷ their count − 1."""
    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            sync()
            self.stamps.append(time.perf_counter())

    return StepClock()


def mean_step(clock, skip: int) -> float:
    """The mean time per step after the first ``skip`` steps."""
    stamps = clock.stamps[skip:]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)
