"""The reference training loop: GRPO over chain rollouts (any registered estimator and loss).

Life cycle (torchtune-style): setup -> train -> save. One step reads top to bottom:

    tasks  = next prompts (a pure function of seed and step, so resume is exact)
    trees  = ALLOCATORS[rollout.allocator](ctx, tasks)   (G chains, Tree-GRPO / TRACE trees, ...)
    predictor.observe(trees)                           (allocators marked uses_predictor only)
    trajs  = one trajectory per leaf                   (the exact sampled token ids)
    adv    = ADVANTAGES[algo.advantage](rewards, prompts, trees, ancestors)
    loss   = AGGREGATIONS[agg](POLICY_LOSSES[loss](logp, old_logp, adv, mask)) + kl + entropy
             (distill.mode != off: the PG term covers the non-routed tokens, Distiller adds the teacher KL)
    AdamW step with gradient clipping; metrics, evaluation and atomic checkpoints on schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.allocate.predictor import SuccessPredictor, TextEncoder
from tracerl.algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from tracerl.algos.losses import entropy_from_logits, token_logprobs
from tracerl.algos.metrics import effective_ratio, zero_advantage_fraction
from tracerl.backends.hf import HFPolicy, SamplingParams
from tracerl.checkpoint import (latest_checkpoint, load_optimizer, load_tensors, read_state, save_checkpoint,
                                save_tensors, set_rng_state)
from tracerl.config import Config, ConfigError, dump_config, load_config
from tracerl.distill import Distiller
from tracerl.credit import CREDIT, CreditStep, TokenCredit, reweight_packed, write_samples
from tracerl.credit.attention import SUPPORTED_MODEL_TYPES
from tracerl.errors import CheckpointError, DataError, TracerlError
from tracerl.evaluate import evaluate, summarize
from tracerl.models.io import load_policy
from tracerl.packing import PackedTree, batch_packed, pack_tree
from tracerl.rollout import RolloutCost, RolloutEngine, Trajectory, leaf_trajectories
from tracerl.tree import RolloutTree, mixed_anchors, write_jsonl
from tracerl.runlog import Progress, RunLogger
from tracerl.sft import build_env, pretrained_path, run_sft, split_train, uses_sft


def resolve_model_path(cfg: Config, log=print) -> Path:
    """Where the initial policy comes from: the SFT cache, the converted SmolLM2, or a user path."""
    if cfg.model.preset == "tiny" or uses_sft(cfg):
        return run_sft(cfg, log=log)
    return pretrained_path(cfg)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def pad_batch(trajs: list[Trajectory], pad_id: int, values: dict[str, list[torch.Tensor]] | None = None):
    """Right-pad trajectories: ids (B, L), attention (B, L), loss mask / sampled log-probs (B, L).

    With right padding a causal model needs no attention mask for the real tokens (they never attend to
    later positions), so training forwards pass none and get the fused causal attention kernel."""
    L = max(len(t.token_ids) for t in trajs)
    ids = torch.full((len(trajs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(trajs), L), dtype=torch.long)
    mask = torch.zeros((len(trajs), L), dtype=torch.float32)
    logp = torch.zeros((len(trajs), L), dtype=torch.float32)
    for i, t in enumerate(trajs):
        n = len(t.token_ids)
        ids[i, :n] = torch.tensor(t.token_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        logp[i, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
    return ids, attn, mask, logp


def apply_threads(cfg: Config) -> None:
    """run.threads (torch intra-op threads) for every command that runs the model: train, sft, eval."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


class Trainer:
    def __init__(self, cfg: Config, resume: Path | None = None, overwrite: bool = False, log=print):
        self.cfg, self.log = cfg, log
        self.resume_dir = resume
        self.overwrite = overwrite

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        apply_threads(cfg)
        for name, reg in (("rollout.allocator", ALLOCATORS), ("algo.advantage", ADVANTAGES), ("algo.policy_loss", POLICY_LOSSES),
                          ("algo.aggregation", AGGREGATIONS), ("algo.kl_estimator", KL_ESTIMATORS),
                          ("credit.name", CREDIT)):
            section, field = name.split(".")
            key = getattr(getattr(cfg, section), field)
            if key not in reg:
                raise ConfigError(f"config key '{name}': unknown name {key!r}; valid: {', '.join(reg.names())}")
        self._setup_run_dir()
        self.env = build_env(cfg)
        self.train_tasks = self.env.tasks("train")
        self.val_tasks = self.env.tasks("validation")[: cfg.trainer.eval_size]
        if not self.train_tasks:
            raise DataError(f"train split of environment {self.env.name!r} is empty")
        if uses_sft(cfg):  # RL on the questions the warm start did not see
            self.train_tasks = split_train(self.train_tasks, cfg.sft.rl_share, cfg.env.seed)[1]
        self._setup_model()
        self.credit = TokenCredit(cfg.credit, self.model, self.tokenizer, cfg.run.seed)  # identity unless credit.name is set
        self._setup_optimizer()
        self._setup_predictor()
        self.distiller = Distiller(cfg, self.env, self.policy, self.temperature) if cfg.distill.mode != "off" else None
        self.prompt_stats: dict[str, float] = {}  # task id -> success rate of its leaves at its latest visit
        self.start_step, self.totals = 0, {"cum_gen_tokens": 0, "cum_trajectories": 0, "cum_tool_calls": 0}
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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))

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
        # The LM head may run at the trained positions only (logits = lm_head(last hidden state) exactly, as
        # in the Llama / Qwen families): ~4 of 5 positions are prompt or observation tokens, never scored.
        self.head_at_positions = (getattr(self.model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
                                  and self.model.get_output_embeddings() is not None)
        # The policy being optimised is the one that samples: softmax(logits / T). Log-probs of the
        # ratio, KL and entropy use the same temperature, so training stays on-policy at any T.
        self.temperature = cfg.rollout.temperature or 1.0

    def _setup_optimizer(self) -> None:
        t = self.cfg.trainer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)

    def _setup_predictor(self) -> None:
        """The success predictor, for allocators that declare they use one (`uses_predictor`)."""
        cfg = self.cfg
        self.predictor = None
        if getattr(ALLOCATORS.get(cfg.rollout.allocator), "uses_predictor", False):
            text = TextEncoder(cfg.run.device) if cfg.predictor.text_embedding else None
            self.predictor = SuccessPredictor(cfg.predictor, self.model.config.hidden_size, cfg.env.max_turns,
                                              cfg.run.seed, text)

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            raise CheckpointError(f"no complete checkpoint under {self.run_dir / 'checkpoints'}; cannot resume")
        state = read_state(ckpt)
        model, _ = load_policy(ckpt / "model", dtype=next(self.model.parameters()).dtype)
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

    # ---------------------------------------------------------------- one step
    def sample_tasks(self, step: int):
        rng = random.Random(self.cfg.run.seed * 1_000_003 + step)
        return rng.sample(self.train_tasks, min(self.cfg.rollout.prompts_per_step, len(self.train_tasks)))

    def _drawer(self, step: int, batch) -> Callable[[int], list]:
        """More prompts for this step (pools, refills): a seeded shuffle of the train split without the
        batch, taken in order; a pure function of seed and step, so resume is exact."""
        used = {t.id for t in batch}
        order: list = []
        pos = 0

        def draw(n: int):
            nonlocal order, pos
            if not order:
                rng = random.Random(self.cfg.run.seed * 1_000_003 + step * 7919 + 31)
                order = [t for t in self.train_tasks if t.id not in used]
                rng.shuffle(order)
            out = order[pos:pos + n]
            pos += len(out)
            return out

        return draw

    def rollout(self, step: int) -> tuple[list[RolloutTree], RolloutCost]:
        """The step's rollout trees (chains are trees whose leaves all hang from the root).
        `self.alloc_info` gets the allocation's own metrics (pool size, allocator extras)."""
        r = self.cfg.rollout
        params = SamplingParams(r.max_turn_tokens, r.temperature, r.top_p, tuple(self.env.stop_strings))
        engine = RolloutEngine(self.policy, self.env, params, step_generator(self.cfg.run.seed, step),
                               self.cfg.model.chat_template, r.batch_size, capture_hidden=self.predictor is not None)
        rng = random.Random(self.cfg.run.seed * 1_000_003 + step * 7919 + 17)
        tasks = self.sample_tasks(step)
        ctx = AllocationContext(engine, r, rng, self.cfg.alloc, self.predictor, self.prompt_stats,
                                self._drawer(step, tasks))
        trees = ALLOCATORS.get(r.allocator)(ctx, tasks)
        for t in trees:
            t.update_stats()
        self.alloc_info = {"pool_size": float(len(tasks) + ctx.drawn), **ctx.metrics}
        return trees, engine.cost

    def lr_at(self, step: int) -> float:
        t = self.cfg.trainer
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr

    def update(self, trajs: list[Trajectory], adv: torch.Tensor, step: int,
               credit: CreditStep | None = None) -> dict[str, float]:
        """One PPO-style update over the kept trajectories; returns loss statistics. With `credit`
        (token weights, e.g. FlowTracer), each row's first forward also yields its weights, which
        multiply its per-token advantages."""
        cfg, a = self.cfg, self.cfg.algo
        pg_fn, agg_fn = POLICY_LOSSES.get(a.policy_loss), AGGREGATIONS.get(a.aggregation)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        ids, attn, mask, sample_logp = pad_batch(trajs, self.policy.pad_id)
        ids, attn, mask = ids.to(cfg.run.device), attn.to(cfg.run.device), mask.to(cfg.run.device)
        targets, tmask, sample_logp = ids[:, 1:], mask[:, 1:], sample_logp[:, 1:].to(cfg.run.device)
        token_adv = adv.to(cfg.run.device)[:, None] * tmask
        # routed self-distillation: the PG term covers pg_mask; the distiller adds the KL channels
        dist = self.distiller.prepare(trajs, step) if self.distiller is not None else None
        pg_mask = tmask if dist is None else dist.pg_mask.to(cfg.run.device)
        mbs = cfg.trainer.micro_batch_size
        reuse_old = cfg.trainer.ppo_epochs == 1 and cfg.trainer.mini_batches == 1
        old_logp = None if reuse_old else self._logprobs(self.model, ids, attn, credit)
        ref_logp = self._logprobs(self.ref_model, ids, attn) if self.ref_model is not None else None
        stats: dict[str, list[float]] = {}
        B, L = len(trajs), targets.shape[1]
        order = torch.arange(B)
        self.model.train()
        for _ in range(cfg.trainer.ppo_epochs):
            for mb in order.chunk(cfg.trainer.mini_batches):
                denom = agg_fn.denominator(tmask[mb])
                pg_denom = denom if dist is None else agg_fn.denominator(pg_mask[mb])
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                # longest rows first, so each micro-batch pads to rows of similar length
                by_len = mb[torch.argsort(attn[mb].sum(-1), descending=True, stable=True)]
                for rows in by_len.split(mbs):
                    n = int(attn[rows].sum(-1).max())  # trim this micro-batch's padding
                    stats.setdefault("train_tokens", []).append(float(len(rows) * n))
                    autocast = torch.autocast(device_type=torch.device(cfg.run.device).type, dtype=torch.bfloat16,
                                              enabled=cfg.trainer.bf16)
                    if dist is None and a.entropy_coef == 0 and self.head_at_positions:
                        # only the log-probs of the sampled tokens are needed: no (B, n, V) logits
                        logits = None
                        with autocast, self._tap(credit, rows):
                            logp = self._sampled_logprobs(ids[rows, :n], tmask[rows, : n - 1] > 0,
                                                          targets[rows, : n - 1])
                    else:
                        with autocast, self._tap(credit, rows):
                            logits = self.model(input_ids=ids[rows, :n]).logits[:, :-1]
                        logits = logits.float() / self.temperature
                        logp = token_logprobs(logits, targets[rows, : n - 1])
                    m, pm = tmask[rows, : n - 1], pg_mask[rows, : n - 1]
                    old = logp.detach() if old_logp is None else old_logp[rows, : n - 1]
                    if logits is None and old_logp is not None:
                        # the head-at-positions logp is 0 off the trained positions: keep the ratio at 1
                        # there, or exp(0 - old) of a very unlikely observation token could overflow
                        old = torch.where(m > 0, old, logp.detach())
                    row_adv = token_adv[rows, : n - 1]
                    if credit is not None:
                        row_adv = row_adv * credit.row_weights(rows.tolist(), n)[:, 1:].to(row_adv)
                    pg, pg_stats = pg_fn(logp, old, row_adv, pm, clip_low=a.clip_low,
                                         clip_high=a.clip_high, dual_clip=a.dual_clip)
                    if dist is None:
                        loss = agg_fn(pg, pm, denominator=pg_denom, max_len=L)
                    else:
                        loss = dist.loss(self.model, rows, mb, n, logits, pg, agg_fn, pg_denom, L, stats)
                    if ref_logp is not None:
                        kl = KL_ESTIMATORS.get(a.kl_estimator)(logp, ref_logp[rows, : n - 1])
                        loss = loss + a.kl_coef * agg_fn(kl, m, denominator=denom, max_len=L)
                        stats.setdefault("kl", []).append(((kl * m).sum() / m.sum().clamp(min=1)).item())
                    if a.entropy_coef > 0:
                        ent = entropy_from_logits(logits)
                        loss = loss - a.entropy_coef * agg_fn(ent, m, denominator=denom, max_len=L)
                        stats.setdefault("entropy", []).append(((ent * m).sum() / m.sum().clamp(min=1)).item())
                    loss.backward()
                    drift = ((logp.detach() - sample_logp[rows, : n - 1]).abs() * m).sum() / m.sum().clamp(min=1)
                    mb_loss += loss.item()  # micro-batch losses share one denominator: they add up
                    stats.setdefault("logp_drift", []).append(drift.item())
                    for k, v in pg_stats.items():
                        stats.setdefault(k, []).append(float(v))
                self._step_optimizer(stats, mb_loss)
        out = self._finish_update(stats)
        if dist is not None:
            out.update(dist.summary())
        return out

    def _step_optimizer(self, stats: dict[str, list[float]], mb_loss: float) -> None:
        stats.setdefault("loss", []).append(mb_loss)
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        stats.setdefault("grad_norm", []).append(gn.item())
        self.optimizer.step()

    def _finish_update(self, stats: dict[str, list[float]]) -> dict[str, float]:
        self.model.eval()
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["train_tokens"] = sum(stats.get("train_tokens", [0.0])) / self.cfg.trainer.ppo_epochs  # tokens per pass
        return out

    # ---------------------------------------------------------------- packed trees (algo.dedup_prefix)
    def _pack(self, trajs: list[Trajectory], adv: torch.Tensor) -> tuple[list[PackedTree], list[list[int]]]:
        """One packed sequence per tree: every shared node once, with the summed advantage of its leaves;
        also, per pack, the indices of its leaves in `trajs`."""
        members: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(trajs):
            members.setdefault((t.tree.group, t.tree.index), []).append(i)
        rows = [members[k] for k in sorted(members)]
        packs = [pack_tree(trajs[r[0]].tree, {trajs[i].node: float(adv[i]) for i in r}) for r in rows]
        return packs, rows

    def _packed_chunks(self, packs: list[PackedTree]) -> list[list[int]]:
        """Micro-batches of packed trees holding at most micro_batch_size leaves (at least one tree)."""
        chunks: list[list[int]] = [[]]
        leaves = 0
        for i, p in enumerate(packs):
            n = p.n_leaves
            if chunks[-1] and leaves + n > self.cfg.trainer.micro_batch_size:
                chunks.append([])
                leaves = 0
            chunks[-1].append(i)
            leaves += n
        return chunks

    def _packed_logits(self, model, packs: list[PackedTree]) -> list[torch.Tensor]:
        """Scoring logits (P, V) of each packed tree, at temperature T."""
        ids, pos, mask = batch_packed(packs, self.policy.pad_id)
        dev = self.cfg.run.device
        with torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16, enabled=self.cfg.trainer.bf16):
            logits = model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask.to(dev)).logits
        # unbind once: indexing the batch row by row would give every row a full-batch zero gradient
        return [row[p.src.to(dev)].float() / self.temperature for row, p in zip(logits.unbind(0), packs)]

    @torch.no_grad()
    def _packed_logprobs(self, model, packs: list[PackedTree], tap: Callable[[list[int]], Any] | None = None
                         ) -> list[torch.Tensor]:
        """Log-probs of every pack's scored tokens; `tap(pack indices)` is the context of each forward."""
        out: list[torch.Tensor] = []
        for chunk in self._packed_chunks(packs):
            sub = [packs[i] for i in chunk]
            with tap(chunk) if tap is not None else contextlib.nullcontext():
                logits = self._packed_logits(model, sub)
            out += [token_logprobs(lg[None], p.tgt.to(lg.device)[None])[0] for lg, p in zip(logits, sub)]
        return out

    def _packed_credit(self, trajs: list[Trajectory], adv: torch.Tensor, packs: list[PackedTree],
                       rows: list[list[int]], credit: CreditStep):
        """Token credit read from the packed forwards themselves: (tap, weigh). `tap(pack indices)` is
        the context of a forward over those packs (batch rows in that order): it weighs their pending
        leaves from the maps of each leaf's own tokens. `weigh(pack indices)` then sets those packs'
        coefficients to Σ_ℓ A_ℓ·w_ℓ(t), once per pack. `rows[k]`: pack k's leaves in `trajs`."""
        base = [p.coef for p in packs]
        done: set[int] = set()

        def tap(chunk: list[int]):
            leaves = [(row, i, packs[k].leaf_sequence(trajs[i].tree, trajs[i].node))
                      for row, k in enumerate(chunk) for i in rows[k]]
            return credit.tap_packed(self.model, leaves)

        def weigh(chunk: list[int]) -> None:
            for k in chunk:
                if k in done:
                    continue
                tree, p = trajs[rows[k][0]].tree, packs[k]
                leaf_adv = {trajs[i].node: float(adv[i]) for i in rows[k]}
                w = {trajs[i].node: credit.weights[i][torch.tensor(trajs[i].loss_mask, dtype=torch.bool)]
                     for i in rows[k]}
                p.coef = reweight_packed(base[k], {leaf: p.leaf_index(tree, leaf) for leaf in w}, leaf_adv, w)
                done.add(k)

        return tap, weigh

    def update_packed(self, trajs: list[Trajectory], adv: torch.Tensor, step: int,
                      credit: CreditStep | None = None) -> dict[str, float]:
        """The update of `update`, on packed trees: each shared node is run once and scored with the
        summed advantage of its leaves (same gradient as one row per leaf at ratio 1, fewer tokens).
        Token-mean aggregation over leaf tokens; KL and entropy weighted by leaves through the token.
        Token weights (`credit`) are read from the attention of the first forward over each pack (the
        π_old log-prob pass when there is one), each leaf's map over its own tokens, before that pack's
        loss: each packed token then gets Σ_ℓ A_ℓ·w_ℓ(t)."""
        cfg, a = self.cfg, self.cfg.algo
        pg_fn = POLICY_LOSSES.get(a.policy_loss)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        packs, rows = self._pack(trajs, adv)
        tap, weigh = self._packed_credit(trajs, adv, packs, rows, credit) if credit is not None else (None, None)
        reuse_old = cfg.trainer.ppo_epochs == 1 and cfg.trainer.mini_batches == 1
        old_logp = None if reuse_old else self._packed_logprobs(self.model, packs, tap)
        ref_logp = self._packed_logprobs(self.ref_model, packs) if self.ref_model is not None else None
        stats: dict[str, list[float]] = {}
        order = torch.arange(len(packs))
        self.model.train()
        for _ in range(cfg.trainer.ppo_epochs):
            for mb in order.chunk(cfg.trainer.mini_batches):
                mb_packs = [packs[i] for i in mb.tolist()]
                denom = float(sum(p.leaf_tokens for p in mb_packs))
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for chunk in self._packed_chunks(mb_packs):
                    sub = [mb_packs[i] for i in chunk]
                    idx = [int(mb[i]) for i in chunk]
                    stats.setdefault("train_tokens", []).append(float(len(sub) * max(len(p.input_ids) for p in sub)))
                    loss = 0.0
                    with tap(idx) if tap is not None else contextlib.nullcontext():
                        chunk_logits = self._packed_logits(self.model, sub)
                    if weigh is not None:
                        weigh(idx)
                    for j, (logits, p) in enumerate(zip(chunk_logits, sub)):
                        dev = logits.device
                        logp = token_logprobs(logits[None], p.tgt.to(dev)[None])
                        ones = torch.ones_like(logp)
                        old = logp.detach() if old_logp is None else old_logp[idx[j]][None]
                        pg, pg_stats = pg_fn(logp, old, p.coef.to(dev)[None], ones, clip_low=a.clip_low,
                                             clip_high=a.clip_high, dual_clip=a.dual_clip)
                        loss = loss + (pg * ones).sum() / denom
                        count = p.count.to(dev)[None]
                        if ref_logp is not None:
                            kl = KL_ESTIMATORS.get(a.kl_estimator)(logp, ref_logp[idx[j]][None])
                            loss = loss + a.kl_coef * (kl * count).sum() / denom
                            stats.setdefault("kl", []).append(((kl * count).sum() / count.sum()).item())
                        if a.entropy_coef > 0:
                            ent = entropy_from_logits(logits[None])
                            loss = loss - a.entropy_coef * (ent * count).sum() / denom
                            stats.setdefault("entropy", []).append(((ent * count).sum() / count.sum()).item())
                        drift = ((logp.detach() - p.sample_logp.to(dev)[None]).abs() * count).sum() / count.sum()
                        stats.setdefault("logp_drift", []).append(drift.item())
                        for k, v in pg_stats.items():
                            stats.setdefault(k, []).append(float(v))
                    loss.backward()
                    mb_loss += loss.item()
                self._step_optimizer(stats, mb_loss)
        out = self._finish_update(stats)
        out["train_tokens_per_leaf"] = float(sum(p.leaf_sequence_tokens for p in packs))
        return out

    def _sampled_logprobs(self, ids: torch.Tensor, sel: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log π(targets) (B, n-1) at the positions `sel` (bool (B, n-1)), 0 elsewhere, with the LM head
        run on those positions' last hidden states only (ids (B, n), targets (B, n-1))."""
        hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]  # (B, n-1, H)
        logits = self.model.get_output_embeddings()(hidden[sel]).float() / self.temperature  # (T, V)
        lp = token_logprobs(logits[None], targets[sel][None])[0]
        return torch.zeros(sel.shape, dtype=lp.dtype, device=lp.device).masked_scatter(sel, lp)

    def _tap(self, credit: CreditStep | None, rows: torch.Tensor):
        """Context of a policy forward over `rows`: token credit reads its attention (if any is due)."""
        return credit.tap(self.model, rows.tolist()) if credit is not None else contextlib.nullcontext()

    @torch.no_grad()
    def _logprobs(self, model, ids, attn, credit: CreditStep | None = None) -> torch.Tensor:
        """Log-probs (B, L-1) of ids[:, 1:] under `model`; 0 past each row's end (right padding)."""
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float32, device=ids.device)
        lengths = attn.sum(-1)
        for rows in torch.argsort(lengths, descending=True, stable=True).split(self.cfg.trainer.micro_batch_size):
            n = int(lengths[rows].max())
            with self._tap(credit, rows):
                logits = model(input_ids=ids[rows, :n]).logits[:, :-1].float() / self.temperature
            out[rows, : n - 1] = token_logprobs(logits, ids[rows, 1:n])
        return out

    def advantages(self, trajs: list[Trajectory]) -> torch.Tensor:
        """One advantage per leaf from the registered estimator; prompts, trees and ancestor
        sub-groups (prompt, then every node above the leaf) are passed as integer ids."""
        a = self.cfg.algo
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        groups = torch.tensor([t.group for t in trajs], dtype=torch.long)
        tree_key = {}
        for t in trajs:
            tree_key.setdefault((t.tree.group, t.tree.index), len(tree_key))
        tree_ids = torch.tensor([tree_key[(t.tree.group, t.tree.index)] for t in trajs], dtype=torch.long)
        n_groups = int(groups.max()) + 1 if len(trajs) else 0
        ancestors = [[int(t.group)] + [n_groups + tree_key[(t.tree.group, t.tree.index)] * 1_000_000 + n.id
                                       for n in t.tree.path(t.node)[:-1]] for t in trajs]
        return ADVANTAGES.get(a.advantage)(rewards, groups, tree_ids=tree_ids, ancestors=ancestors, eps=a.adv_eps,
                                           singleton=a.singleton, w_intra=a.tree_w_intra, w_inter=a.tree_w_inter)

    def train_step(self, step: int) -> dict[str, float]:
        a = self.cfg.algo
        t0 = time.time()
        trees, cost = self.rollout(step)
        trajs = leaf_trajectories(trees)
        t1 = time.time()
        predictor_metrics = self.predictor.observe(trees, step) if self.predictor is not None else {}
        t_pred = time.time() - t1
        self._update_prompt_stats(trees)
        t1 = time.time()
        rewards = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        groups = torch.tensor([t.group for t in trajs], dtype=torch.long)
        adv = self.advantages(trajs)
        for t, v in zip(trajs, adv.tolist()):
            t.tree.nodes[t.node].advantage = v
        n_gen = torch.tensor([sum(t.loss_mask) for t in trajs], dtype=torch.float32)
        metrics = summarize(trajs)
        metrics.update(effective_ratio=effective_ratio(rewards, groups),
                       zero_adv_frac=zero_advantage_fraction(adv[:, None], torch.ones(len(trajs), 1),
                                                             weights=n_gen),
                       mixed_anchors=mixed_anchors(trees), leaves=len(trajs))
        keep = list(range(len(trajs)))
        if a.skip_uniform_groups:
            mixed = {int(g) for g in groups.unique() if rewards[groups == g].unique().numel() > 1}
            keep = [i for i, t in enumerate(trajs) if t.group in mixed]
        every = self.cfg.trainer.tree_log_every
        log_now = bool(every) and (step + 1) % every == 0
        credit_s = 0.0
        if keep:
            kept, kept_adv = [trajs[i] for i in keep], adv[keep]
            credit = self.credit.start(kept, kept_adv, step, want_samples=log_now)  # None: no token weights
            update = self.update_packed if a.dedup_prefix else self.update
            metrics.update(update(kept, kept_adv, step, credit))
            if credit is not None:
                result = credit.result()
                metrics.update(result.metrics)
                credit_s = result.metrics["credit_s"]  # spent inside the update: not counted in update_s
                if result.samples:
                    write_samples(result.samples, self.run_dir / "credit" / f"step_{step + 1:06d}.jsonl")
        if log_now:
            write_jsonl(trees, self.run_dir / "trees" / f"step_{step + 1:06d}.jsonl", {"step": step + 1})
        metrics.update(trained_trajectories=len(keep), lr=self.lr_at(step), gen_tokens=cost.gen_tokens,
                       prefill_tokens=cost.prefill_tokens, prefill_saved=cost.prefill_saved,
                       tool_calls=cost.tool_calls, trajectories=cost.trajectories,
                       continuations=cost.continuations, continuation_fraction=cost.continuation_fraction,
                       root_rollouts=cost.trajectories - cost.continuations,
                       prompts_used=len({t.group for t in trees}), **self.alloc_info, **predictor_metrics,
                       rollout_s=t1 - t0 - t_pred, update_s=time.time() - t1 - credit_s)
        if self.predictor is not None:
            metrics["predictor_s"] = t_pred
        self.totals["cum_gen_tokens"] += cost.gen_tokens
        self.totals["cum_trajectories"] += cost.trajectories
        self.totals["cum_tool_calls"] += cost.tool_calls
        metrics.update(self.totals)
        return metrics

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

        return save_checkpoint(self.run_dir / "checkpoints", step, self.model, self.tokenizer, self.optimizer,
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
        cfg_file = Path(resume) / "config.yaml"
        if not cfg_file.is_file():
            raise CheckpointError(f"{resume} is not a run directory (no config.yaml)")
        cfg = load_config(cfg_file, overrides)
    else:
        cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg, Path(resume) if resume else None, overwrite, log)
    trainer.setup()
    result = trainer.train()
    (trainer.run_dir / "final_eval.json").write_text(json.dumps(result, indent=1))
    return trainer.run_dir, result
