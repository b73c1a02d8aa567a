"""The benchmark scripts still run and print their tables (a smoke run, nothing timed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_step_overhead_prints_its_tables():
    out = run_script("benchmarks/step_overhead.py", "--quick", "--models", "cnn")
    assert out.startswith("machine: CPU: ")
    for heading in ("### step: cnn", "regularization alone", "### memory:", "### lightning:"):
        assert heading in out
    for row in ("| regfit_coupled_l2 ", "| naive_l2_in_loss ", "| regfit_decoupled_l2_adam_foreach ",
                "| regfit_l2_logging_every_50 "):
        assert row in out
    # the memory bound of the batched kernels holds (a measurement, not a timing)
    l1_rows = [line for line in out.splitlines() if line.startswith("| cnn") and " l1 " in line]
    assert len(l1_rows) == 3 and all(": ok " in line for line in l1_rows), l1_rows  # coupled, decoupled, proximal
    lhalf_rows = [line for line in out.splitlines() if line.startswith("| cnn") and " lhalf " in line]
    assert len(lhalf_rows) == 3 and all(": ok " in line for line in lhalf_rows), lhalf_rows


def test_end_to_end_prints_its_table(mnist_source):
    out = run_script("benchmarks/end_to_end.py", "--quick", "--source", str(mnist_source))
    assert "### end to end (mlp model): one epoch of 8000 MNIST digits, 3 batches" in out
    for row in ("| regfit / torch_loop ", "| lightning / torch_loop ", "| regfit / lightning "):
        assert row in out
    out = run_script("benchmarks/end_to_end.py", "--quick", "--model", "tiny", "--source", str(mnist_source))
    assert "### end to end (tiny model)" in out


def test_verdicts_call_a_miss_inside_the_quartiles_a_tie():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from _common import check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert check(1.01, "<=", 1.02, 0.98, 1.05) == "<= 1.02: ok"
    assert check(1.03, "<=", 1.02, 1.00, 1.05) == "<= 1.02: tie (within quartiles)"
    assert check(1.08, "<=", 1.05, 1.06, 1.10) == "<= 1.05: MISSED"
    assert check(1.05, ">=", 1.08, 1.02, 1.09) == ">= 1.08: tie (within quartiles)"
    assert check(1.05, ">=", 1.08) == ">= 1.08: MISSED"  # no quartiles: no tie


def test_lhalf_kernels_prints_its_table():
    out = run_script("benchmarks/lhalf_kernels.py", "--quick", "--models", "cnn")
    assert "### coupled L1/2 kernels: cnn" in out
    for row in ("| regfit ", "| mul_add ", "| chunked "):
        assert row in out


def test_thin_prints_its_table(mnist_source):
    out = run_script("benchmarks/thin.py", "--quick", "--source", str(mnist_source))
    assert "### thinning: CNN 1→32→64 (BatchNorm) → 128 → 10, 20 steps per λ" in out
    rows = [line for line in out.splitlines() if line.startswith("| 0 ") or line.startswith("| 0.5 ")]
    assert len(rows) == 2
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells[0][3] == cells[0][4] == "421,834"  # λ = 0: nothing removed
    assert cells[1][7] == "1/1/1" and cells[1][2] == cells[1][1]  # everything zero: one unit per layer stays


def test_dynamics_overhead_prints_its_tables():
    out = run_script("benchmarks/dynamics_overhead.py", "--quick", "--models", "mlp")
    assert out.startswith("machine: CPU: ")
    for heading in ("### alone: one logged step's dynamics", "### trainer: mlp in a Trainer",
                    "| log_every_n_steps=1 ", "| log_every_n_steps=50 ", "scale-invariance probe at the first batch"):
        assert heading in out
    assert "| mlp " in out and "MiB" in out  # the snapshot's size
