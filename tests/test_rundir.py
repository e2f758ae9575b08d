"""The run-directory layout and the atomic writes every writer goes through (files and directories)."""

import os
import stat

import pytest
import torch

from tracerl import rundir
from tracerl.checkpoint import latest_checkpoint, read_state, save_checkpoint
from tracerl.errors import CheckpointError


def test_atomic_write_replaces_keeps_the_mode_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    rundir.atomic_write_text(path, "a\n")
    assert path.read_text() == "a\n"
    os.chmod(path, 0o640)
    rundir.atomic_write_bytes(path, b"b\n")
    assert path.read_bytes() == b"b\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    rundir.atomic_write_text(path, "old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        rundir.atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with rundir.atomic_dir(target) as tmp:
        assert not target.exists()
        (tmp / "weights").write_text("1")
    assert (target / "weights").read_text() == "1"
    with pytest.raises(RuntimeError):
        with rundir.atomic_dir(target) as tmp:
            (tmp / "weights").write_text("2")
            raise RuntimeError("crash mid-save")
    assert (target / "weights").read_text() == "1"
    with rundir.atomic_dir(target) as tmp:  # replacing a directory that exists
        (tmp / "other").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["other"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_layout_names_and_steps(tmp_path):
    assert rundir.trees_file(tmp_path, 12) == tmp_path / "trees" / "step_000012.jsonl"
    assert rundir.credit_file(tmp_path, 3).name == "step_000003.jsonl"
    assert [rundir.step_of(n) for n in ("step_000012.jsonl", "step_000004", "step_x.jsonl", "metrics.jsonl")] == \
        [12, 4, None, None]


class _Saved:
    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")


def test_checkpoints_are_atomic_and_a_failed_one_keeps_the_previous(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    root = tmp_path / rundir.CHECKPOINT_DIR
    save_checkpoint(root, 1, _Saved(), _Saved(), opt, {"seed": 0})
    save_checkpoint(root, 1, _Saved(), _Saved(), opt, {"seed": 1})  # the same step again replaces it
    assert read_state(latest_checkpoint(root))["seed"] == 1

    def broken(directory):
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="no space left on device; the previous checkpoint step_000001"):
        save_checkpoint(root, 2, _Saved(), _Saved(), opt, {"seed": 2}, extra=broken)
    assert [p.name for p in root.iterdir()] == ["step_000001"]
    assert (root / "step_000001" / rundir.CHECKPOINT_MODEL_DIR / "config.json").is_file()
