"""One MNIST epoch: regfit in a Lightning Trainer against a hand-written PyTorch loop.

Three ways to train the same MLP (784-1024-1024-10, or 784-32-10 with ``--model tiny``),
batch size and optimizer (SGD, momentum 0.9, L2 λ = 1e-4) on the same in-memory tensors:

* ``torch_loop`` — what users write by hand: ``SGD(weight_decay=λ)``, batches cut from the
  tensors with :class:`regfit.data.TensorBatches` (the same batching the data module uses);
* ``lightning`` — a plain ``LightningModule`` with ``SGD(weight_decay=λ)`` and
  :class:`regfit.data.MNISTDataModule`: Lightning's own overhead;
* ``regfit`` — :class:`regfit.models.MLP` (a :class:`regfit.RegModule`) with a coupled
  ``Regularization(L2)``, the same data module: what ``regfit fit`` runs.

Lightning runs log to a CSVLogger every 50 steps, without progress bar, checkpoints or
model summary. Two times are reported per run: the training epoch alone (Trainer hooks
``on_train_epoch_start`` → ``on_train_epoch_end``) and the whole ``trainer.fit`` call
(Trainer start-up and tear-down included). Variants are interleaved, medians over rounds.

The data are the official MNIST test-set digits split 8,000 / 2,000
(:func:`regfit.data.build_split_from_test_set`), found in ``../shared/data/mnist`` beside
the repository; ``--data-dir`` points at any MNIST folder instead (e.g. the full dataset).

Usage::

    python benchmarks/end_to_end.py
    python benchmarks/end_to_end.py --device cuda
    python benchmarks/end_to_end.py --model tiny --batch 64   # host-bound steps: hooks and logging
    python benchmarks/end_to_end.py --quick      # a smoke run, numbers meaningless
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from _common import REPO, bench_parser, check, interleaved, ratio_stats, start, table

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from regfit import Regularization
from regfit.data import MNISTDataModule, TensorBatches, build_split_from_test_set
from regfit.models import MLP
from regfit.penalties import L2

LAM, LR, MOMENTUM = 1e-4, 0.05, 0.9
# Beside the repository (as CI checks it out), or one level up for a git worktree.
SOURCES = [REPO.parent / "shared" / "data" / "mnist", REPO.parent.parent / "shared" / "data" / "mnist"]
DEFAULT_SOURCE = next((p for p in SOURCES if p.is_dir()), SOURCES[0])


# ``--model tiny`` makes every step host-bound (Python, hooks, logging), as small models
# are on a GPU: what regfit adds on top of Lightning then shows in full.
HIDDEN = {"mlp": (1024, 1024), "tiny": (32,)}


def mlp(hidden: tuple[int, ...]) -> nn.Module:
    """The network, :class:`regfit.models.MLP` (784 → hidden… → 10, ReLU), as an ordinary
    ``nn.Module`` for the torch loop and the plain LightningModule: the same layers and
    initial weights as the regfit run."""
    torch.manual_seed(0)
    return MLP(widths=hidden)


class PlainModule(L.LightningModule):
    """What a Lightning user writes without regfit."""

    def __init__(self, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.net = mlp(hidden)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=LAM)


class RegMLP(MLP):
    """What ``regfit fit`` runs: :class:`regfit.models.MLP`, with the SGD the CLI would supply."""

    def __init__(self, hidden: tuple[int, ...]) -> None:
        torch.manual_seed(0)
        super().__init__(widths=hidden)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class EpochClock(Callback):
    def __init__(self, sync) -> None:
        self.sync, self.seconds = sync, 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.start


def torch_loop(dm: MNISTDataModule, hidden, device, sync, max_batches: int | None) -> tuple[float, float]:
    model = mlp(hidden).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=LAM)
    batches = TensorBatches(dm.train_set.x, dm.train_set.y, dm.batch_size, shuffle=True, seed=dm.seed)
    sync()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    sync()
    seconds = time.perf_counter() - t0
    return seconds, seconds


def lightning_run(module: L.LightningModule, callbacks, dm, device, sync, max_batches, log_dir) -> tuple[float, float]:
    clock = EpochClock(sync)
    trainer = L.Trainer(
        max_epochs=1, logger=CSVLogger(log_dir), log_every_n_steps=50, callbacks=[*callbacks, clock],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, limit_train_batches=max_batches if max_batches is not None else 1.0,
        accelerator=device.type, devices=1,
    )
    sync()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    sync()
    return clock.seconds, time.perf_counter() - t0


def data_module(args) -> MNISTDataModule:
    if args.data_dir is None:
        source = Path(args.source)
        if not source.is_dir():
            raise SystemExit(f"No MNIST test-set folder at {source}; pass --source DIR or --data-dir DIR.")
        data_dir = build_split_from_test_set(source, tempfile.mkdtemp(prefix="regfit-mnist-"), n_train=8000)
    else:
        data_dir = args.data_dir
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=args.batch, val_fraction=0.0, download=False)
    dm.prepare_data()
    dm.setup("fit")  # once: every run below reuses the tensors in memory
    return dm


def main(argv=None) -> None:
    parser = bench_parser(__doc__, rounds=10, quick="1 round of 3 batches")
    parser.add_argument("--model", choices=sorted(HIDDEN), default="mlp",
                        help="mlp: 784-1024-1024-10; tiny: 784-32-10 (host-bound steps, as on a GPU)")
    parser.add_argument("--data-dir", default=None, help="an MNIST folder (default: an 8k/2k split of --source)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="official MNIST test-set files")
    args = parser.parse_args(argv)
    max_batches = 3 if args.quick else None
    rounds = 1 if args.quick else args.rounds
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    device, sync = start(parser, args)
    dm = data_module(args)
    log_dir = tempfile.mkdtemp(prefix="regfit-bench-logs-")
    hidden = HIDDEN[args.model]
    runs = {
        "torch_loop": lambda: torch_loop(dm, hidden, device, sync, max_batches),
        "lightning": lambda: lightning_run(PlainModule(hidden), [], dm, device, sync, max_batches, log_dir),
        "regfit": lambda: lightning_run(RegMLP(hidden), [Regularization(L2(), strength=LAM)], dm, device, sync, max_batches,
                                        log_dir),
    }
    for run in runs.values() if not args.quick else ():  # warm up
        run()
    results = interleaved(runs, rounds)
    epoch = {k: [r[0] for r in v] for k, v in results.items()}
    whole = {k: [r[1] for r in v] for k, v in results.items()}
    n_batches = len(dm.train_dataloader()) if max_batches is None else max_batches
    rows = []
    for num, den, target in [("regfit", "torch_loop", 1.15), ("lightning", "torch_loop", None), ("regfit", "lightning", None)]:
        for label, times in (("epoch", epoch), ("fit() call", whole)):
            med, q1, q3 = ratio_stats(times[num], times[den])
            # the target names the MLP; the tiny model is a diagnostic of host-side overhead
            verdict = check(med, "<=", target, q1, q3) if target and label == "epoch" and args.model == "mlp" else "info"
            rows.append([f"{num} / {den}", label, f"{statistics.median(times[num]):.3f}", f"{statistics.median(times[den]):.3f}",
                         f"{med:.3f} [{q1:.3f}–{q3:.3f}]", verdict])
    print(f"\n### end to end ({args.model} model): one epoch of {len(dm.train_set.y)} MNIST digits, {n_batches} batches of {args.batch}, "
          f"{rounds} rounds (seconds, medians)\n")
    print(table(["ratio", "timed", "s (num)", "s (den)", "ratio median [q1–q3]", "target"], rows))


if __name__ == "__main__":
    main()
