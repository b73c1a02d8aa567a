"""Atomic writes: the old file or the whole new one, never a part, and no temporary left."""

from __future__ import annotations

import os

import pytest
import torch

from regfit.atomic import atomic_save, atomic_write_all


def test_atomic_save_leaves_the_old_file_when_saving_fails(tmp_path):
    target = tmp_path / "m.pt"
    target.write_bytes(b"old")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save(Unpicklable(), str(target))
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.pt"]
    atomic_save({"w": torch.ones(2)}, target)
    assert torch.equal(torch.load(target)["w"], torch.ones(2)) and os.listdir(tmp_path) == ["m.pt"]


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import regfit.atomic as atomic

    real_open, calls = open, []

    def full_disk_on_second(path, mode="r", *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", full_disk_on_second, raising=False)
    with pytest.raises(OSError):
        atomic_write_all({tmp_path / "a": b"1", tmp_path / "b": b"2"})
    assert os.listdir(tmp_path) == []
