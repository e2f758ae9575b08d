"""Read a run directory back: config snapshot, step metrics, evaluation rows, checkpoints.

The layout (file names) is `tracerl.rundir`'s, shared with the writers; this module only reads.

Every reader tolerates missing pieces (a run that crashed before its first evaluation, a run dir
copied without checkpoints), returning empty values rather than raising.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracerl.rundir import (BREAKDOWN_FILE, CHECKPOINT_DIR, CONFIG_FILE, CREDIT_DIR, EVAL_FILE, METRICS_FILE,
                            TREES_DIR, step_of)
from tracerl.runlog import as_float, read_jsonl

# Where the summary fields live in a config snapshot; the first path holding a value wins.
# The first paths are tracerl's own config (tracerl/config.py), the others common spellings.
SUMMARY_PATHS = {
    "model": ("model.name", "model.path", "model.preset", "model"),
    "env": ("env.name", "env"),
    "allocator": ("rollout.allocator", "alloc.name", "allocator"),
    "estimator": ("algo.advantage", "adv.estimator", "estimator"),
    "loss": ("algo.policy_loss", "loss.policy", "policy_loss"),
    "steps": ("trainer.steps", "train.steps", "steps"),
    "seed": ("run.seed", "seed"),
}
NAME_PATHS = ("run.name", "run_name", "name")


@dataclass
class RunData:
    run_dir: Path
    config: dict = field(default_factory=dict)
    config_text: str = ""
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    trees: dict[int, Path] = field(default_factory=dict)  # step -> trees/step_XXXXXX.jsonl
    breakdowns: list[dict] = field(default_factory=list)  # eval_breakdown.jsonl rows: model, split, rows
    credit: dict[int, Path] = field(default_factory=dict)  # step -> credit/step_XXXXXX.jsonl

    @property
    def name(self) -> str:
        for path in NAME_PATHS:
            value = lookup(self.config, path)
            if isinstance(value, str) and value:
                return value
        return self.run_dir.resolve().name


def read_config(run_dir: str | os.PathLike) -> tuple[dict, str]:
    """(parsed config, raw text); ({}, "") when there is no snapshot."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        warnings.warn(f"{path}: not valid YAML ({err}); showing it as text only", stacklevel=2)
        return {}, text
    return (config if isinstance(config, dict) else {}), text


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Step rows sorted by step; [] if the run has not logged a step yet."""
    return sorted(_rows(Path(run_dir) / METRICS_FILE), key=_step_key)


def read_evals(run_dir: str | os.PathLike) -> list[dict]:
    """Evaluation rows sorted by step; [] if the run has not been evaluated yet."""
    return sorted(_rows(Path(run_dir) / EVAL_FILE), key=_step_key)


def _step_key(row: dict) -> float:
    step = as_float(row.get("step"))
    return math.inf if step is None else step


def read_run(run_dir: str | os.PathLike) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config, text = read_config(run_dir)
    return RunData(run_dir, config, text, read_metrics(run_dir), read_evals(run_dir), tree_files(run_dir),
                   _rows(run_dir / BREAKDOWN_FILE), tree_files(run_dir, CREDIT_DIR))


def tree_files(run_dir: str | os.PathLike, subdir: str = TREES_DIR) -> dict[int, Path]:
    """Logged rollout trees (or, with subdir="credit", token-credit samples): step ->
    SUBDIR/step_XXXXXX.jsonl, in step order ({} if none)."""
    root = Path(run_dir) / subdir
    if not root.is_dir():
        return {}
    found = {step_of(path): path for path in root.glob("step_*.jsonl")}
    return dict(sorted((step, path) for step, path in found.items() if step is not None))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """checkpoints/step_XXXXXX directories, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def lookup(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_summary(config: dict) -> dict[str, str]:
    """model / env / allocator / estimator / loss / steps / seed, as short strings (skipping
    those the config does not mention)."""
    summary = {}
    for label, paths in SUMMARY_PATHS.items():
        value = next((v for v in (lookup(config, p) for p in paths) if v is not None), None)
        if isinstance(value, dict):
            value = next((value[k] for k in ("name", "path", "kind") if k in value), None)
        if value is not None and not isinstance(value, (dict, list)):
            summary[label] = str(value)
    return summary


def series(rows: list[dict], key: str, x: str = "step") -> list[tuple[float, float]]:
    """(x, y) pairs of rows where both are finite numbers; NaN (logged as null) is a gap."""
    points = []
    for row in rows:
        xv, yv = as_float(row.get(x)), as_float(row.get(key))
        if xv is not None and yv is not None and math.isfinite(xv) and math.isfinite(yv):
            points.append((xv, yv))
    return points


def with_cumulative_tokens(rows: list[dict]) -> list[dict]:
    """Rows with ``cum_gen_tokens`` summed from ``gen_tokens`` if the trainer did not log it."""
    if not rows or all("cum_gen_tokens" in r for r in rows):
        return rows
    if not any("gen_tokens" in r for r in rows):
        return rows
    total, out = 0.0, []
    for row in rows:
        tokens = as_float(row.get("gen_tokens"))
        total += tokens if tokens is not None and math.isfinite(tokens) else 0.0
        out.append({"cum_gen_tokens": total, **row})
    return out
