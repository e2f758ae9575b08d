"""The reference training loop: any allocator, estimator, loss and layout, one step read top to bottom.

Life cycle (torchtune-style): setup -> train -> save. One step:

    tasks  = next prompts (a pure function of seed and step, so resume is exact)
    trees  = ALLOCATORS[rollout.allocator](ctx, tasks)    (G chains, Tree-GRPO / TRACE trees, ...)
    predictor.observe(trees)                            (allocators with the uses_predictor trait)
    adv    = tree_advantages(trees, algo.advantage)     ({leaf: A} per tree)
    batch  = build_batch(kept trees, layout)            (rows: a row per leaf; trees: shared nodes once)
    loss   = objective(model, micro-batch, spec)        (policy loss + KL + entropy + distillation,
                                                         through the registries, on every layout)
    AdamW step with gradient clipping; metrics, evaluation and atomic checkpoints on schedule.

Under torchrun the same loop runs on every rank (`tracerl.distributed`): each rank rolls out its share
of the step's prompts (a prompt's trees stay on it), the policy is sharded with FSDP2, the objective's
denominators are global, metrics are reduced over ranks, and rank 0 alone writes the run directory.
Generation then runs on an unsharded copy of the policy, reloaded after every update.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from tracerl import resume_rules, rundir, seeding
from tracerl.algos.advantages import tree_advantages
from tracerl.algos.metrics import effective_ratio, zero_advantage_fraction
from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.allocate.budget import CostModel
from tracerl.allocate.predictor import SuccessPredictor, TextEncoder
from tracerl.allocate.sharded import ShardedEngine, ShardedPredictor, fingerprint, owner
from tracerl.backends.base import SamplingParams
from tracerl.backends.hf import HFPolicy
from tracerl.checkpoint import (latest_checkpoint, load_tensors, read_optimizer, read_state, remove_debris,
                                save_checkpoint, save_tensors, set_rng_state)
from tracerl.config import Config, dump_config, load_config
from tracerl.credit import CreditStep, TokenCredit, write_samples
from tracerl.credit.attention import SUPPORTED_MODEL_TYPES
from tracerl.distill import Distiller
from tracerl.distributed import World, connect, launched_rank
from tracerl.errors import CheckpointError, DataError, TracerlError
from tracerl.evaluate import evaluate, summarize
from tracerl.models.io import load_policy
from tracerl.objective import Denominators, LossSpec, objective, score_only
from tracerl.packing import TokenBatch, build_batch, join_packs, split_by_pack
from tracerl.rollout import RolloutCost, RolloutEngine
from tracerl.runlog import LoggerContext, RunLogger, read_jsonl
from tracerl.setup import apply_threads, build_backend, build_env, preflight, resolve_model_path, uses_sft
from tracerl.sft import split_train
from tracerl.tree import RolloutTree, mixed_anchors, tree_leaves, write_jsonl

TOTALS = ("cum_gen_tokens", "cum_trajectories", "cum_tool_calls")
# How a step's metric combines over ranks: counts add up, times take the slowest rank, values that are
# the same on every rank (the global gradient norm, the schedule) come from rank 0, the rest are means
# weighted by each rank's leaves.
SUMMED = {"gen_tokens", "prefill_tokens", "prefill_saved", "tool_calls", "trajectories", "continuations",
          "root_rollouts", "leaves", "trained_trajectories", "prompts_used", "train_tokens",
          "train_tokens_per_leaf", "loss", "rollout_gen_tokens", "annotator_gen_tokens", "annotator_policy_tokens"}
SLOWEST = {"rollout_s", "update_s", "credit_s", "predictor_s", "sync_s", "features_s", "gpu_mem_gib"}
SHARED = {"lr", "grad_norm"}


def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's own (see SUMMED, SLOWEST, SHARED)."""
    if len(per_rank) == 1:
        return per_rank[0]
    weights = [float(m.get("leaves", 1.0)) for m in per_rank]
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in per_rank for k in m):
        vals = [(m[key], w) for m, w in zip(per_rank, weights) if key in m]
        if key in SUMMED or key.startswith("reward_errors"):  # counts of failed reward calls (tracerl.envs.custom)
            out[key] = float(sum(v for v, _ in vals))
        elif key in SLOWEST:
            out[key] = float(max(v for v, _ in vals))
        elif key in SHARED:
            out[key] = float(vals[0][0])
        else:
            total = sum(w for _, w in vals)
            out[key] = float(sum(v * w for v, w in vals) / total) if total else float(vals[0][0])
    return out


class _NoLogger:
    """What ranks other than 0 log to: nothing."""

    def log_step(self, *a, **k) -> None: ...

    def log_eval(self, *a, **k) -> None: ...

    def close(self) -> None: ...


class Trainer:
    def __init__(self, cfg: Config, resume: Path | None = None, overwrite: bool = False, log=print,
                 world: World | None = None):
        self.cfg, self.log = cfg, log
        self.resume_dir = resume
        self.overwrite = overwrite
        self.world = world
        self._lock = None  # the run directory's lock (rank 0), from setup until the run ends
        self.checkpoint: Path | None = None  # the checkpoint a resume continues from (chosen by rank 0)
        self.config_changes: dict = {}  # what this resume changes against its checkpoint (tracerl.resume_rules)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        """Everything before the first step; a failure lets go of the run directory."""
        try:
            self._setup()
        except BaseException:
            self.release()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        if (self.world.rank if self.world is not None else launched_rank()) != 0:
            self.log = lambda *a, **k: None
        preflight(cfg)  # env options, methods, device, model directory: before anything is built or written
        apply_threads(cfg)
        # The initial policy before the process group: an SFT warm start trained here is saved by
        # transformers, which writes files from rank 0 only once a group exists; until then ranks take
        # turns on the cache's file lock (the first trains, the others reuse).
        self.model_path = resolve_model_path(cfg, self.log)
        if cfg.lora.enabled:  # every target module exists: checked on an empty copy, before anything is written
            from tracerl.models.lora import check_targets

            check_targets(cfg.lora, self.model_path)
        if self.world is None:
            self.world = connect(cfg.run.device, cfg.run.dist_timeout_s)
        self._setup_data()  # reads the data files: a bad one stops the run before its directory is written
        self.run_dir = Path(self.resume_dir) if self.resume_dir is not None else cfg.run_dir()
        self._on_main("taking the run directory", self._take_run_dir)
        if self.resume_dir is not None:  # the checkpoint rank 0 chose when it took the run directory
            found = self.checkpoint if self.world.is_main else None
            self.checkpoint = self.world.broadcast(str(found) if found is not None else None)
            if self.checkpoint is None:
                raise CheckpointError(f"no complete checkpoint under {self.run_dir / rundir.CHECKPOINT_DIR}; "
                                      "cannot resume")
            self.checkpoint = Path(self.checkpoint)
        self._setup_model()
        self.credit = TokenCredit(cfg.credit, self.model, self.tokenizer, cfg.run.seed)  # identity unless credit.name is set
        # the trainable weights only (every weight, unless LoRA froze the base): the same order either way
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.trainer.lr,
                                           betas=cfg.trainer.betas, weight_decay=cfg.trainer.weight_decay)
        self._setup_predictor()
        self.distiller = Distiller(cfg, self.env, self.policy, self.spec.temperature,
                                   getattr(self.model.config, "max_position_embeddings", None)) \
            if cfg.distill.mode != "off" else None
        self.prompt_stats: dict[str, float] = {}  # task id -> success rate of its leaves at its latest visit
        self.costs = CostModel()  # running f and chain tokens of allocators without a predictor (it carries its own)
        self.start_step, self.totals = 0, {k: 0 for k in TOTALS}
        if self.resume_dir is not None:
            self._restore()
        self.logger = self._run_logger() if self.world.is_main else _NoLogger()

    def _run_logger(self) -> RunLogger:
        """The loggers of trainer.loggers (metrics.jsonl always; trainer.tensorboard / trainer.progress = false
        drop tensorboard / console)."""
        import tracerl.trackers  # noqa: F401  (registers wandb and mlflow with LOGGERS)

        t = self.cfg.trainer
        names = [n for n in t.loggers if not (n == "tensorboard" and not t.tensorboard)]
        ctx = LoggerContext(self.run_dir, self.cfg.run.name, t.project, self.cfg.model_dump(mode="json"),
                            total_steps=t.steps, progress=t.progress)
        return RunLogger(self.run_dir, tensorboard="tensorboard" in names, loggers=names, context=ctx,
                         resume_step=self.start_step if self.resume_dir is not None else None)

    def _on_main(self, what: str, fn, *args) -> None:
        """Run `fn` on rank 0 only (the run directory's files); if it fails, every rank stops with its error."""
        error: TracerlError | None = None
        if self.world.is_main:
            try:
                fn(*args)
            except TracerlError as e:
                if self.world.size == 1:
                    raise
                error = e
        if self.world.size > 1:
            message = self.world.broadcast(None if error is None else str(error))
            if error is not None:
                raise error
            if message is not None:
                raise TracerlError(f"rank {self.world.rank}: rank 0 failed {what}: {message}")

    def _take_run_dir(self) -> None:
        """Lock the run directory (one training process per run; read-only commands need no lock); a new
        run then starts in an empty directory, or clears a tracerl run with --overwrite, never anything else."""
        try:
            self._lock = rundir.RunLock(self.run_dir)
            if self.resume_dir is not None:
                remove_debris(self.run_dir / rundir.CHECKPOINT_DIR)  # what a kill inside a save or prune left
                self.checkpoint = latest_checkpoint(self.run_dir / rundir.CHECKPOINT_DIR)
                if self.checkpoint is not None:
                    resume_rules.record(self.run_dir, self.cfg, self.config_changes,
                                        read_state(self.checkpoint)["step"])
                return
            if rundir.run_dir_entries(self.run_dir):
                if not self.overwrite and not rundir.never_started(self.run_dir):
                    raise TracerlError(f"run directory {self.run_dir} is not empty; pass --resume {self.run_dir}, "
                                       "--overwrite, or another run.name")
                rundir.clear_run_dir(self.run_dir)
            rundir.atomic_write_text(self.run_dir / rundir.RUN_MARKER, "a tracerl run directory (tracerl train)\n")
            rundir.atomic_write_text(self.run_dir / rundir.CONFIG_FILE, dump_config(self.cfg))
        except BaseException as e:
            self.release()
            if isinstance(e, rundir.RunDirError):
                raise TracerlError(str(e)) from None
            raise

    def release(self) -> None:
        """Let another process train in this run directory (also done by the OS when this one exits)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.env = build_env(cfg)
        self.train_tasks = self.env.tasks("train")
        self.val_tasks = self.env.tasks("validation")[: cfg.trainer.eval_size]
        if not self.train_tasks:
            raise DataError(f"train split of environment {self.env.name!r} is empty")
        if uses_sft(cfg):  # RL on the questions the warm start did not see
            self.train_tasks = split_train(self.train_tasks, cfg.sft.rl_share, cfg.env.seed)[1]

    def _setup_model(self) -> None:
        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        device = self.world.device
        self.model, self.tokenizer = load_policy(self.model_path, dtype=dtype)
        if self.checkpoint is not None:  # a resume samples with the tokenizer its checkpoint trained with
            self.tokenizer = self._checkpoint_tokenizer()
        # LoRA: adapters injected into the policy, the base frozen; `self.lora` is peft's wrapper (adapters
        # off for the KL reference, saving, merging). One process only (setup.preflight).
        self.lora = None
        if cfg.lora.enabled:
            from tracerl.models.lora import add_adapters, adapted_model, trainable_parameters

            self.lora = add_adapters(self.model, cfg.lora, self.model_path, cfg.run.seed)
            self.model = adapted_model(self.lora)
            n, total = trainable_parameters(self.model)
            self.log(f"LoRA r={cfg.lora.rank}: {n:,} trainable of {total:,} parameters ({100 * n / total:.2f}%)")
        self.model.to(device)
        # The frozen reference is replicated (unsharded) on every rank: it only runs forwards, so its
        # passes need no collective and ranks may run different numbers of them. With LoRA it is the
        # policy itself with its adapters switched off: the base, which is the initial policy.
        self.ref_model = None
        if cfg.algo.kl_coef > 0 and self.lora is None:
            self.ref_model, _ = load_policy(self.model_path, dtype=dtype)
            self.ref_model.to(device).eval().requires_grad_(False)
        # Under torchrun the trained policy is sharded (a forward is a collective), so each rank samples
        # from its own unsharded copy, reloaded after every update (`_sync_generation`).
        self.gen_model = None
        if self.world.size > 1:
            self.gen_model, _ = load_policy(self.model_path, dtype=dtype)
            self.gen_model.to(device).eval().requires_grad_(False)
            mixed = cfg.trainer.bf16 and device.startswith("cuda") and dtype == torch.float32
            self.model = self.world.wrap(self.model, mixed_bf16=mixed)
        # `policy`: the generation backend (engine.name); `features`: the same weights in this process, for
        # the success predictor's hidden states when the backend returns none (an inference engine)
        sampler = self.gen_model if self.gen_model is not None else self.model
        self.features = HFPolicy(sampler, self.tokenizer, device, cfg.model.max_context)
        self.policy = self.features if cfg.engine.name == "hf" else \
            build_backend(cfg, sampler, self.tokenizer, self.model_path, device)
        self.policy_version = 0
        # The LM head may run at the scored positions only (logits = lm_head(last hidden state) exactly, as
        # in the Llama / Qwen families): most positions are prompt or observation tokens, never scored.
        # Not under FSDP2: a sharded model gathers its root weights (embeddings, norm, head) in its own
        # forward only, so there the whole model runs.
        head_at_positions = (self.world.size == 1 and getattr(self.model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
                             and self.model.get_output_embeddings() is not None)
        # The policy being optimised is the one that samples: softmax(logits / T); the ratio, KL and
        # entropy use the same temperature, so training stays on-policy at any T.
        self.spec = LossSpec.from_config(cfg, head_at_positions)

    def _setup_predictor(self) -> None:
        """The success predictor, for allocators with the `uses_predictor` trait."""
        cfg = self.cfg
        self.predictor = None
        if ALLOCATORS.trait(cfg.rollout.allocator, "uses_predictor"):
            text = TextEncoder(cfg.run.device) if cfg.predictor.text_embedding else None
            self.predictor = SuccessPredictor(cfg.predictor, self.model.config.hidden_size, cfg.env.max_turns,
                                              cfg.run.seed, text)

    def _checkpoint_tokenizer(self):
        """The checkpoint's tokenizer, read by rank 0 and sent to every rank (other nodes may not see the
        run directory)."""
        import tempfile

        from transformers import AutoTokenizer

        src = self.checkpoint / rundir.CHECKPOINT_MODEL_DIR
        files = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file() and f.suffix != ".safetensors"} \
            if self.world.is_main else None
        files = self.world.broadcast(files)
        with tempfile.TemporaryDirectory(prefix="tracerl-tokenizer-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)

    def _restore(self) -> None:
        """The chosen checkpoint, read by rank 0 and sent to every rank (any world size)."""
        ckpt = self.checkpoint
        state, weights, optim = None, None, None
        if self.world.is_main:
            state = read_state(ckpt)
            if self.lora is None:
                model, _ = load_policy(ckpt / rundir.CHECKPOINT_MODEL_DIR, dtype=next(self.model.parameters()).dtype)
                weights = model.state_dict()
            optim = read_optimizer(ckpt)
        state = self.world.broadcast(state)
        if self.lora is not None:  # the adapters (one process only); the frozen base is the run's initial policy
            from tracerl.models.lora import load_adapter

            self._check_lora_base(state)
            load_adapter(self.lora, ckpt / rundir.CHECKPOINT_MODEL_DIR)
            self.optimizer.load_state_dict(optim)
        else:
            self.world.load_state(self.model, self.optimizer, weights, optim)
        self._sync_generation(state["step"])
        set_rng_state(state["rng"])
        self.start_step, self.totals = state["step"], state["totals"]
        self.prompt_stats = dict(state.get("prompt_stats", {}))
        self.costs = CostModel.from_dict(state.get("alloc_costs"))
        saved = self.world.broadcast(load_tensors(ckpt, "predictor") if self.world.is_main else None)
        if self.predictor is not None:
            if saved is None:
                raise CheckpointError(f"checkpoint {ckpt} has no predictor state, but rollout.allocator="
                                      f"{self.cfg.rollout.allocator} uses one")
            self.predictor.load_state(*saved)
        self.log(f"resumed from {ckpt} (step {self.start_step})")

    def _check_lora_base(self, state: dict) -> None:
        """A LoRA checkpoint holds only the adapters: they resume onto the base they were trained on."""
        if Path(state.get("model_path", "")) != Path(self.model_path):
            raise CheckpointError(f"checkpoint {self.checkpoint} holds LoRA adapters trained on {state.get('model_path')}, "
                                  f"but this run's base model is {self.model_path}")

    # ---------------------------------------------------------------- rollout
    def sample_tasks(self, step: int):
        rng = seeding.rng(self.cfg.run.seed, step, "prompts")
        return rng.sample(self.train_tasks, min(self.cfg.rollout.prompts_per_step, len(self.train_tasks)))

    def _drawer(self, step: int, batch):
        """More prompts for this step (pools, refills): a seeded shuffle of the train split without the
        batch, taken in order; a pure function of seed and step, so resume is exact."""
        used = {t.id for t in batch}
        order: list = []
        pos = 0

        def draw(n: int):
            nonlocal order, pos
            if not order:
                order = [t for t in self.train_tasks if t.id not in used]
                seeding.rng(self.cfg.run.seed, step, "drawer").shuffle(order)
            out = order[pos:pos + n]
            pos += len(out)
            return out

        return draw

    def rollout(self, step: int) -> tuple[list[RolloutTree], RolloutCost]:
        """The step's rollout trees (chains are trees whose leaves all hang from the root) and this
        process's generation cost. `self.alloc_info` gets the allocation's own metrics (pool size,
        allocator extras). Under torchrun every rank plans the whole step and holds every tree, but
        generates only its own (`allocate/sharded.py`)."""
        r, seed, rank = self.cfg.rollout, self.cfg.run.seed, self.world.rank
        params = SamplingParams(r.max_turn_tokens, r.temperature, r.top_p, tuple(self.env.stop_strings))
        engine = RolloutEngine(self.policy, self.env, params, seeding.generator(seed, step, "rollout", rank),
                               self.cfg.model.chat_template, r.batch_size, capture_hidden=self.predictor is not None,
                               features=self.features)
        predictor = self.predictor
        if self.world.size > 1:
            engine = ShardedEngine(engine, self.world)
            predictor = ShardedPredictor(predictor, self.world) if predictor is not None else None
        tasks = self.sample_tasks(step)
        ctx = AllocationContext(engine, r, seeding.rng(seed, step, "allocator"), self.cfg.alloc, predictor,
                                self.prompt_stats, self._drawer(step, tasks),
                                costs=None if self.predictor is not None else self.costs)
        trees = ALLOCATORS.get(r.allocator)(ctx, tasks)
        for t in trees:
            t.update_stats()
        if self.world.size > 1:
            self._check_same_plan(trees, step)
        self.alloc_info = {"pool_size": float(len(tasks) + ctx.drawn), **ctx.metrics}
        return trees, engine.cost

    def _check_same_plan(self, trees: list[RolloutTree], step: int) -> None:
        """Under torchrun: every rank must have taken the same allocation decisions."""
        digest = hashlib.sha256(repr(fingerprint(trees)).encode()).hexdigest()
        digests = self.world.gather(digest)
        if len(set(digests)) > 1:
            raise TracerlError(f"step {step + 1}: the ranks' allocation plans differ ({len(set(digests))} versions); "
                               "the allocator must decide from the shared trees and random stream only")

    def _mine(self, tree: RolloutTree) -> bool:
        """Whether this rank trains `tree` (always, in one process)."""
        return owner(tree.group, self.world.size) == self.world.rank

    # ---------------------------------------------------------------- update
    def lr_at(self, step: int) -> float:
        t = self.cfg.trainer
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr

    def layout(self) -> str:
        return "trees" if self.cfg.algo.dedup_prefix else "rows"

    def update(self, batch: TokenBatch | None, step: int, credit: CreditStep | None = None) -> dict[str, float]:
        """ppo_epochs × mini_batches optimizer steps over the batch. With `credit`, the first forward over
        each leaf (π_old's) also yields its token weights, which multiply its advantages. Under torchrun
        each rank passes its own batch (None: it kept no leaf this step, and only joins the collectives)."""
        t = self.cfg.trainer
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        hook = credit.hook(batch, self.model) if credit is not None else None
        dist = self.distiller.prepare(batch, step) if self.distiller is not None and batch is not None else None
        if dist is not None and self.gen_model is not None:
            dist.teacher_model = self.gen_model  # the teacher pass needs no collective: the unsharded copy
        # one epoch, one mini-batch: π_old is the policy of the update's own forward (no extra pass)
        old = None if t.ppo_epochs == 1 and t.mini_batches == 1 else self._score(self.model, batch, hook)
        ref = self._reference(batch)
        stats: dict[str, list[float]] = {}
        self.policy.sleep()  # GPU colocation: the engine frees its memory for the update
        self.model.train()
        for _ in range(t.ppo_epochs):
            for packs in self._mini_batches(batch):
                self._optimizer_step(batch, packs, old, ref, dist, hook if old is None else None, stats)
        self.model.eval()
        t0 = time.perf_counter()
        self.policy.wake()
        self._sync_generation(self.policy_version + 1)
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        if self.gen_model is not None or self.policy is not self.features:
            out["sync_s"] = time.perf_counter() - t0  # reloading the generation copy / engine (part of update_s)
        out["train_tokens"] = sum(stats.get("train_tokens", [])) / t.ppo_epochs  # tokens per pass over the batch
        out["train_tokens_per_leaf"] = float(batch.leaf_tokens_run) if batch is not None else 0.0  # one row per leaf
        return {**out, **(dist.summary() if dist is not None else {})}

    def _reference(self, batch: TokenBatch | None) -> dict[int, torch.Tensor] | None:
        """Log-probs under the frozen reference (algo.kl_coef > 0): its own copy, or with LoRA the policy with
        its adapters off (the base weights never change, so that is the initial policy, as without LoRA)."""
        if self.cfg.algo.kl_coef == 0:
            return None
        if self.lora is not None:
            with self.lora.disable_adapter():
                return self._score(self.model, batch)
        return self._score(self.ref_model, batch)

    def _mini_batches(self, batch: TokenBatch | None) -> list[list[int]]:
        """The packs of each optimizer step of one epoch; under torchrun every rank takes the same number
        of steps (empty ones where its batch has fewer packs)."""
        n = self.cfg.trainer.mini_batches
        chunks = batch.mini_batches(n) if batch is not None else []
        if self.world.size > 1:
            chunks += [[] for _ in range(n - len(chunks))]
        return chunks

    def _optimizer_step(self, batch: TokenBatch | None, packs: list[int], old, ref, dist, hook, stats) -> None:
        """One mini-batch: micro-batches share its denominators, so their gradients add up to its own;
        under torchrun the denominators are the global ones and the gradients add up across ranks."""
        if packs:
            leaves = batch.leaves_of(packs)
            pg_mask = dist.pg_mask(leaves) if dist is not None else batch.mask[leaves]
            den = Denominators.of(self.spec, batch.mask[leaves], pg_mask, batch.max_response)
            groups = batch.micro_batches(packs, self.cfg.trainer.micro_batch_size)
        else:
            leaves, den, groups = [], Denominators(0.0, 0.0, 0), []
        den = self._global(den)
        if self.distiller is not None and self.world.size > 1:  # the KL channels' global token counts
            counts = self.world.sum(dist.counts(leaves) if dist is not None and packs else torch.zeros(2))
            if dist is not None:
                dist.global_counts = counts.float()
        passes = self._passes(len(groups))
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for group in groups:
            mb = batch.micro(group, self.policy.pad_id)
            loss, mb_stats = objective(self.model, mb, self.spec, den, old_logp=join_packs(old, group) if old is not None else None,
                                       ref_logp=join_packs(ref, group) if ref is not None else None, distill=dist,
                                       den_leaves=leaves, hook=hook)
            self.world.backward(loss)
            total += loss.item()
            for k, v in {**mb_stats, "train_tokens": [float(mb.tokens)]}.items():
                stats.setdefault(k, []).extend(v)
        self._idle_passes(passes - len(groups), grad=True)
        stats.setdefault("loss", []).append(total)
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn  # FSDP2: a DTensor of the global norm
        stats.setdefault("grad_norm", []).append(gn.item())
        self.optimizer.step()

    def _global(self, den: Denominators) -> Denominators:
        """The mini-batch's denominators over every rank (sums of counts; the longest response)."""
        if self.world.size == 1:
            return den
        max_len = self.spec.norm_length or int(self.world.max(den.max_len).item())
        return Denominators(self.world.sum(den.policy).float().clamp(min=1), self.world.sum(den.tokens).float().clamp(min=1),
                            max(1, max_len))

    def _passes(self, mine: int) -> int:
        """Forwards of the sharded policy every rank runs for this micro-batch loop: the busiest rank's
        count (each forward and backward is a collective under FSDP2), agreed before any of them runs."""
        return mine if self.world.size == 1 else int(self.world.max(mine).item())

    def _idle_passes(self, n: int, grad: bool) -> None:
        """`n` empty passes (one pad token, zero loss) of a rank with fewer micro-batches than the busiest."""
        for _ in range(n):
            ids = torch.full((1, 1), self.policy.pad_id, dtype=torch.long, device=self.world.device)
            with torch.set_grad_enabled(grad):
                out = self.model(input_ids=ids).logits.sum() * 0.0
            if grad:
                out.backward()

    def _sync_generation(self, version: int) -> None:
        """The generation side samples from policy `version` from now on. One process with the hf backend:
        it shares the trained module, only the version moves. Under torchrun the unsharded generation copy
        is reloaded from the sharded policy (a collective); an inference engine gets the weights pushed."""
        state = None
        if self.gen_model is not None:
            state = self.world.full_state(self.model)
            self.gen_model.load_state_dict(state)
        if self.policy is not self.features:
            self.policy.load_weights(state if state is not None else self.model.state_dict(), version)
        self.features.load_weights(None, version)
        self.policy_version = version

    def _score(self, model, batch: TokenBatch | None, hook=None) -> dict[int, torch.Tensor]:
        """Log-probs of every pack's scored tokens under `model` (no gradient); `hook` reads each forward.
        The policy's forwards are collectives under torchrun (it is sharded): every rank runs as many."""
        out: dict[int, torch.Tensor] = {}
        groups = [] if batch is None else batch.micro_batches(list(range(len(batch.packs))), self.cfg.trainer.micro_batch_size)
        passes = self._passes(len(groups)) if model is self.model else len(groups)
        for group in groups:
            logp = score_only(model, batch.micro(group, self.policy.pad_id), self.spec, hook)
            out.update(split_by_pack(batch, group, logp))
        self._idle_passes(passes - len(groups), grad=False)
        return out

    # ---------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        trees, cost = self.rollout(step)
        engine_metrics = self.policy.step_metrics()  # an inference engine's prefix-cache hit rate, ...
        if self.features is not self.policy:  # the predictor's features from the trainer's model (features_s)
            engine_metrics.update(self.features.step_metrics())
        t1 = time.time()
        predictor_metrics = self.predictor.observe(trees, step) if self.predictor is not None else {}
        t_pred = time.time() - t1
        self._update_prompt_stats(trees)
        t1 = time.time()
        a = self.cfg.algo
        adv = tree_advantages(trees, a.advantage, eps=a.adv_eps, singleton=a.singleton, w_intra=a.tree_w_intra,
                              w_inter=a.tree_w_inter)
        for tree, leaf_adv in zip(trees, adv):
            for leaf, v in leaf_adv.items():
                tree.nodes[leaf].advantage = v
        own = [k for k, t in enumerate(trees) if self._mine(t)]  # under torchrun: the trees this rank trains
        own_trees, own_adv = [trees[k] for k in own], [adv[k] for k in own]
        metrics = self._rollout_metrics(own_trees, own_adv) if own_trees else {"leaves": 0.0}
        metrics.update(engine_metrics)
        kept = self._kept(own_trees, own_adv)
        every = self.cfg.trainer.tree_log_every
        log_now = bool(every) and (step + 1) % every == 0
        credit_s = 0.0
        if self.world.sum(len(kept)).item() > 0:  # under torchrun: some rank kept leaves, so all update
            batch = build_batch(kept, self.layout()) if kept else None
            credit = self.credit.start(batch.leaves, batch.adv, step, want_samples=log_now) if kept else None
            metrics.update(self.update(batch, step, credit))
            if credit is not None:
                result = credit.result()
                metrics.update(result.metrics)
                credit_s = result.metrics["credit_s"]  # spent inside the update: not counted in update_s
                if result.samples and self.world.is_main:
                    write_samples(result.samples, rundir.credit_file(self.run_dir, step + 1))
        if log_now and self.world.is_main:
            write_jsonl(trees, rundir.trees_file(self.run_dir, step + 1), {"step": step + 1})
        metrics.update(trained_trajectories=sum(len(la) for _, la in kept), lr=self.lr_at(step),
                       **self._cost_metrics(cost), prompts_used=len({t.group for t in own_trees}), **self.alloc_info,
                       **predictor_metrics, rollout_s=t1 - t0 - t_pred, update_s=time.time() - t1 - credit_s)
        # the policy's tokens as its own annotator (distill.annotator=self) are generation it paid for
        metrics["rollout_gen_tokens"] = metrics["gen_tokens"]
        metrics["gen_tokens"] += int(metrics.get("annotator_policy_tokens", 0))
        if self.predictor is not None:
            metrics["predictor_s"] = t_pred
        if self.world.device.startswith("cuda"):  # peak allocated on this rank so far (the largest rank's, reduced)
            metrics["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics = reduce_metrics(self.world.gather(metrics)) if self.world.size > 1 else metrics
        for key, name in zip(TOTALS, ("gen_tokens", "trajectories", "tool_calls")):
            self.totals[key] += int(metrics[name])
        metrics.update(self.totals)
        return metrics

    def _rollout_metrics(self, trees: list[RolloutTree], adv: list[dict[int, float]]) -> dict[str, float]:
        leaves = tree_leaves(trees)
        rewards = torch.tensor([lf.reward for lf in leaves], dtype=torch.float32)
        groups = torch.tensor([lf.tree.group for lf in leaves], dtype=torch.long)
        flat = torch.tensor([adv[k][leaf] for k, t in enumerate(trees) for leaf in t.leaf_ids()], dtype=torch.float32)
        n_gen = torch.tensor([sum(lf.loss_mask) for lf in leaves], dtype=torch.float32)
        return {**summarize(leaves), "effective_ratio": effective_ratio(rewards, groups),
                "zero_adv_frac": zero_advantage_fraction(flat[:, None], torch.ones(len(leaves), 1), weights=n_gen),
                "mixed_anchors": mixed_anchors(trees), "leaves": len(leaves)}

    def _kept(self, trees: list[RolloutTree], adv: list[dict[int, float]]) -> list[tuple[RolloutTree, dict[int, float]]]:
        """Trees with the advantages of the leaves that train; with skip_uniform_groups, prompts whose
        leaves all share one reward (advantage 0) are left out."""
        kept = [(t, la) for t, la in zip(trees, adv) if la]
        if not self.cfg.algo.skip_uniform_groups:
            return kept
        outcomes: dict[int, set[float]] = {}
        for t, la in kept:
            outcomes.setdefault(t.group, set()).update(float(t.nodes[leaf].reward or 0.0) for leaf in la)
        return [(t, la) for t, la in kept if len(outcomes[t.group]) > 1]

    @staticmethod
    def _cost_metrics(cost: RolloutCost) -> dict[str, float]:
        return dict(gen_tokens=cost.gen_tokens, prefill_tokens=cost.prefill_tokens, prefill_saved=cost.prefill_saved,
                    tool_calls=cost.tool_calls, trajectories=cost.trajectories, continuations=cost.continuations,
                    continuation_fraction=cost.continuation_fraction,
                    root_rollouts=cost.trajectories - cost.continuations)

    def _update_prompt_stats(self, trees: list[RolloutTree]) -> None:
        """Latest empirical success rate of every prompt of the step (Knapsack-style allocation)."""
        counts: dict[str, list[int]] = {}
        for t in trees:
            c = counts.setdefault(t.task.id, [0, 0])
            c[0] += t.root.successes
            c[1] += t.root.leaves
        for task_id, (succ, leaves) in counts.items():
            if leaves:
                self.prompt_stats[task_id] = succ / leaves

    # ---------------------------------------------------------------- loop
    def evaluate(self, step: int, split: str = "validation") -> dict[str, float]:
        """Greedy evaluation; under torchrun each rank runs its share of the tasks."""
        tasks = self.val_tasks if split == "validation" else self.env.tasks(split)[: self.cfg.trainer.eval_size]
        mine = self.world.share(tasks)
        if self.world.size == 1:
            res, _ = evaluate(self.policy, self.env, mine, self.cfg.rollout.max_turn_tokens,
                              self.cfg.model.chat_template, self.cfg.rollout.batch_size)
        else:
            part = evaluate(self.policy, self.env, mine, self.cfg.rollout.max_turn_tokens, self.cfg.model.chat_template,
                            self.cfg.rollout.batch_size) if mine else ({"gen_tokens": 0}, [])
            parts = self.world.gather((part[0]["gen_tokens"], part[1]))
            trajs = [tr for _, ts in parts for tr in ts]
            res = {**summarize(trajs), "n": len(trajs), "gen_tokens": sum(g for g, _ in parts)}
        self.logger.log_eval(step, split, res)
        return res

    def save(self, step: int) -> None:
        """An atomic checkpoint; under torchrun the full weights (the synced generation copy) and the
        gathered optimizer state are written by rank 0, in the single-process layout."""
        optim = self.world.optimizer_state(self.model, self.optimizer)  # a collective under torchrun
        self._on_main("writing the checkpoint", self._write_checkpoint, step, optim)

    def _write_checkpoint(self, step: int, optim) -> None:
        predictor, config = self.predictor, dump_config(self.cfg)

        def extra(directory: Path) -> None:  # the config it was trained under: what a resume compares with
            (directory / rundir.CONFIG_FILE).write_text(config, encoding="utf-8")
            if predictor is not None:
                save_tensors(directory, "predictor", *predictor.state())

        model = self.gen_model if self.gen_model is not None else self.model
        if self.lora is not None:  # the adapters only, in peft's layout (adapter_config.json names the base)
            from tracerl.models.lora import AdapterSaver

            model = AdapterSaver(self.lora)
        save_checkpoint(self.run_dir / rundir.CHECKPOINT_DIR, step, model, self.tokenizer, optim,
                        {"totals": self.totals, "seed": self.cfg.run.seed, "model_path": str(self.model_path),
                         "prompt_stats": self.prompt_stats, "world_size": self.world.size,
                         "alloc_costs": self.costs.as_dict()},
                        keep=self.cfg.trainer.keep_checkpoints, extra=extra)

    def train(self) -> dict[str, float]:
        """The loop; under torchrun a failure to reach the other ranks (inside FSDP2's collectives too)
        stops this rank with one line saying so."""
        try:
            return self._train()
        except (RuntimeError, ConnectionError) as e:
            lost = self.world.lost(e, "training")
            if lost is None:
                raise
            raise lost from None

    def _train(self) -> dict[str, float]:
        t = self.cfg.trainer
        last_eval: dict[str, float] = {}
        if self.start_step == 0 and t.eval_at_start:
            last_eval = self.evaluate(0)
            self.log(f"step 0 validation EM {last_eval['em']:.3f} F1 {last_eval['f1']:.3f}")
        try:
            for step in range(self.start_step, t.steps):
                metrics = self.train_step(step)
                if not all(math.isfinite(v) for v in (metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0))):
                    raise TracerlError(f"non-finite loss at step {step + 1}; last good checkpoint is kept")
                self.logger.log_step(step + 1, metrics)  # every logger of trainer.loggers (the console's bar too)
                done = step + 1 == t.steps
                if (t.eval_every and (step + 1) % t.eval_every == 0) or done:
                    last_eval = self.evaluate(step + 1)
                if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or done:
                    self.save(step + 1)
            if self.start_step >= t.steps and not last_eval:  # resumed from the final checkpoint
                last_eval = self._logged_eval(t.steps) or self.evaluate(t.steps)
        finally:
            self.logger.close()  # the trackers' runs end (and the progress bar stops) however the loop ends
        self._on_main("writing the report", self._finish, last_eval)
        self.release()
        return last_eval

    def _logged_eval(self, step: int) -> dict[str, float] | None:
        """The validation row of `step` already in eval.jsonl (written before that step's checkpoint), so a
        resume of a finished run neither repeats nor duplicates it; rank 0 reads it for every rank."""
        row = None
        if self.world.is_main:
            path = self.run_dir / rundir.EVAL_FILE
            rows = [r for r in read_jsonl(path) if r.get("step") == step and r.get("split") == "validation"] \
                if path.is_file() else []
            row = {k: v for k, v in rows[-1].items() if k not in ("step", "split")} if rows else None
        return self.world.broadcast(row)

    def _finish(self, result: dict[str, float]) -> None:
        from tracerl.report import write_report

        write_report(self.run_dir)
        rundir.atomic_write_text(self.run_dir / rundir.FINAL_EVAL_FILE, json.dumps(result, indent=1))


def train(config_path: str | None, overrides: list[str], resume: str | None = None, overwrite: bool = False,
          log=print, auto_resume: bool = False, allow_change: bool = False) -> tuple[Path, dict[str, float]]:
    """`auto_resume`: resume the config's run directory if it holds a complete checkpoint, else start it
    (replacing a previous attempt that stopped before its first checkpoint) — what a restarted torchrun
    worker group runs. A resume checks its overrides against the checkpoint's config (`tracerl.resume_rules`);
    `allow_change` lets result-changing keys change."""
    if auto_resume and not resume:
        run_dir = load_config(config_path, overrides).run_dir()
        if latest_checkpoint(run_dir / rundir.CHECKPOINT_DIR) is not None:
            resume = str(run_dir)
        elif (run_dir / rundir.CONFIG_FILE).is_file():
            overwrite = True
    changed: dict = {}
    if resume:
        cfg, changed = resume_config(Path(resume), overrides, allow_change, log)
    else:
        cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg, Path(resume) if resume else None, overwrite, log)
    trainer.config_changes = changed
    trainer.setup()
    result = trainer.train()
    trainer.world.close()  # after an error the process exits (torchrun then stops the other ranks)
    return trainer.run_dir, result


def resume_config(run: Path, overrides: list[str], allow_change: bool, log=print) -> tuple[Config, dict]:
    """The config a resume of `run` follows (the run's config.yaml + `overrides`) and what it changes against
    the config its latest checkpoint was written under; refused (one line) where `tracerl.resume_rules` says so.
    A damaged config.yaml falls back to the checkpoint's copy, with a warning; keys the run's config predates
    read as `resume_rules.LEGACY_DEFAULTS` or their defaults, with a warning."""
    cfg_file = run / rundir.CONFIG_FILE
    if not cfg_file.is_file() and not run.is_dir():
        raise CheckpointError(f"{run} is not a run directory (it does not exist)")
    ckpt = latest_checkpoint(run / rundir.CHECKPOINT_DIR)
    saved = ckpt / rundir.CONFIG_FILE if ckpt is not None and (ckpt / rundir.CONFIG_FILE).is_file() else None
    base = resume_rules.read_with_copy(cfg_file, saved, log)
    cfg = base.config(overrides)
    # checkpoints written before they held their config: the run's config.yaml
    ref = resume_rules.read_run_config(saved) if saved is not None else base
    diff = resume_rules.changes(ref.config(), cfg)
    resume_rules.check_changes(diff, cfg, allow_change, f"the config of {ckpt or run}")
    return cfg, diff
