"""Structured sparsity cashed in: accuracy, parameters and CPU inference time of a CNN
trained with proximal ``GroupLasso(units=True)`` at several λ, before and after
:func:`regfit.export.thin`.

For each λ (0 = no term) the same :class:`regfit.models.CNN` (1→32→64 channels with
BatchNorm, a 128-unit hidden layer; the ``configs/mnist_cnn_thin.yaml`` model) is trained
from the same seed in a plain loop (``regfit.attach``; SGD, lr 0.05, momentum 0.9, batch
64), every tensor but the head's in the term, λ/10 on the fully connected layer (its
units are groups of 3,137 weights, whose threshold t·√|g| is 5–17× a conv filter's: with
one λ it would lose all its units before a conv loses one). Then it is thinned and both models are
measured on the 2,000 held-out digits: test accuracy, parameters, and the time of one
forward pass over a batch of held-out digits in eval mode under ``torch.no_grad()``,
original and thinned interleaved in random order each round; the ratio is the median of
the per-round ratios (with quartiles), so both sides of a ratio come from one run. Torch runs
on one thread by default (``--threads``): on a shared 2-core machine a 2-thread forward pass
waits for its slower thread, which swamps the work itself (here a CNN of 5/2/17 units took
188 ms per batch on 2 threads and 24 ms on 1, under a load of 6).

The data are the official MNIST test-set digits split 8,000 / 2,000
(:func:`regfit.data.build_split_from_test_set`) from ``../shared/data/mnist``;
``--data-dir`` names any MNIST folder instead.

Usage::

    python benchmarks/thin.py                      # λ ∈ {0, 0.01, 0.02, 0.05, 0.1}, 3 epochs each
    python benchmarks/thin.py --lambdas 0 1e-3 --epochs 1
    python benchmarks/thin.py --quick               # a smoke run, numbers meaningless
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import REPO, bench_parser, interleaved, ratio_stats, start, table

import torch
import torch.nn.functional as F

from regfit import Regularization, attach
from regfit.data import MNISTDataModule, build_split_from_test_set
from regfit.export import thinning
from regfit.models import CNN
from regfit.penalties import GroupLasso

DEFAULT_LAMBDAS = [0.0, 0.01, 0.02, 0.05, 0.1]


def load(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) as in-memory tensors."""
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="regfit-thin-")
        build_split_from_test_set(Path(args.source), Path(data_dir), n_train=8000)
    dm = MNISTDataModule(data_dir=str(data_dir), val_fraction=0.0)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm.train_set.x, dm.train_set.y, dm.test_set.x, dm.test_set.y


def train(lam: float, fc_mult: float, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 64) -> CNN:
    torch.manual_seed(0)
    model = CNN(channels=[32, 64], hidden=128, batch_norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    term = Regularization(GroupLasso(units=True), strength=lam, mode="proximal", exclude=["last_layer"],
                          overrides=[{"include": ["fc.*"], "strength_mult": fc_mult}])
    hooks = attach(model, opt, term) if lam else None
    gen = torch.Generator().manual_seed(0)
    model.train()
    done = 0
    while done < steps:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            if done == steps:
                break
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            done += 1
    if hooks is not None:
        hooks.remove()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(500), y.split(500))) / len(y))


def channels(model: CNN) -> str:
    convs = [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)]
    return "/".join(map(str, convs)) + f"/{model.fc[0].out_features}"


def main() -> None:
    parser = bench_parser(__doc__, rounds=30, quick="20 steps, λ ∈ {0, 0.5}, 500 test digits, 3 rounds of a 64-digit batch")
    parser.add_argument("--lambdas", type=float, nargs="+", default=DEFAULT_LAMBDAS)
    parser.add_argument("--epochs", type=float, default=3.0, help="training epochs of 8,000 digits per λ")
    parser.add_argument("--fc-mult", type=float, default=0.1,
                        help="λ multiplier of the fully connected layer's units (its groups are √3137 ≈ 56 wide)")
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--data-dir", default=None)
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    if args.quick:
        args.lambdas, args.rounds, args.batch = [0.0, 0.5], 3, 64
    start(parser, args)
    x, y, xt, yt = load(args)
    if args.quick:
        xt, yt = xt[:500], yt[:500]
    steps = 20 if args.quick else int(args.epochs * len(x) / 64)
    batch = xt[: args.batch]
    print(f"\n### thinning: CNN 1→32→64 (BatchNorm) → 128 → 10, {steps} steps per λ, "
          f"inference on a batch of {len(batch)} digits, {args.rounds} rounds\n")
    rows = []
    for lam in args.lambdas:
        t0 = time.perf_counter()
        model = train(lam, args.fc_mult, x, y, steps)
        trained = time.perf_counter() - t0
        result = thinning(model, batch[:8])
        small = result.model.eval()
        with torch.no_grad():
            diff = float((model(xt) - small(xt)).abs().max())

        def timed(m):
            def run() -> float:
                with torch.no_grad():
                    t = time.perf_counter()
                    m(batch)
                    return time.perf_counter() - t
            return run

        times = interleaved({"original": timed(model), "thinned": timed(small)}, args.rounds)
        med, q1, q3 = ratio_stats(times["thinned"], times["original"])
        t_orig = sorted(times["original"])[len(times["original"]) // 2] * 1e3
        t_thin = sorted(times["thinned"])[len(times["thinned"]) // 2] * 1e3
        rows.append([f"{lam:g}", f"{accuracy(model, xt, yt):.4f}", f"{accuracy(small, xt, yt):.4f}",
                     f"{result.params_before:,}", f"{result.params_after:,}", f"{result.ratio:.3f}",
                     channels(model), channels(small), f"{t_orig:.2f}", f"{t_thin:.2f}",
                     f"{med:.3f} ({q1:.3f}–{q3:.3f})", f"{diff:.1e}", f"{trained:.0f}"])
    print(table(["λ", "acc", "acc thinned", "params", "params thinned", "params ratio", "units", "units thinned",
                 "ms/batch", "ms/batch thinned", "time ratio (q1–q3)", "max |Δ logit|", "train s"], rows))


if __name__ == "__main__":
    main()
