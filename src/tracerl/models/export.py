"""`tracerl export`: a trained policy as one self-contained Hugging Face model directory.

A LoRA run's checkpoint holds only its adapter (and names its base directory); its export is the base
with the adapter merged into the weights — a plain model that `AutoModelForCausalLM.from_pretrained`
loads without peft or tracerl. A full fine-tune's checkpoint already is such a directory: its files are
copied. Either way the directory appears in one rename (`rundir.atomic_dir`) with `tracerl_export.json`
(where it came from) beside the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tracerl.errors import TracerlError
from tracerl.models.io import atomic_save_pretrained, check_model_dir
from tracerl.models.lora import adapter_summary, is_adapter_dir, load_adapted
from tracerl.rundir import atomic_dir

EXPORT_FILE = "tracerl_export.json"


def check_export_target(out: Path) -> None:
    """One line unless `out` is absent, an empty directory or an earlier export (which it replaces)."""
    if out.exists() and not out.is_dir():
        raise TracerlError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise TracerlError(f"--out {out} is a non-empty directory that is not a tracerl export; give a new "
                           "or empty directory")


def export_policy(model_dir: Path, out: Path, source: dict[str, Any]) -> dict[str, Any]:
    """Write the policy of `model_dir` (a checkpoint's model directory) to `out`; returns the provenance
    written to `out/tracerl_export.json`."""
    check_model_dir(model_dir)
    check_export_target(out)
    if is_adapter_dir(model_dir):
        model, tokenizer = load_adapted(model_dir, torch.float32)
        record = {**source, "kind": "lora-merged", "lora": adapter_summary(model_dir)}
        atomic_save_pretrained(model, tokenizer, out, extra_json={EXPORT_FILE: record})
        return record
    record = {**source, "kind": "full"}
    with atomic_dir(out) as tmp:
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
