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
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from tracerl import rundir, seeding
from tracerl.algos.advantages import tree_advantages
from tracerl.algos.metrics import effective_ratio, zero_advantage_fraction
from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.allocate.predictor import SuccessPredictor, TextEncoder
from tracerl.backends.hf import HFPolicy, SamplingParams
from tracerl.checkpoint import (latest_checkpoint, load_optimizer, load_tensors, read_state, save_checkpoint,
                                save_tensors, set_rng_state)
from tracerl.config import Config, dump_config, load_config
from tracerl.credit import CreditStep, TokenCredit, write_samples
from tracerl.credit.attention import SUPPORTED_MODEL_TYPES
from tracerl.distill import Distiller
from tracerl.errors import CheckpointError, DataError, TracerlError
from tracerl.evaluate import evaluate, summarize
from tracerl.methods import check_methods
from tracerl.models.io import load_policy
from tracerl.objective import Denominators, LossSpec, objective, score_only
from tracerl.packing import TokenBatch, build_batch, join_packs, split_by_pack
from tracerl.rollout import RolloutCost, RolloutEngine
from tracerl.runlog import Progress, RunLogger
from tracerl.setup import apply_threads, build_env, resolve_model_path, uses_sft
from tracerl.sft import split_train
from tracerl.tree import RolloutTree, mixed_anchors, tree_leaves, write_jsonl

TOTALS = ("cum_gen_tokens", "cum_trajectories", "cum_tool_calls")


class Trainer:
    def __init__(self, cfg: Config, resume: Path | None = None, overwrite: bool = False, log=print):
        self.cfg, self.log = cfg, log
        self.resume_dir = resume
        self.overwrite = overwrite

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        check_methods(cfg)
        apply_threads(cfg)
        self._setup_run_dir()
        self._setup_data()
        self._setup_model()
        self.credit = TokenCredit(cfg.credit, self.model, self.tokenizer, cfg.run.seed)  # identity unless credit.name is set
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.trainer.lr, betas=cfg.trainer.betas,
                                           weight_decay=cfg.trainer.weight_decay)
        self._setup_predictor()
        self.distiller = Distiller(cfg, self.env, self.policy, self.spec.temperature) if cfg.distill.mode != "off" else None
        self.prompt_stats: dict[str, float] = {}  # task id -> success rate of its leaves at its latest visit
        self.start_step, self.totals = 0, {k: 0 for k in TOTALS}
        if self.resume_dir is not None:
            self._restore()
        self.logger = RunLogger(self.run_dir, tensorboard=cfg.trainer.tensorboard,
                                resume_step=self.start_step if self.resume_dir is not None else None)

    def _setup_run_dir(self) -> None:
        if self.resume_dir is not None:
            self.run_dir = Path(self.resume_dir)
            return
        self.run_dir = self.cfg.run_dir()
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            if not self.overwrite:
                raise TracerlError(f"run directory {self.run_dir} is not empty; pass --resume {self.run_dir}, "
                                   "--overwrite, or another run.name")
            shutil.rmtree(self.run_dir)
        rundir.atomic_write_text(self.run_dir / rundir.CONFIG_FILE, dump_config(self.cfg))

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
        self.model_path = resolve_model_path(cfg, self.log)
        dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
        self.model, self.tokenizer = load_policy(self.model_path, dtype=dtype)
        self.model.to(cfg.run.device)
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            self.ref_model, _ = load_policy(self.model_path, dtype=dtype)
            self.ref_model.to(cfg.run.device).eval().requires_grad_(False)
        self.policy = HFPolicy(self.model, self.tokenizer, cfg.run.device, cfg.model.max_context)
        # The LM head may run at the scored positions only (logits = lm_head(last hidden state) exactly, as
        # in the Llama / Qwen families): most positions are prompt or observation tokens, never scored.
        head_at_positions = (getattr(self.model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
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

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.run_dir / rundir.CHECKPOINT_DIR)
        if ckpt is None:
            raise CheckpointError(f"no complete checkpoint under {self.run_dir / rundir.CHECKPOINT_DIR}; cannot resume")
        state = read_state(ckpt)
        model, _ = load_policy(ckpt / rundir.CHECKPOINT_MODEL_DIR, dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(model.state_dict())
        load_optimizer(ckpt, self.optimizer)
        set_rng_state(state["rng"])
        self.start_step, self.totals = state["step"], state["totals"]
        self.prompt_stats = dict(state.get("prompt_stats", {}))
        saved = load_tensors(ckpt, "predictor")
        if self.predictor is not None:
            if saved is None:
                raise CheckpointError(f"checkpoint {ckpt} has no predictor state, but rollout.allocator="
                                      f"{self.cfg.rollout.allocator} uses one")
            self.predictor.load_state(*saved)
        self.log(f"resumed from {ckpt} (step {self.start_step})")

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
        """The step's rollout trees (chains are trees whose leaves all hang from the root).
        `self.alloc_info` gets the allocation's own metrics (pool size, allocator extras)."""
        r, seed = self.cfg.rollout, self.cfg.run.seed
        params = SamplingParams(r.max_turn_tokens, r.temperature, r.top_p, tuple(self.env.stop_strings))
        engine = RolloutEngine(self.policy, self.env, params, seeding.generator(seed, step, "rollout"),
                               self.cfg.model.chat_template, r.batch_size, capture_hidden=self.predictor is not None)
        tasks = self.sample_tasks(step)
        ctx = AllocationContext(engine, r, seeding.rng(seed, step, "allocator"), self.cfg.alloc, self.predictor,
                                self.prompt_stats, self._drawer(step, tasks))
        trees = ALLOCATORS.get(r.allocator)(ctx, tasks)
        for t in trees:
            t.update_stats()
        self.alloc_info = {"pool_size": float(len(tasks) + ctx.drawn), **ctx.metrics}
        return trees, engine.cost

    # ---------------------------------------------------------------- update
    def lr_at(self, step: int) -> float:
        t = self.cfg.trainer
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr

    def layout(self) -> str:
        return "trees" if self.cfg.algo.dedup_prefix else "rows"

    def update(self, batch: TokenBatch, step: int, credit: CreditStep | None = None) -> dict[str, float]:
        """ppo_epochs × mini_batches optimizer steps over the batch. With `credit`, the first forward over
        each leaf (π_old's) also yields its token weights, which multiply its advantages."""
        t = self.cfg.trainer
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        hook = credit.hook(batch, self.model) if credit is not None else None
        dist = self.distiller.prepare(batch, step) if self.distiller is not None else None
        # one epoch, one mini-batch: π_old is the policy of the update's own forward (no extra pass)
        old = None if t.ppo_epochs == 1 and t.mini_batches == 1 else self._score(self.model, batch, hook)
        ref = self._score(self.ref_model, batch) if self.ref_model is not None else None
        stats: dict[str, list[float]] = {}
        self.model.train()
        for _ in range(t.ppo_epochs):
            for packs in batch.mini_batches(t.mini_batches):
                self._optimizer_step(batch, packs, old, ref, dist, hook if old is None else None, stats)
        self.model.eval()
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["train_tokens"] = sum(stats["train_tokens"]) / t.ppo_epochs  # tokens per pass over the batch
        out["train_tokens_per_leaf"] = float(batch.leaf_tokens_run)  # what one row per leaf would run
        return {**out, **(dist.summary() if dist is not None else {})}

    def _optimizer_step(self, batch: TokenBatch, packs: list[int], old, ref, dist, hook, stats) -> None:
        """One mini-batch: micro-batches share its denominators, so their gradients add up to its own."""
        leaves = batch.leaves_of(packs)
        pg_mask = dist.pg_mask(leaves) if dist is not None else batch.mask[leaves]
        den = Denominators.of(self.spec, batch.mask[leaves], pg_mask, batch.max_response)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for group in batch.micro_batches(packs, self.cfg.trainer.micro_batch_size):
            mb = batch.micro(group, self.policy.pad_id)
            loss, mb_stats = objective(self.model, mb, self.spec, den, old_logp=join_packs(old, group) if old is not None else None,
                                       ref_logp=join_packs(ref, group) if ref is not None else None, distill=dist,
                                       den_leaves=leaves, hook=hook)
            loss.backward()
            total += loss.item()
            for k, v in {**mb_stats, "train_tokens": [float(mb.tokens)]}.items():
                stats.setdefault(k, []).extend(v)
        stats.setdefault("loss", []).append(total)
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        stats.setdefault("grad_norm", []).append(gn.item())
        self.optimizer.step()

    def _score(self, model, batch: TokenBatch, hook=None) -> dict[int, torch.Tensor]:
        """Log-probs of every pack's scored tokens under `model` (no gradient); `hook` reads each forward."""
        out: dict[int, torch.Tensor] = {}
        all_packs = list(range(len(batch.packs)))
        for group in batch.micro_batches(all_packs, self.cfg.trainer.micro_batch_size):
            logp = score_only(model, batch.micro(group, self.policy.pad_id), self.spec, hook)
            out.update(split_by_pack(batch, group, logp))
        return out

    # ---------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.time()
        trees, cost = self.rollout(step)
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
        metrics = self._rollout_metrics(trees, adv)
        kept = self._kept(trees, adv)
        every = self.cfg.trainer.tree_log_every
        log_now = bool(every) and (step + 1) % every == 0
        credit_s = 0.0
        if kept:
            batch = build_batch(kept, self.layout())
            credit = self.credit.start(batch.leaves, batch.adv, step, want_samples=log_now)  # None: no weights
            metrics.update(self.update(batch, step, credit))
            if credit is not None:
                result = credit.result()
                metrics.update(result.metrics)
                credit_s = result.metrics["credit_s"]  # spent inside the update: not counted in update_s
                if result.samples:
                    write_samples(result.samples, rundir.credit_file(self.run_dir, step + 1))
        if log_now:
            write_jsonl(trees, rundir.trees_file(self.run_dir, step + 1), {"step": step + 1})
        metrics.update(trained_trajectories=sum(len(la) for _, la in kept), lr=self.lr_at(step),
                       **self._cost_metrics(cost), prompts_used=len({t.group for t in trees}), **self.alloc_info,
                       **predictor_metrics, rollout_s=t1 - t0 - t_pred, update_s=time.time() - t1 - credit_s)
        if self.predictor is not None:
            metrics["predictor_s"] = t_pred
        for key, value in zip(TOTALS, (cost.gen_tokens, cost.trajectories, cost.tool_calls)):
            self.totals[key] += value
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
        tasks = self.val_tasks if split == "validation" else self.env.tasks(split)[: self.cfg.trainer.eval_size]
        res, _ = evaluate(self.policy, self.env, tasks, self.cfg.rollout.max_turn_tokens,
                          self.cfg.model.chat_template, self.cfg.rollout.batch_size)
        self.logger.log_eval(step, split, res)
        return res

    def save(self, step: int) -> Path:
        extra = None
        if self.predictor is not None:
            predictor = self.predictor

            def extra(directory: Path) -> None:
                save_tensors(directory, "predictor", *predictor.state())

        return save_checkpoint(self.run_dir / rundir.CHECKPOINT_DIR, step, self.model, self.tokenizer, self.optimizer,
                               {"totals": self.totals, "seed": self.cfg.run.seed, "model_path": str(self.model_path),
                                "prompt_stats": self.prompt_stats},
                               keep=self.cfg.trainer.keep_checkpoints, extra=extra)

    def train(self) -> dict[str, float]:
        t = self.cfg.trainer
        last_eval: dict[str, float] = {}
        if self.start_step == 0 and t.eval_at_start:
            last_eval = self.evaluate(0)
            self.log(f"step 0 validation EM {last_eval['em']:.3f} F1 {last_eval['f1']:.3f}")
        with Progress(total=t.steps, start=self.start_step, disable=not t.progress) as bar:
            for step in range(self.start_step, t.steps):
                metrics = self.train_step(step)
                if not all(math.isfinite(v) for v in (metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0))):
                    raise TracerlError(f"non-finite loss at step {step + 1}; last good checkpoint is kept")
                self.logger.log_step(step + 1, metrics)
                bar.update(step + 1, metrics)
                done = step + 1 == t.steps
                if (t.eval_every and (step + 1) % t.eval_every == 0) or done:
                    last_eval = self.evaluate(step + 1)
                    bar.update(step + 1, {**metrics, "val_em": last_eval["em"]})
                if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or done:
                    self.save(step + 1)
        if self.start_step >= t.steps and not last_eval:
            last_eval = self.evaluate(t.steps)
        self.logger.close()
        from tracerl.report import write_report

        write_report(self.run_dir)
        return last_eval


def train(config_path: str | None, overrides: list[str], resume: str | None = None, overwrite: bool = False,
          log=print) -> tuple[Path, dict[str, float]]:
    if resume:
        cfg_file = Path(resume) / rundir.CONFIG_FILE
        if not cfg_file.is_file():
            raise CheckpointError(f"{resume} is not a run directory (no {rundir.CONFIG_FILE})")
        cfg = load_config(cfg_file, overrides)
    else:
        cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg, Path(resume) if resume else None, overwrite, log)
    trainer.setup()
    result = trainer.train()
    rundir.atomic_write_text(trainer.run_dir / rundir.FINAL_EVAL_FILE, json.dumps(result, indent=1))
    return trainer.run_dir, result
