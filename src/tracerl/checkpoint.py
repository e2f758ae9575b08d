"""Atomic checkpoints: safetensors weights + optimizer tensors + JSON trainer state.

A checkpoint is written into a hidden temporary directory and renamed into place only when every
file is on disk (`rundir.atomic_dir`), so a directory named `step_XXXXXX` is always complete. Nothing
is unpickled on load.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from tracerl.errors import CheckpointError
from tracerl.rundir import CHECKPOINT_MODEL_DIR, atomic_dir, step_name

STATE_FILE = "trainer_state.json"


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
    """Write checkpoints/step_XXXXXX atomically and prune old ones; returns the final path.
    `optimizer` is an optimizer or its state dict in torch's layout (a distributed run gathers it);
    `extra(dir)` writes further files into the checkpoint before it is renamed into place."""
    final = ckpt_root / step_name(step)
    try:
        with atomic_dir(final) as tmp:
            model.save_pretrained(tmp / CHECKPOINT_MODEL_DIR)  # safetensors
            tokenizer.save_pretrained(tmp / CHECKPOINT_MODEL_DIR)
            tensors, meta = state_tensors(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
            if extra is not None:
                extra(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "rng": rng_state()}, indent=1))
    except OSError as e:
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        prev = latest_checkpoint(ckpt_root)
        kept = f"; the previous checkpoint {prev.name} is intact" if prev else ""
        raise CheckpointError(f"could not write checkpoint {final}: {why}{kept}") from e
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {STATE_FILE}: {e}") from None


def read_optimizer(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's optimizer state dict, in torch's layout."""
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    meta = json.loads((ckpt / "optimizer.json").read_text())
    return tensors_state(tensors, meta)


def save_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """NAME.safetensors + NAME.json in `directory` (e.g. the success predictor's state)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(meta))


def load_tensors(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """What `save_tensors` wrote, or None if the checkpoint has no such files."""
    if not (directory / f"{name}.safetensors").is_file():
        return None
    return load_file(str(directory / f"{name}.safetensors")), json.loads((directory / f"{name}.json").read_text())
