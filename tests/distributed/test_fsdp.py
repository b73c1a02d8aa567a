"""Sharded parameters (FSDP2 ``fully_shard``, DTensor) on 2 CPU processes (gloo).

Every case trains a float64 TinyNet sharded over 2 ranks with a regfit term attached to a
torch optimizer — the step engine, cautious decay's prepare-then-apply included
(tests/distributed/fsdp_worker.py) — and must equal one unsharded process on the same
global batch: the gathered parameters within 1e-10, and the penalty value, weight norm
and sparsity after every step (each rank sums its shards, one all-reduce adds them up),
and so must the dynamics telemetry (angular update, effective lr, gradient ratio).
"""

from __future__ import annotations


import pytest
import torch

from tests.distributed import fsdp_worker as W
from tests.helpers import batches, launch_ranks



@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch_ranks(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/distributed/fsdp_worker.py"], out)
    return lambda case: [torch.load(out / f"{case}_rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


def reference(case: str):
    """One process, unsharded, the whole global batch."""
    net = W.model()
    reg = W.regularization(case)
    dynamics = []
    logged = W.train(net, reg, W.CASES[case][0](net.parameters()), batches(W.STEPS, W.BATCH), None, dynamics=dynamics)
    return net, reg.term, logged, dynamics


@pytest.mark.parametrize("case", list(W.CASES))
def test_sharded_training_equals_unsharded(case, fsdp_results):
    r0, r1 = fsdp_results(case)
    net, t, ref_logged, ref_dynamics = reference(case)
    ref = dict(net.named_parameters())
    # names are the original ones, so selection and coefficients (global shapes) agree
    assert r0["names"] == r1["names"] == list(ref)
    assert r0["coeffs"] == r1["coeffs"] == [(a.name, a.coeff) for a in t.assignments]
    assert r0["local_rows"]["body.0.weight"] + r1["local_rows"]["body.0.weight"] == 15  # really sharded
    assert r1["local_rows"]["head.weight"] == 1
    diff = max((r["params"][k] - v).abs().max().item() for r in (r0, r1) for k, v in ref.items())
    print(f"{case}: max |param diff| = {diff:.2e}")
    assert diff < 1e-10, diff
    # the term acted: without it the weights end elsewhere
    plain = W.model()
    opt = W.CASES[case][0](plain.parameters())
    for x, y in batches(W.STEPS, W.BATCH):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()
    assert max((plain.state_dict()[k] - v).abs().max().item() for k, v in ref.items()) > 1e-5
    # value, norm and sparsity: the same on both ranks and equal to the unsharded ones
    for r in (r0, r1):
        for got, want in zip(r["logged"], ref_logged):
            assert got[0] == pytest.approx(want[0], rel=1e-10, abs=1e-14), (got, want)
            assert got[1] == pytest.approx(want[1], rel=1e-6), (got, want)  # logged in float32
            assert got[2] == want[2], (got, want)
    assert ref_logged[-1][0] > 0
    # collectives: none for the updates of built-in penalties (a guarded custom penalty
    # agrees on finiteness once per step), one per value and one for norm + sparsity
    expected_updates = W.STEPS if case == "coupled-logcosh-sgd" else 0
    for r in (r0, r1):
        assert r["counts"].get("update", 0) == expected_updates
        assert r["counts"]["log"] == 2 * W.STEPS
    # dynamics: summed over shards, equal to the unsharded measurement; one all-reduce
    # before the step and two after it
    for r in (r0, r1):
        assert [set(d) for d in r["dynamics"]] == [set(d) for d in ref_dynamics]
        for got, want in zip(r["dynamics"], ref_dynamics):
            assert got == pytest.approx(want, rel=1e-8), (got, want)
        assert r["counts"]["telemetry"] == 3 * W.STEPS


def test_proximal_l1_and_grouplasso_make_exact_zeros_on_shards(fsdp_results):
    for case in ("proximal-l1-sgd", "proximal-grouplasso-sgd"):
        r0, _ = fsdp_results(case)
        assert r0["logged"][-1][2] > 0, case  # sparsity
