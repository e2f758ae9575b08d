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
    if (p / "adapter_config.json").is_file():  # a LoRA run's checkpoint: an adapter on a base directory
        return _check_adapter_dir(p)
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model path {p} has no config.json; expected a directory written by save_pretrained")
    if not any((p / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"model path {p} has a config.json but no model.safetensors weights")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"model path {p} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    if "model_type" not in read_json_object(p / "config.json"):
        raise ModelLoadError(f"{p / 'config.json'} has no model_type; expected a config written by save_pretrained")
    for name in TOKENIZER_FILES:
        if (p / name).is_file():
            read_json_object(p / name)
    for shard in _weight_shards(p):
        check_safetensors(shard)
    return p


def _check_adapter_dir(p: Path) -> Path:
    """An adapter directory (tracerl.models.lora): its config, weights and tokenizer parse, its base checks."""
    from tracerl.models.lora import ADAPTER_WEIGHTS, adapter_base

    if not (p / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"model path {p} has an adapter_config.json but no {ADAPTER_WEIGHTS}")
    check_safetensors(p / ADAPTER_WEIGHTS)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"model path {p} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    for name in TOKENIZER_FILES:
        if (p / name).is_file():
            read_json_object(p / name)
    adapter_base(p)
    return p


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or a one-line ModelLoadError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path} is not UTF-8 text (byte {e.start}); the file is damaged") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise ModelLoadError(f"{path} is not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _weight_shards(p: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards its index names)."""
    if (p / WEIGHT_FILES[0]).is_file():
        return [p / WEIGHT_FILES[0]]
    index = p / WEIGHT_FILES[1]
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no weight_map; expected an index written by save_pretrained")
    shards = [p / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise ModelLoadError(f"{index} names {missing[0].name}, which is missing from {p}")
    return shards


def check_safetensors(path: Path) -> None:
    """One-line ModelLoadError unless `path` has a readable safetensors header covering the whole file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path} is not a readable safetensors file ({reason}); the weights are damaged") from None


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a local directory; never touches the network. A directory that
    passes `check_model_dir` but still fails to load is reported in one line naming it. An adapter
    directory (a LoRA run's checkpoint) loads as its base model with the adapter merged in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    if (p / "adapter_config.json").is_file():  # a LoRA checkpoint: its base with the adapter merged in
        from tracerl.models.lora import load_adapted

        return load_adapted(p, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelLoadError(f"model path {p} cannot be loaded ({type(e).__name__}: {reason})") from e
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
