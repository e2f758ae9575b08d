"""What a resumed run may change, and the record of what it did change.

A resume continues a run from its checkpoint; the numbers after it are only the continuation of the
numbers before it if the config is the same. So `tracerl train --resume RUN key=value` compares the
config it would run with against the config the checkpoint was written under, key by key:

- keys in `NO_EFFECT` only steer where and how often things are written or how long to wait for a peer;
  they change freely, and so does `trainer.steps` (where the run stops) unless a schedule is a fraction
  of it (the distillation weight's default warm-up and anneal);
- keys under `FIXED` define the checkpoint's weights, tokenizer and task (the model, the environment, the
  SFT warm start that is also the KL reference, LoRA adapters or full weights): they never change on resume — start a new run;
- every other key changes what the run computes (the seed, the learning rate, the allocator, …): a
  change is refused with one line naming the keys unless `--allow-change` is passed, and then recorded.

Every resume that changes anything appends one line to `RUN/config_history.jsonl` (step, time, each key's
old and new value, whether `--allow-change` was needed), and `config.yaml` is rewritten to the config the
run now follows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from tracerl.config import Config, ConfigError, describe_fields, dump_config
from tracerl.rundir import CONFIG_FILE, CONFIG_HISTORY_FILE, atomic_write_text

NO_EFFECT = frozenset({
    "run.name", "run.out_dir", "run.dir", "run.dist_timeout_s",
    "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.tensorboard", "trainer.progress",
    "trainer.tree_log_every", "credit.log_samples", "trainer.loggers", "trainer.project",
})
FIXED = ("model.", "env.", "sft.", "data.", "lora.")  # lora: adapters or full weights, their shape


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, stopping at the schema's leaves (env.options stays one value)."""
    leaves = {k for k, _, _ in describe_fields()}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in leaves:
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def read_run_config(path: Path) -> dict:
    """A run's saved config (`dump_config`'s YAML), refused if it is empty, truncated or not a mapping:
    a damaged file is never read as the defaults."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} cannot be read: {first}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is empty or damaged (not a mapping of config sections)")
    missing = sorted({k for k, _, _ in describe_fields()} - set(flat(tree)))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{path} is truncated or damaged: it lacks {', '.join(missing[:3])}{more}")
    return tree


def changes(before: Config, after: Config) -> dict[str, tuple[Any, Any]]:
    """Every key whose value differs, as (before, after)."""
    a, b = flat(before.model_dump(mode="json")), flat(after.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def result_changing(diff: dict[str, tuple[Any, Any]], cfg: Config) -> list[str]:
    """The changed keys that change what the run computes (need --allow-change)."""
    d = cfg.distill
    steps_free = d.mode == "off" or (d.warmup_steps is not None and d.anneal_steps is not None)
    return [k for k in diff if k not in NO_EFFECT and not (k == "trainer.steps" and steps_free)]


def check_changes(diff: dict[str, tuple[Any, Any]], cfg: Config, allow: bool, source: str) -> None:
    """Refuse what a resume of `cfg` may not change (one line naming the keys)."""
    def show(keys):
        return ", ".join(f"{k} {diff[k][0]!r} -> {diff[k][1]!r}" for k in keys)

    fixed = [k for k in diff if k.startswith(FIXED)]
    if fixed:
        raise ConfigError(f"resume cannot change {show(fixed)}: these define the checkpoint's model, tokenizer "
                          f"and task ({source}); start a new run instead")
    changed = result_changing(diff, cfg)
    if changed and not allow:
        raise ConfigError(f"resume would change {show(changed)} against {source}; pass --allow-change to continue "
                          "with the new values (recorded in config_history.jsonl)")


def record(run_dir: Path, cfg: Config, diff: dict[str, tuple[Any, Any]], step: int) -> None:
    """Append the resume's changes to the history and make config.yaml the config the run now follows."""
    if not diff:
        return
    line = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "changes": {k: {"before": a, "after": b} for k, (a, b) in diff.items()},
            "needed_allow_change": result_changing(diff, cfg)}
    history = run_dir / CONFIG_HISTORY_FILE
    old = history.read_text(encoding="utf-8") if history.is_file() else ""
    atomic_write_text(history, old + json.dumps(line) + "\n")
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
