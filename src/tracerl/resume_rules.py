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

A run written before some keys existed is still read (`read_run_config`): a key its config lacks because the
writer predates it is read as its default, or as its value in `LEGACY_DEFAULTS` where the default has since
changed what a run computes, and one warning line names the keys; a key it lacks because the file was cut
off makes the file damaged. Configs carry a first and a last comment line for this (`config.dump_config`);
files written before them are judged by the schema's history (`SCHEMA_BASE`, `SCHEMA_ADDED`).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tracerl.config import (CONFIG_END, CONFIG_HEADER_RE, Config, ConfigError, config_from_tree, describe_fields,
                            dump_config)
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


# ---- configs written before newer keys existed --------------------------------------------------------
# The value a key takes in a config written before the key existed, where its default is not what such runs
# did but another value is. Keys absent here read as their default: for every other key so far the default is
# what runs did before it, except four that came with changed code no value of theirs undoes (alloc.rounds,
# alloc.stage2_root: TRACE's Stage 2; algo.norm_length: Dr.GRPO's divisor; alloc.cost_ema: TRACE's sizing),
# where a resume runs the code it now has, as after any code change. A key added from now on whose default
# changes what a run computes gets its old behaviour here.
LEGACY_DEFAULTS: dict[str, Any] = {
    # default true since 2f0263c (BENCHMARKS 15): runs written before 9ea0509 trained their success predictor
    # without task features, and its checkpointed head takes the narrower input ("saved predictor has N features")
    "predictor.task_features": False,
}


def _keys(text: str) -> frozenset[str]:
    """Lines `section: a b` -> {"section.a", "section.b"}."""
    return frozenset(f"{sec.strip()}.{k}" for line in text.strip().splitlines() for sec, _, ks in [line.partition(":")]
                     for k in ks.split())


# The schema's history up to the commit that put the first and last lines into written configs, for files
# written without them: the first schema (08536a9), then what each commit added (a writer knew all of a
# commit's keys or none; no key has been removed). Frozen: configs written since say themselves which keys
# the writer knew.
SCHEMA_BASE = _keys("""
run: name out_dir dir seed device threads
env: name seed max_turns options
model: preset path dtype chat_template hidden_size num_layers num_heads num_kv_heads vocab_size max_context
sft: enabled demos useless_search wrong_answer steps batch_size lr seed
rollout: prompts_per_step group_size temperature top_p max_turn_tokens batch_size
algo: advantage adv_eps singleton policy_loss clip_low clip_high dual_clip aggregation kl_coef kl_estimator
algo: entropy_coef skip_uniform_groups
trainer: steps lr warmup_steps weight_decay betas grad_clip ppo_epochs mini_batches micro_batch_size bf16
trainer: eval_every eval_size eval_at_start checkpoint_every keep_checkpoints tensorboard progress
""")
SCHEMA_ADDED: dict[str, frozenset[str]] = {
    "5d53be1 (rollout trees)": _keys("""
rollout: allocator trees_per_prompt expansions rounds leaves_per_tree token_budget max_budget_waves
algo: tree_w_intra tree_w_inter
trainer: tree_log_every"""),
    "e607bfc (packed trees)": _keys("algo: dedup_prefix"),
    "236424e (TRACE)": _keys("""
alloc: pool_factor root_rollouts continuations continuation_fraction cap_root cap_anchor root_solver epsilon
alloc: dapo_rounds knapsack_value
predictor: head hidden dropout lr weight_decay batch_size passes buffer_steps warmup weight_cap text_embedding"""),
    "de90609 (RL share)": _keys("sft: rl_share"),
    "57ffec6 (distillation)": _keys("""
distill: mode annotator annotator_model annotator_max_tokens reverse_kl_on_errors kl_weight warmup_steps
distill: hold_steps anneal_steps topk teacher_context teacher_diagnosis max_spans max_span_frac all_tokens_pg"""),
    "d6d87fa (FlowTracer)": _keys("""
credit: name layers num_layers top_fraction boost nonneg_only score source obs_as_source drop_sink topk_parents
credit: answer_fallback_tokens max_len chunk_rows batch_size log_samples"""),
    "410ed60 (TRACE Stage 2 rounds)": _keys("alloc: rounds stage2_root"),
    "3078f8e (pretrained SFT)": _keys("sft: pretrained"),
    "cfd8878 (teacher demos)": _keys("sft: teacher_share"),
    "341cd5e (Dr.GRPO length)": _keys("algo: norm_length"),
    "4138d63 (torchrun)": _keys("run: dist_timeout_s"),
    "b2815a8 (budget parity)": _keys("alloc: cost_ema"),
    "e13634b (EM mode)": _keys("eval: em"),
    "18bc1e9 (engines)": _keys("""
algo: sampler_correction tis_cap
engine: name prefix_caching in_process kv_cache_mb gpu_memory_utilization enforce_eager sleep_during_update
engine: sync_dir url served_model timeout_s retries sync_weights"""),
    "f8f439c (own tasks, trackers)": _keys("""
env: reward tools
data: train_files validation_files test_files heldout_files validation_size max_rows prompt_key answer_key
data: extra_keys id_key source_key
trainer: loggers project"""),
    "9ea0509 (task features)": _keys("predictor: task_features"),
    "b8db8fa (engine dtype)": _keys("engine: dtype"),
    "163adbb (LoRA)": _keys("lora: enabled rank alpha dropout target_modules"),
    "7a6431a (engine weight sync)": _keys("engine: weight_sync device"),
}


@dataclass(frozen=True)
class SavedConfig:
    """A run's config file as read: `tree` with the keys the writer predates filled where `LEGACY_DEFAULTS`
    says (the rest read as their defaults when the tree is validated)."""

    path: Path
    tree: dict
    predates: tuple[str, ...]  # schema keys the writer did not know, in schema order

    def config(self, overrides: Sequence[str] = ()) -> Config:
        return config_from_tree(self.tree, list(overrides), str(self.path))

    def warning(self) -> str:
        """One line naming the keys the writer predates (whole sections as `section.*`)."""
        by_section: dict[str, list[str]] = {}
        for key in self.predates:
            by_section.setdefault(key.split(".")[0], []).append(key)
        names = [f"{sec}.*" if len(keys) == len(_section_keys(sec)) else ", ".join(keys)
                 for sec, keys in by_section.items()]
        legacy = [f"{k}={json.dumps(LEGACY_DEFAULTS[k])}" for k in self.predates if k in LEGACY_DEFAULTS]
        old = f", except {', '.join(legacy)} (what runs did before the key existed)" if legacy else ""
        return (f"warning: {self.path} was written before {len(self.predates)} config keys existed "
                f"({', '.join(names)}); they read as their defaults{old}")


def _section_keys(section: str) -> list[str]:
    return [k for k, _, _ in describe_fields() if k.startswith(section + ".")]


def _sections() -> set[str]:
    return {name for name, f in Config.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def _lacks(path: Path, keys: set[str] | frozenset[str]) -> ConfigError:
    order = [k for k, _, _ in describe_fields() if k in keys]
    more = f" and {len(order) - 3} more" if len(order) > 3 else ""
    return ConfigError(f"{path} is truncated or damaged: it lacks {', '.join(order[:3])}{more}")


def _unmarked_damage(path: Path, text: str, present: set[str]) -> ConfigError | None:
    """A file written before configs carried their first and last lines: complete if it ends with a whole
    line, holds every key of the first schema, and of each later commit's keys all or none (a cut removes
    the end of a file, so it leaves a commit's keys partly written, unless it falls exactly where a section
    the writer wrote last begins: that cut reads as an older writer's file, docs/resume.md §3.1)."""
    if not text.endswith("\n"):
        return ConfigError(f"{path} is truncated or damaged: it ends inside a line")
    if SCHEMA_BASE - present:
        return _lacks(path, SCHEMA_BASE - present)
    for group in SCHEMA_ADDED.values():
        if group & present and group - present:
            return _lacks(path, group - present)
    return None


def read_run_config(path: Path) -> SavedConfig:
    """A run's saved config (`dump_config`'s YAML), refused if it is empty, truncated or not a mapping: a
    damaged file is never read as the defaults. Keys it lacks because the writer predates them are filled
    (`LEGACY_DEFAULTS`) and listed in `predates`."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} cannot be read: {first}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is empty or damaged (not a mapping of config sections)")
    empty = [sec for sec in tree if sec in _sections() and not isinstance(tree[sec], dict)]
    if empty:
        raise ConfigError(f"{path} is truncated or damaged: section {empty[0]} holds no keys")
    present = set(flat(tree))
    header = CONFIG_HEADER_RE.match(text)
    if header:
        if not text.endswith(CONFIG_END + "\n"):
            raise ConfigError(f"{path} is truncated or damaged: its last line '{CONFIG_END}' is missing")
        if len(present) < int(header[1]):
            raise ConfigError(f"{path} is truncated or damaged: it holds {len(present)} keys, its first line says "
                              f"{header[1]}")
    elif (damage := _unmarked_damage(path, text, present)) is not None:
        raise damage
    predates = tuple(k for k, _, _ in describe_fields() if k not in present)
    tree = copy.deepcopy(tree)
    for key in predates:
        if key in LEGACY_DEFAULTS:
            section, _, name = key.partition(".")
            tree.setdefault(section, {})[name] = LEGACY_DEFAULTS[key]
    return SavedConfig(path, tree, predates)


def read_with_copy(path: Path, copy_path: Path | None, log: Callable[[str], None] | None) -> SavedConfig:
    """A run's `config.yaml`, or where it is missing or damaged the checkpoint's copy `copy_path` (one warning
    line); one more where the file read was written before some keys existed. `log=None`: no warnings."""
    try:
        if not path.is_file():
            raise ConfigError(f"{path.parent} is not a run directory (no {CONFIG_FILE})")
        saved = read_run_config(path)
    except ConfigError as e:
        if copy_path is None:
            raise
        if log is not None:
            log(f"warning: {e}; using the copy in {copy_path.parent.name}")
        saved = read_run_config(copy_path)
    if saved.predates and log is not None:
        log(saved.warning())
    return saved


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
    """Append the resume's changes to the history and make config.yaml the config the run now follows (also
    where it changes nothing but was written before some keys existed, or was damaged)."""
    if diff:
        line = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "changes": {k: {"before": a, "after": b} for k, (a, b) in diff.items()},
                "needed_allow_change": result_changing(diff, cfg)}
        history = run_dir / CONFIG_HISTORY_FILE
        old = history.read_text(encoding="utf-8") if history.is_file() else ""
        atomic_write_text(history, old + json.dumps(line) + "\n")
    text, current = dump_config(cfg), run_dir / CONFIG_FILE
    if not current.is_file() or current.read_text(encoding="utf-8", errors="replace") != text:
        atomic_write_text(current, text)
