"""Checkpoints that verify themselves: a manifest of sizes and checksums, fallback to the newest intact
checkpoint, prunes a kill cannot half-do, and one-line errors for damage and a really full disk."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tracerl import checkpoint as ck
from tracerl.checkpoint import (latest_checkpoint, load_tensors, read_optimizer, read_state, save_checkpoint,
                                save_tensors, verify_checkpoint)
from tracerl.errors import CheckpointError
from tracerl.models.tiny import build_tiny_model, train_tokenizer

WEIGHTS = "model/model.safetensors"


def _tiny():
    """A ~25k-parameter Qwen3, its tokenizer and an AdamW that has taken a step (so it has moments)."""
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return model, tok, opt


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _save(root, step, tiny, **kw):
    model, tok, opt = tiny
    return save_checkpoint(root, step, model, tok, opt, {"totals": {}, "seed": 0}, **kw)


def _run(tmp_path, tiny, steps=(2, 4), keep=2):
    root = tmp_path / "run" / "checkpoints"
    for step in steps:
        _save(root, step, tiny, keep=keep)
    return root


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _latest(root):
    warnings = []
    return latest_checkpoint(root, warn=warnings.append), warnings


def test_a_good_checkpoint_has_a_manifest_of_every_file_and_verifies(tmp_path, tiny):
    root = _run(tmp_path, tiny, steps=(2,))
    ckpt = root / "step_000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert manifest["format"] == 1 and set(manifest["files"]) == on_disk and WEIGHTS in on_disk
    assert verify_checkpoint(ckpt) is None and _latest(root) == (ckpt, [])
    assert read_state(ckpt)["step"] == 2 and read_optimizer(ckpt)["state"]


def test_a_flipped_weight_byte_falls_back_to_the_earlier_checkpoint_with_a_warning(tmp_path, tiny):
    root = _run(tmp_path, tiny)
    _flip(root / "step_000004" / WEIGHTS, -10)  # in the tensor data: the header still parses
    ckpt, warnings = _latest(root)
    assert ckpt == root / "step_000002"
    assert warnings == [f"checkpoint {root / 'step_000004'} is damaged ({WEIGHTS}: checksum mismatch); "
                        "using step_000002"]


def test_the_cli_resolves_a_run_to_its_newest_intact_checkpoint(tmp_path, tiny, caplog):
    from tracerl.cli import _resolve_checkpoint

    root = _run(tmp_path, tiny)
    (root.parent / "config.yaml").write_text("{}\n")
    (root / "step_000004" / "optimizer.safetensors").write_bytes(b"")
    assert _resolve_checkpoint(root.parent) == (root / "step_000002" / "model", root.parent)
    assert "step_000004 is damaged (optimizer.safetensors: size mismatch" in caplog.text


@pytest.mark.parametrize("damage,reason", [
    (lambda c: (c / WEIGHTS).write_bytes((c / WEIGHTS).read_bytes()[:-100]), f"{WEIGHTS}: size mismatch"),
    (lambda c: (c / "optimizer.safetensors").write_bytes(b""), "optimizer.safetensors: size mismatch (0 bytes"),
    (lambda c: _flip(c / WEIGHTS, 3), f"{WEIGHTS}: checksum mismatch"),  # the header's length field
    (lambda c: (c / "manifest.json").unlink(), "missing manifest.json"),
    (lambda c: (c / "manifest.json").write_text("{"), "manifest.json: unreadable"),
    (lambda c: (c / "model" / "config.json").unlink(), "model/config.json: missing"),
], ids=["truncated-weights", "empty-optimizer", "clobbered-header", "no-manifest", "bad-manifest", "missing-file"])
def test_damage_is_named_and_skipped(tmp_path, tiny, damage, reason):
    root = _run(tmp_path, tiny)
    damage(root / "step_000004")
    assert reason in verify_checkpoint(root / "step_000004")
    ckpt, warnings = _latest(root)
    assert ckpt == root / "step_000002" and len(warnings) == 1 and reason in warnings[0]


def test_readers_turn_corrupt_files_into_one_line_errors(tmp_path, tiny):
    ckpt = _run(tmp_path, tiny, steps=(2,)) / "step_000002"
    save_tensors(ckpt, "predictor", {"w": torch.zeros(3)}, {"n": 1})
    (ckpt / "optimizer.safetensors").write_bytes(b"")
    (ckpt / "predictor.safetensors").write_bytes(b"\xff" * 8 + (ckpt / "predictor.safetensors").read_bytes()[8:])
    (ckpt / "trainer_state.json").write_text('{"step": ')
    for read, needle in [(lambda: read_optimizer(ckpt), "no readable optimizer state: Error while deserializing"),
                         (lambda: load_tensors(ckpt, "predictor"), "no readable predictor state"),
                         (lambda: read_state(ckpt), "no readable trainer_state.json")]:
        with pytest.raises(CheckpointError) as e:
            read()
        assert needle in str(e.value) and "\n" not in str(e.value)


def _as_legacy(ckpt):
    """What a checkpoint written before manifests looks like: no manifest, no format key in the state."""
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state[ck.FORMAT_KEY]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_a_checkpoint_from_before_manifests_gets_a_structural_check(tmp_path, tiny):
    root = _run(tmp_path, tiny)
    _as_legacy(root / "step_000002")
    _as_legacy(root / "step_000004")
    assert verify_checkpoint(root / "step_000002") is None
    weights = root / "step_000004" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    assert verify_checkpoint(root / "step_000004").startswith(f"{WEIGHTS}: unreadable (Error while deserializing")
    (root / "step_000002" / "optimizer.json").write_text("[")
    assert verify_checkpoint(root / "step_000002").startswith("optimizer.json: unreadable")


def test_half_pruned_and_crashed_writes_are_never_chosen_and_are_cleared_by_the_next_save(tmp_path, tiny):
    root = _run(tmp_path, tiny, steps=(2, 4, 6, 8), keep=4)
    # a kill inside the old, in-place rmtree: step_000008 lost its weights but kept its state
    _as_legacy(root / "step_000008")
    (root / "step_000008" / WEIGHTS).unlink()
    # ... and inside the new prune (rename first), a save (atomic_dir's temporary) and a replace
    os.replace(root / "step_000002", root / ".pruning-step_000002")
    shutil.rmtree(root / ".pruning-step_000002" / "model")
    shutil.copytree(root / "step_000004", root / ".step_000012.tmp")
    shutil.copytree(root / "step_000004", root / ".step_000006.old")
    (root / "step_000006" / "manifest.json").unlink()  # a new-format checkpoint without its manifest
    ckpt, warnings = _latest(root)
    assert ckpt == root / "step_000004" and [w.split(" is damaged ")[1] for w in warnings] == [
        f"({WEIGHTS}: missing); using step_000004", "(missing manifest.json); using step_000004"]
    _save(root, 10, tiny)
    assert sorted(p.name for p in root.iterdir()) == ["step_000008", "step_000010"]
    assert _latest(root)[0] == root / "step_000010"


def test_pruning_keeps_the_new_checkpoint_and_the_ones_before_it(tmp_path, tiny):
    root = _run(tmp_path, tiny, steps=(2, 4, 6))
    assert sorted(p.name for p in root.iterdir()) == ["step_000004", "step_000006"]
    _save(root, 5, tiny, keep=1)  # resumed from step 4 with keep=1: step 6 (a later save) is not the newest
    assert sorted(p.name for p in root.iterdir()) == ["step_000005", "step_000006"]


def test_every_checkpoint_damaged_is_one_line_naming_the_run(tmp_path, tiny):
    root = _run(tmp_path, tiny)
    for ckpt in root.iterdir():
        (ckpt / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        latest_checkpoint(root)
    msg = str(e.value)
    assert msg.startswith(f"run {root.parent}: every checkpoint is damaged: step_000004 (optimizer.safetensors: "
                          "size mismatch") and "step_000002 (" in msg and "\n" not in msg
    assert latest_checkpoint(tmp_path / "none") is None


def test_a_failure_inside_extra_leaves_no_temporary_and_prunes_nothing(tmp_path, tiny):
    root = _run(tmp_path, tiny)

    def broken(directory):
        raise RuntimeError("predictor exploded")

    with pytest.raises(CheckpointError) as e:
        _save(root, 6, tiny, extra=broken)
    assert str(e.value) == (f"could not write checkpoint {root / 'step_000006'}: predictor exploded; "
                            "the previous checkpoint step_000004 is intact")
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004"]


# Run in a private mount namespace, so the tmpfs never outlives the test: save one checkpoint, shrink the
# tmpfs to half as much again as it then holds, save a second, and report what happened.
DISK_FULL = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint_integrity import _tiny, _save
    from tracerl.checkpoint import verify_checkpoint
    from tracerl.errors import CheckpointError

    disk = Path(sys.argv[1])
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode:
        print(json.dumps({"skip": "cannot mount a tmpfs: " + mount.stderr.strip()}))
        sys.exit()
    tiny, root = _tiny(), disk / "checkpoints"
    _save(root, 1, tiny)
    st = os.statvfs(disk)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"remount,size={used * 3 // 2}", "tmpfs", str(disk)], check=True)
    try:
        _save(root, 2, tiny)
        error = None
    except CheckpointError as e:
        error = str(e)
    print(json.dumps({"used": used, "error": error, "left": sorted(p.name for p in root.iterdir()),
                      "first": verify_checkpoint(root / "step_000001")}))
""")


def _namespace_prefix() -> list[str]:
    """`unshare` into a mount namespace of our own, mapped to root when we are not root."""
    return ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]


def test_a_really_full_disk_is_one_line_and_leaves_the_previous_checkpoint(tmp_path):
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare and mount (util-linux) to mount a small tmpfs in a private namespace")
    (tmp_path / "disk").mkdir()
    p = subprocess.run([*_namespace_prefix(), sys.executable, "-c", DISK_FULL, str(tmp_path / "disk"),
                        os.path.dirname(__file__)], capture_output=True, text=True, timeout=300)
    if p.returncode and "unshare" in p.stderr and not p.stdout:
        pytest.skip(f"cannot make a private mount namespace to mount a tmpfs in: {p.stderr.strip()[-300:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["error"] == (f"could not write checkpoint {tmp_path / 'disk' / 'checkpoints' / 'step_000002'}: "
                               "no space left on device; the previous checkpoint step_000001 is intact"), result
    assert result["left"] == ["step_000001"] and result["first"] is None
