"""DDP on 2 CPU processes (gloo): every mode keeps the replicas identical, equals one
process on the same global batch, and adds no collective communication of its own.

The ranks run in subprocesses (tests/distributed/ddp_worker.py): once under torchrun for every mode,
once started by Lightning's own ``ddp`` launcher (the ``regfit fit --trainer.strategy=ddp``
path) for one mode.
"""

from __future__ import annotations


import pytest
import torch
from torch.utils.data import DataLoader

from tests.distributed import ddp_worker as W
from tests.helpers import launch_ranks

MODES = ["coupled", "decoupled", "proximal"]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch_ranks(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/distributed/ddp_worker.py"], out)
    launch_ranks(["tests/distributed/ddp_worker.py", "--lightning-launcher"], out)

    def load(tag):
        return [torch.load(out / f"{tag}_rank{r}.pt", weights_only=False) for r in range(W.WORLD)]

    return load


def single_process(run: str):
    """One process, global batch = both ranks' batches, same everything else."""
    net, recorder = W.model(), W.Recorder()
    t = W.trainer(recorder, None, run, accelerator="cpu", devices=1)
    t.fit(net, DataLoader(W.dataset(), batch_size=W.PER_RANK_BATCH * W.WORLD, shuffle=False))
    return net.state_dict(), recorder.rows


def logged(rows, key):
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.parametrize("run", MODES + ["coupled-launcher"])
def test_ddp_replicas_identical_and_equal_to_single_process(run, ddp_results):
    r0, r1 = ddp_results(run)
    assert r0["world_size"] == r1["world_size"] == 2
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # replicas bit-identical
    ref_params, ref_rows = single_process(run.removesuffix("-launcher"))
    diff = max((r0["params"][k] - v).abs().max().item() for k, v in ref_params.items())
    assert diff < 1e-10, diff
    # and the term did act: without it the weights end elsewhere
    unregularized, _ = single_process("none")
    assert (unregularized["body.0.weight"] - r0["params"]["body.0.weight"]).abs().max() > 1e-4

    # Logged penalty: every rank computes the same value locally (no sync needed), once
    # per logging step, equal to the single-process value; no double counting.
    for key in ("train/penalty", f"train/penalty/{W.RUNS[run.removesuffix('-launcher')][0].name}"):
        p0, p1, ref = logged(r0["rows"], key), logged(r1["rows"], key), logged(ref_rows, key)
        assert p0 == p1 and len(p0) == 8 and [s for s, _ in p0] == list(range(8)), key
        assert all(abs(a - b) <= 1e-10 * abs(b) for (_, a), (_, b) in zip(p0, ref)), key
    # The epoch data loss is synchronized (mean over ranks = the single process's mean).
    e0, e1, ref = (logged(x, "train/data_loss_epoch") for x in (r0["rows"], r1["rows"], ref_rows))
    assert e0 == e1 and len(e0) == 2
    assert all(abs(a - b) <= 1e-12 for (_, a), (_, b) in zip(e0, ref))


def test_ddp_penalty_adds_no_collective(ddp_results):
    baseline = ddp_results("none")
    assert baseline[0]["collectives"] == baseline[1]["collectives"]
    for run in MODES:
        for rank in range(W.WORLD):
            assert ddp_results(run)[rank]["collectives"] == baseline[rank]["collectives"], (run, rank)


def test_sharded_parameters_refused_where_shards_are_not_exact(tmp_path):
    """Sharded (DTensor) parameters: elementwise penalties train on them (tests/distributed/test_fsdp.py);
    penalties that are not exact shard by shard fail at fit start, naming the way out."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn import Parameter

    from regfit import Regularization
    from regfit.penalties import GroupLasso, Nuclear
    from tests.helpers import fit

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def sharded(dim):
            model = W.model()
            model.head.weight = Parameter(distribute_tensor(model.head.weight.detach(), mesh, [Shard(dim)]))
            return model

        with pytest.raises(NotImplementedError, match=r"head\.weight.*Nuclear.*exclude.*strategy=ddp"):
            fit(sharded(0), [], [Regularization(Nuclear(), exclude=["ndim<2"])])
        with pytest.raises(NotImplementedError, match=r"head\.weight is sharded along dim \[1\].*GroupLasso.*dims \(0,\)"):
            fit(sharded(1), [], [Regularization(GroupLasso())])
        fit(sharded(0), [], [Regularization(GroupLasso(), include=["head.weight"])])  # rows: accepted
    finally:
        dist.destroy_process_group()
