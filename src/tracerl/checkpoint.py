"""Atomic, verifiable checkpoints: safetensors weights + optimizer tensors + JSON trainer state.

A checkpoint is written into a hidden temporary directory and renamed into place only when every
file is on disk (`rundir.atomic_dir`), so a directory named `step_XXXXXX` is complete when written.
Its last file, `manifest.json`, holds every other file's size and sha256: `latest_checkpoint` picks the
newest checkpoint that still matches it (bit rot, truncation and a clobbered header are caught, and
an earlier checkpoint is used instead). Old checkpoints are renamed out of `step_*` before they are
removed, so a kill mid-removal never leaves a partial one that looks complete. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tracerl.errors import CheckpointError, error_reason
from tracerl.rundir import CHECKPOINT_MODEL_DIR, atomic_dir, step_name, step_of

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
FORMAT_KEY = "checkpoint_format"  # in trainer_state.json: the checkpoint has (had) a manifest
PRUNING_PREFIX = ".pruning-"
# what a checkpoint written before manifests existed must hold (the structural check of `verify_checkpoint`)
REQUIRED_FILES = (STATE_FILE, "optimizer.safetensors", "optimizer.json", f"{CHECKPOINT_MODEL_DIR}/config.json")
INDEX_FILE = "model.safetensors.index.json"
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError)
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return state_tensors(opt.state_dict())


def state_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict (torch's layout) as safetensors tensors + JSON-able metadata."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    opt.load_state_dict(tensors_state(tensors, meta))


def tensors_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `state_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    import random

    py = random.getstate()
    return {"python": [py[0], list(py[1]), py[2]], "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, optimizer, state: dict[str, Any], keep: int = 2,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoints/step_XXXXXX atomically, its manifest last, and prune old ones; returns the final path.
    `optimizer` is an optimizer or its state dict in torch's layout (a distributed run gathers it);
    `extra(dir)` writes further files into the checkpoint before it is renamed into place. Any failure
    is one `CheckpointError`, leaves no temporary behind and prunes nothing."""
    final = ckpt_root / step_name(step)
    remove_debris(ckpt_root)
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp / CHECKPOINT_MODEL_DIR)  # safetensors
            tokenizer.save_pretrained(tmp / CHECKPOINT_MODEL_DIR)
            tensors, meta = state_tensors(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
            if extra is not None:
                extra(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(
                {**state, "step": step, "rng": rng_state(), FORMAT_KEY: MANIFEST_FORMAT}, indent=1))
            (tmp / MANIFEST_FILE).write_text(json.dumps(build_manifest(tmp), indent=1))
    except Exception as e:
        raise CheckpointError(f"could not write checkpoint {final}: {error_reason(e)}{_intact(ckpt_root)}") from e
    prune(ckpt_root, step, keep)
    return final


def _intact(ckpt_root: Path) -> str:
    """The failure message's note on which earlier checkpoint still verifies, if any."""
    try:
        prev = latest_checkpoint(ckpt_root, warn=lambda _: None)
    except CheckpointError:
        prev = None
    return f"; the previous checkpoint {prev.name} is intact" if prev else ""


def remove_debris(ckpt_root: Path) -> None:
    """Remove what a killed save or prune left: `.pruning-step_*` and atomic_dir's `.step_*.tmp` / `.old`."""
    for p in ckpt_root.glob(".*"):
        if p.is_dir() and (p.name.startswith(PRUNING_PREFIX)
                           or (p.name.startswith(".step_") and p.name.endswith((".tmp", ".old")))):
            shutil.rmtree(p, ignore_errors=True)


def prune(ckpt_root: Path, step: int, keep: int) -> None:
    """Keep the checkpoint of `step` and the keep-1 before it; each removed one is first renamed out of
    `step_*` (atomic), so a kill inside the removal leaves only `.pruning-*` debris, never a partial
    checkpoint. Checkpoints after `step` (left by a run resumed from an earlier one) are not touched."""
    older = [p for p in checkpoint_dirs(ckpt_root) if step_of(p) < step]
    for old in older[:max(len(older) - keep + 1, 0)]:
        doomed = ckpt_root / f"{PRUNING_PREFIX}{old.name}"
        try:
            os.replace(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """Every `step_XXXXXX` directory, oldest first, intact or not (`[-1]` is the newest regardless)."""
    found = sorted((step_of(p), p) for p in ckpt_root.glob("step_*") if p.is_dir() and step_of(p) is not None)
    return [p for _, p in found]


def latest_checkpoint(ckpt_root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that verifies; None when there is none at all. Each newer damaged one is
    reported through `warn` (default: this module's logger), one line each; when every checkpoint is
    damaged, a `CheckpointError` names the run and why."""
    damaged = []
    for ckpt in reversed(checkpoint_dirs(ckpt_root)):
        why = verify_checkpoint(ckpt)
        if why is None:
            for bad, reason in damaged:
                (warn or log.warning)(f"checkpoint {bad} is damaged ({reason}); using {ckpt.name}")
            return ckpt
        damaged.append((ckpt, why))
    if damaged:
        listed = ", ".join(f"{bad.name} ({reason})" for bad, reason in damaged)
        raise CheckpointError(f"run {ckpt_root.parent}: every checkpoint is damaged: {listed}")
    return None


def file_sha256(path: Path) -> str:
    """Hex sha256 in chunks, so a multi-GB weight shard is never in memory at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(ckpt: Path) -> dict[str, Any]:
    """Every file under `ckpt` (but the manifest) with its size and sha256, to detect damage on load."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p != ckpt / MANIFEST_FILE)
    return {"format": MANIFEST_FORMAT, "files": {p.relative_to(ckpt).as_posix(): {
        "size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}}


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when `ckpt` is intact, else one line saying why not (missing manifest or file, size or
    checksum mismatch). A checkpoint written before manifests existed (no manifest.json, and a
    trainer_state.json that parses and lacks `checkpoint_format`) gets a cheap structural check
    instead: the expected files exist, every safetensors header parses and covers its file, and every
    JSON file (trainer_state.json, optimizer.json, ...) parses."""
    if (ckpt / MANIFEST_FILE).is_file():
        return _manifest_problem(ckpt)
    if _is_legacy(ckpt):
        return _structure_problem(ckpt)
    return f"missing {MANIFEST_FILE}"


def _manifest_problem(ckpt: Path) -> str | None:
    """Sizes first (cheap, catches truncation), then checksums."""
    try:
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        fmt = int(manifest["format"])
        files = {str(rel): (int(e["size"]), str(e["sha256"])) for rel, e in manifest["files"].items()}
    except _READ_ERRORS as e:
        return f"{MANIFEST_FILE}: unreadable ({error_reason(e)})"
    if fmt > MANIFEST_FORMAT:
        return f"{MANIFEST_FILE}: format {fmt} is newer than this tracerl reads ({MANIFEST_FORMAT})"
    for rel, (size, _) in files.items():
        actual = (ckpt / rel).stat().st_size if (ckpt / rel).is_file() else None
        if actual is None:
            return f"{rel}: missing"
        if actual != size:
            return f"{rel}: size mismatch ({actual} bytes, the manifest says {size})"
    for rel, (_, sha) in files.items():
        try:
            if file_sha256(ckpt / rel) != sha:
                return f"{rel}: checksum mismatch"
        except OSError as e:
            return f"{rel}: unreadable ({error_reason(e)})"
    return None


def _is_legacy(ckpt: Path) -> bool:
    """Written before manifests: its trainer state parses and does not carry `FORMAT_KEY`."""
    try:
        return FORMAT_KEY not in json.loads((ckpt / STATE_FILE).read_text())
    except _READ_ERRORS:
        return False


def _structure_problem(ckpt: Path) -> str | None:
    """The expected files exist and parse (see `verify_checkpoint`); no hashing."""
    model = ckpt / CHECKPOINT_MODEL_DIR
    try:
        weights = [f"{CHECKPOINT_MODEL_DIR}/{w}" for w in _weight_files(model)]
    except _READ_ERRORS as e:
        return f"{CHECKPOINT_MODEL_DIR}/{INDEX_FILE}: unreadable ({error_reason(e)})"
    for rel in (*REQUIRED_FILES, *weights):
        if not (ckpt / rel).is_file():
            return f"{rel}: missing"
    for path in sorted(ckpt.rglob("*")):
        problem = _file_problem(path) if path.is_file() else None
        if problem:
            return f"{path.relative_to(ckpt).as_posix()}: {problem}"
    return None


def _weight_files(model: Path) -> list[str]:
    """model.safetensors, or the shards its index names (Hugging Face splits a large model)."""
    if not (model / INDEX_FILE).is_file():
        return ["model.safetensors"]
    return sorted(set(_json(model / INDEX_FILE)["weight_map"].values()))


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _file_problem(path: Path) -> str | None:
    """A safetensors header that does not parse or cover its file, or a JSON file that does not parse."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                pass
        elif path.suffix == ".json":
            _json(path)
    except _READ_ERRORS as e:
        return f"unreadable ({error_reason(e)})"
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except _READ_ERRORS as e:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {STATE_FILE}: {error_reason(e)}") from None


def read_optimizer(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's optimizer state dict, in torch's layout."""
    try:
        return tensors_state(load_file(str(ckpt / "optimizer.safetensors")), _json(ckpt / "optimizer.json"))
    except _READ_ERRORS as e:
        raise CheckpointError(f"checkpoint {ckpt} has no readable optimizer state: {error_reason(e)}") from None


def save_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """NAME.safetensors + NAME.json in `directory` (e.g. the success predictor's state)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(meta))


def load_tensors(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """What `save_tensors` wrote, or None if the checkpoint has no such files."""
    if not (directory / f"{name}.safetensors").is_file():
        return None
    try:
        return load_file(str(directory / f"{name}.safetensors")), _json(directory / f"{name}.json")
    except _READ_ERRORS as e:
        raise CheckpointError(f"checkpoint {directory} has no readable {name} state: {error_reason(e)}") from None
