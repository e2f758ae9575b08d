"""Saving and loading policies as plain Hugging Face directories (config + safetensors + tokenizer).

A model directory is only ever made visible by one rename (`rundir.atomic_dir`), so a crash mid-save
leaves a hidden temporary sibling (cleared by the next save), never a directory that looks valid but
holds half the weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from tracerl.errors import ModelLoadError, NotAModelDirError
from tracerl.rundir import atomic_dir

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """Where converted models live: `$TRACERL_CACHE`, else `~/.cache/tracerl`."""
    env = os.environ.get("TRACERL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tracerl"


def atomic_save_pretrained(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out_dir`, replacing it in one step.

    `extra_json` maps file names to JSON objects written next to the weights before the swap (e.g.
    provenance), so they appear together with the model or not at all. Returns `out_dir`.
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        # safetensors is the default (and only) format in the transformers versions we support.
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any((tmp / name).exists() for name in WEIGHT_FILES):
            raise RuntimeError(f"save_pretrained wrote no safetensors weights into {tmp}")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return out


def check_model_dir(path: str | os.PathLike) -> Path:
    """Return `path` as a Path if it looks like a saved policy, else raise with a one-line reason."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist")
    if not p.is_dir():
        raise NotAModelDirError(f"model path {p} is a file; expected a directory written by save_pretrained")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model path {p} has no config.json; expected a directory written by save_pretrained")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"model path {p} has a config.json but no model.safetensors weights")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"model path {p} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return p


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a local directory; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model, tokenizer


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (parallel test workers, two runs sharing one cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
