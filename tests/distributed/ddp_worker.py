"""One DDP rank of tests/distributed/test_ddp.py: fit every mode on 2 CPU processes (gloo), save results.

Launched as ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/distributed/ddp_worker.py OUT_DIR`` (Lightning reads the torchrun environment), or as
``python tests/distributed/ddp_worker.py OUT_DIR --lightning-launcher``, where Lightning's ``ddp``
strategy starts the second process itself by re-running this script — the path that
``regfit fit --trainer.strategy=ddp --trainer.devices=2`` takes. Each rank writes
``<run>_rank<r>.pt`` with its final parameters, the metrics the loggers received and the
number of Python-level collectives issued during training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from regfit import Regularization
from regfit.penalties import L1, L2
from tests.helpers import TinyNet

N_SAMPLES, PER_RANK_BATCH, EPOCHS, WORLD = 64, 8, 2, 2

RUNS = {  # name → (penalty, strength, mode); "none" has no term, for counting collectives
    "coupled": (L2(), 1e-2, "coupled"),
    "decoupled": (L2(), 1e-1, "decoupled"),
    "proximal": (L1(), 1e-2, "proximal"),
    "none": None,
}


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(N_SAMPLES, 12, generator=g, dtype=torch.float64),
                         torch.randint(0, 3, (N_SAMPLES,), generator=g))


def model() -> TinyNet:
    return TinyNet(optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))


def callbacks(run: str) -> list[L.Callback]:
    spec = RUNS[run]
    return [] if spec is None else [Regularization(spec[0], strength=spec[1], mode=spec[2], exclude=["bias"])]


class Recorder(Logger):
    """Keeps what every rank's logger connector sends (Lightning's own loggers write on
    rank 0 only; this one records on each rank, to compare them)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    name = property(lambda self: "recorder")
    version = property(lambda self: 0)

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


class CountCollectives(L.Callback):
    """Counts torch.distributed collectives issued from Python during training (DDP's
    gradient all-reduce runs in its C++ reducer and is not counted: the same in every run)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "reduce", "barrier")

    def __init__(self) -> None:
        self.count, self._saved = 0, {}

    def on_train_start(self, trainer, pl_module) -> None:
        for name in self.NAMES:
            original = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._counting(original))

    def _counting(self, original):
        def wrapper(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        return wrapper

    def on_train_end(self, trainer, pl_module) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def trainer(recorder: Logger, counter: L.Callback | None, run: str, **kwargs) -> L.Trainer:
    extra = [counter] if counter is not None else []
    return L.Trainer(max_epochs=EPOCHS, callbacks=callbacks(run) + extra, logger=recorder, log_every_n_steps=1,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, deterministic=True, **kwargs)


def main(out: Path, lightning_launcher: bool) -> None:
    runs = ["coupled"] if lightning_launcher else list(RUNS)
    for run in runs:
        net, recorder, counter = model(), Recorder(), CountCollectives()
        # Each rank reads its own shard: rank r reads samples r, r+2, …, so a global batch
        # is 2×8 consecutive samples. The sampler is given explicitly because Lightning's
        # automatic one always shuffles the training data under DDP.
        t = trainer(recorder, counter, run, strategy="ddp", accelerator="cpu", devices=WORLD,
                    use_distributed_sampler=False)
        sampler = DistributedSampler(dataset(), num_replicas=WORLD, rank=t.global_rank, shuffle=False)
        t.fit(net, DataLoader(dataset(), batch_size=PER_RANK_BATCH, sampler=sampler))
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        tag = f"{run}-launcher" if lightning_launcher else run
        torch.save({"params": state, "rows": recorder.rows, "collectives": counter.count,
                    "world_size": t.world_size}, out / f"{tag}_rank{t.global_rank}.pt")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(next(a for a in args if not a.startswith("--"))), "--lightning-launcher" in args)
