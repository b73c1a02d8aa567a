"""``regfit thin`` and ``regfit groups --ckpt_path``: a checkpoint's model thinned and saved
atomically, the zero groups and the size after thinning shown, and the mistakes (a bad
checkpoint, an --out that cannot be written, nothing to thin) reported in one paragraph."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from regfit.cli import main, run_cli

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "mnist_cnn_thin.yaml")


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def checkpoint(tmp_path: Path, zero_units: dict[str, list[int]]) -> tuple[str, torch.nn.Module]:
    """A Lightning-style checkpoint of the config's model with the given units of each conv
    zeroed in its filter, bias and BatchNorm channel (as GroupLasso(units=True) leaves them)."""
    model = run_cli(["--config", CONFIG], run=False).model
    with torch.no_grad():
        for conv, units in zero_units.items():
            i = int(conv)
            for t in (model.features[i].weight, model.features[i].bias, model.features[i + 1].weight,
                      model.features[i + 1].bias):
                t[units] = 0.0
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, path)
    return str(path), model


def test_thin_saves_a_smaller_model_with_the_same_outputs(tmp_path, capsys):
    ckpt, model = checkpoint(tmp_path, {"0": [1, 4, 5], "4": [0, 2]})
    assert main(["thin", "--config", CONFIG, "--ckpt_path", ckpt, "--out", "small.pt", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "5 units removed" in out and "features.0" in out and "Saved small.pt" in out
    small = torch.load("small.pt", weights_only=False)
    assert not small.training
    assert small.features[0].out_channels == 29 and small.features[4].out_channels == 62
    model.eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert float((model(x) - small(x)).abs().max()) <= 1e-5
    assert not [p for p in os.listdir(".") if p.startswith(".regfit-thin-")]  # no temporary left


def test_groups_with_a_checkpoint_shows_zero_groups_and_the_size_after_thinning(tmp_path, capsys):
    ckpt, model = checkpoint(tmp_path, {"0": [1, 4, 5], "4": [0, 2]})
    assert main(["groups", "--plain", "--config", CONFIG, "--ckpt_path", ckpt]) == 0
    out = capsys.readouterr().out
    (total,) = [ln for ln in out.splitlines() if ln.startswith("grouplasso ")]
    assert total.endswith("5 of 224")  # 32 + 64 + 128 unit groups, the head excluded
    before = sum(p.numel() for p in model.parameters())
    removed = 3 * (9 + 1 + 2 + 64 * 9) + 2 * (32 * 9 + 1 + 2 + 128 * 49) - 3 * 2 * 9
    assert f"After `regfit thin`: 5 zero units removed, {before:,} → {before - removed:,} parameters" in out


def test_nothing_to_thin_is_a_usage_error_and_keeps_an_existing_out(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, {})
    Path("small.pt").write_bytes(b"keep me")
    assert main(["thin", "--config", CONFIG, "--ckpt_path", ckpt, "--out", "small.pt"]) == 2
    err = capsys.readouterr().err
    assert "Nothing to thin in CNN" in err and "GroupLasso(units=True)" in err and "Traceback" not in err
    assert Path("small.pt").read_bytes() == b"keep me"


@pytest.mark.parametrize("args, message", [
    (["--ckpt_path", "missing.ckpt", "--out", "m.pt"], "--ckpt_path missing.ckpt: no such file"),
    (["--ckpt_path", "not_a.ckpt", "--out", "m.pt"], "is not a checkpoint file"),
    (["--ckpt_path", "other.ckpt", "--out", "m.pt"], r"was not saved from the model of this config \(CNN\)"),
    (["--ckpt_path", "not_a.ckpt", "--out", "no/such/dir/m.pt"], "the folder .*no/such/dir does not exist"),
    (["--ckpt_path", "not_a.ckpt", "--out", "."], "--out . is a directory"),
    (["--out", "m.pt"], "needs --ckpt_path CKPT"),
    (["--ckpt_path", "x.ckpt"], "needs --out FILE"),
])
def test_mistakes_exit_2_with_one_paragraph(tmp_path, capsys, args, message):
    import re

    Path("not_a.ckpt").write_text("hello")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, "other.ckpt")
    assert main(["thin", "--config", CONFIG, *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and not Path("m.pt").exists()


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    Path("ro").mkdir()
    os.chmod("ro", 0o500)
    Path("x.ckpt").write_text("x")
    assert main(["thin", "--config", CONFIG, "--ckpt_path", "x.ckpt", "--out", "ro/m.pt"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_thin_needs_a_config(capsys):
    assert main(["thin", "--ckpt_path", "x.ckpt", "--out", "m.pt"]) == 2
    assert "`regfit thin` needs the config" in capsys.readouterr().err


def test_a_failing_write_is_a_usage_error_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    ckpt, _ = checkpoint(tmp_path, {"0": [1]})
    Path("small.pt").write_bytes(b"old")

    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["thin", "--config", CONFIG, "--ckpt_path", ckpt, "--out", "small.pt"]) == 2
    err = capsys.readouterr().err
    assert "--out small.pt could not be written (No space left on device)" in err
    assert Path("small.pt").read_bytes() == b"old" and not [p for p in os.listdir(".") if p.startswith(".regfit")]
